"""The pytest plugin (entry point ``merge_harness``): options, generated items, summary, gate.

Loaded by pytest on every run, so it imports nothing heavy: without ``--merged-model`` (or
``--base-model`` with ``--adapter``) it registers its options and markers and does nothing else.
When a merge is named, a :class:`~harness.plugin.session.HarnessSession` holding the run's state
is registered as a second plugin and carries the remaining hooks.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.plugin.fixtures import (
    adapter_model,
    base_model,
    merge_case,
    merged_model,
    tiny_merge_factory,
)
from harness.plugin.options import add_options, is_selection, wanted
from harness.plugin.state import STATE_KEY
from harness.run.result import Family

__all__ = [
    "adapter_model",
    "base_model",
    "merge_case",
    "merged_model",
    "pytest_addoption",
    "pytest_configure",
    "pytest_configure_node",
    "tiny_merge_factory",
]

#: Marker names and their help: one per check family, and one for every built-in check.
_MARKERS = {
    "merge_harness": "a built-in merge-harness check",
    **{family.value: family.marker_help for family in Family},
}
SESSION_PLUGIN = "merge_harness_session"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``merge-harness`` option group and ini keys."""
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> None:
    """Before anything is written: keep the rootdir and cache away from the model folders."""
    namespace = early_config.known_args_namespace
    if wanted(early_config, namespace, list(getattr(namespace, "file_or_dir", None) or [])):
        from harness.plugin.rootdir import pin

        pin(early_config, args)


def pytest_configure(config: pytest.Config) -> None:
    """Activate the harness when a merge was named; invalid options are a usage error (exit 4)."""
    for name, text in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    positional = list(getattr(config.option, "file_or_dir", None) or [])
    if not wanted(config, config.option, positional):
        return
    from harness.plugin.session import HarnessSession
    from harness.plugin.setup import prepare

    state = prepare(config)
    # ``merge::...`` arguments select checks; they are no paths for pytest to collect.
    state.selection = [arg for arg in positional if is_selection(arg)]
    if state.selection:
        config.args[:] = [arg for arg in config.args if not is_selection(arg)]
    config.stash[STATE_KEY] = state
    config.pluginmanager.register(HarnessSession(state, config), SESSION_PLUGIN)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: hand the controller's settings (its own merge included) to each worker."""
    state = node.config.stash.get(STATE_KEY, None)
    if state is not None:
        from harness.plugin.setup import WORKER_KEY, export_settings

        node.workerinput[WORKER_KEY] = export_settings(state.settings)
