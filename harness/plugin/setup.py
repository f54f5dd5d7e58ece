"""Resolve a run's inputs before collection: discover the base, merge when asked, build the suite."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from harness.errors import HarnessError
from harness.plugin.state import State

WORKER_KEY = "merge_harness"


def prepare(state: State, config: pytest.Config) -> None:
    """Fill in what the options leave implicit; raise ``pytest.UsageError`` when impossible.

    On an xdist worker the controller's resolved paths are reused, so the controller's own merge
    (when no ``--merged-model`` was given) is done once, not once per worker.
    """
    options = state.options
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None and WORKER_KEY in workerinput:
        shared = json.loads(workerinput[WORKER_KEY])
        for attr in ("merged", "base", "workdir"):
            if shared.get(attr):
                setattr(options, attr, Path(shared[attr]))
    else:
        _resolve(state, config)
    from harness.gate import load_settings

    try:
        load_settings(options, config.rootpath)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    from harness.suite import build_suite

    state.suite = build_suite(options)


def _resolve(state: State, config: pytest.Config) -> None:
    options = state.options
    if options.base is None and options.adapter is not None:
        from harness.adapter import discover_base

        try:
            options.base = discover_base(options.adapter).absolute()
        except HarnessError as exc:
            raise pytest.UsageError(f"--adapter: {exc}") from None
        state.notes.append(f"base model discovered from adapter_config.json: {options.base}")
    if options.merged is None:
        if options.base is None or options.adapter is None:
            raise pytest.UsageError(
                "merge-harness needs --merged-model, or --base-model with --adapter to merge"
            )
        workdir = Path(tempfile.mkdtemp(prefix="merge-harness-"))
        options.workdir = workdir
        target = workdir / "merged"
        from harness.merger import merge_checkpoint

        try:
            merge_checkpoint(options.base, options.adapter, target, progress=False)
        except HarnessError as exc:
            raise pytest.UsageError(f"cannot merge {options.adapter} into {options.base}: {exc}") from None
        options.merged = target
        state.notes.append(f"no --merged-model: merged with the streaming merger into {target}")


def export_for_worker(state: State) -> str:
    """The resolved paths as JSON for ``node.workerinput``."""
    options = state.options
    return json.dumps(
        {
            "merged": str(options.merged) if options.merged else None,
            "base": str(options.base) if options.base else None,
            "workdir": str(options.workdir) if options.workdir else None,
        }
    )
