"""Resolve a run's inputs before collection: discover the base, merge if asked, build the suite."""

from __future__ import annotations

import json
import shutil
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
    (when no ``--merged-model`` was given) is done once, not once per worker. The run is switched
    offline first (undone when pytest unconfigures). Any failure is a usage error (exit 4) with a
    one-line cause, never an INTERNALERROR; ``--full-trace`` shows the traceback of an
    unexpected one.
    """
    from harness.offline import enforce_offline

    config.add_cleanup(enforce_offline())
    try:
        _prepare(state, config)
    except pytest.UsageError:
        raise
    except HarnessError as exc:
        raise pytest.UsageError(_one_line(str(exc))) from None
    except Exception as exc:
        if config.getoption("fulltrace", False):
            raise
        raise pytest.UsageError(
            f"merge-harness could not start: {type(exc).__name__}: {_one_line(str(exc))}"
            " (--full-trace shows where)"
        ) from None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"


def _prepare(state: State, config: pytest.Config) -> None:
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
        except BaseException as exc:
            # The session plugin that would remove the workdir is never registered: do it here.
            shutil.rmtree(workdir, ignore_errors=True)
            options.workdir = None
            if isinstance(exc, HarnessError):
                raise pytest.UsageError(
                    f"cannot merge {options.adapter} into {options.base}: {_one_line(str(exc))}"
                ) from None
            raise
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
