"""Resolve a run before collection: discover the base, merge if asked, build settings and suite.

The controller does this once; xdist workers receive the controller's :class:`Settings` whole
(its own merge included) instead of resolving again.
"""

from __future__ import annotations

import base64
import dataclasses
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from harness.checks import build_suite
from harness.errors import HarnessError, one_line
from harness.io.adapter import discover_base
from harness.io.models import resolve_device
from harness.merger import merge_checkpoint
from harness.offline import enforce_offline
from harness.plugin.options import SHARD_FLAG, read_request
from harness.run.settings import Request, Settings, resolve
from harness.run.state import State

WORKER_KEY = "merge_harness"


def prepare(config: pytest.Config) -> State:
    """The run's :class:`State`; raise ``pytest.UsageError`` when the run cannot start.

    The run is switched offline first (undone when pytest unconfigures). Any failure is a usage
    error (exit 4) with a one-line cause, never an INTERNALERROR; ``--full-trace`` shows the
    traceback of an unexpected one.
    """
    config.add_cleanup(enforce_offline())
    try:
        return _prepare(config)
    except pytest.UsageError:
        raise
    except HarnessError as exc:
        raise pytest.UsageError(one_line(exc)) from None
    except Exception as exc:
        if config.getoption("fulltrace", False):
            raise
        raise pytest.UsageError(
            f"merge-harness could not start: {type(exc).__name__}: {one_line(exc)}"
            " (--full-trace shows where)"
        ) from None


def _prepare(config: pytest.Config) -> State:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None and WORKER_KEY in workerinput:
        state = State(import_settings(workerinput[WORKER_KEY]))
    else:
        state = _resolve(config)
    state.suite = build_suite(state.settings)
    return state


def _resolve(config: pytest.Config) -> State:
    request = read_request(config)
    if request.shard is not None:
        _check_shard(request)
    notes: list[str] = []
    if request.base is None and request.adapter is not None:
        try:
            base = discover_base(request.adapter).absolute()
        except HarnessError as exc:
            raise pytest.UsageError(f"--adapter: {exc}") from None
        request = dataclasses.replace(request, base=base)
        notes.append(f"base model discovered from adapter_config.json: {base}")
    workdir: Path | None = None
    if request.merged is None:
        if request.base is None or request.adapter is None:
            raise pytest.UsageError(
                "merge-harness needs --merged-model, or --base-model with --adapter to merge"
            )
        workdir = Path(tempfile.mkdtemp(prefix="merge-harness-"))
        target = workdir / "merged"
        try:
            merge_checkpoint(request.base, request.adapter, target, progress=False)
        except BaseException as exc:
            # The session plugin that would remove the workdir is never registered: do it here.
            shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(exc, HarnessError):
                raise pytest.UsageError(
                    f"cannot merge {request.adapter} into {request.base}: {one_line(exc)}"
                ) from None
            raise
        request = dataclasses.replace(request, merged=target)
        notes.append(f"no --merged-model: merged with the streaming merger into {target}")
    settings = _settings(request, config, workdir)
    peers = xdist_workers(config)
    if peers > 1 and settings.shard is None:
        # Workers divide the streamed pass among themselves through a private folder.
        share = Path(tempfile.mkdtemp(prefix="merge-harness-share-"))
        settings = dataclasses.replace(settings, share=share, peers=peers)
    return State(settings, notes=notes)


def _check_shard(request: Request) -> None:
    """A sharded run writes its part into the report, of a merge every job can read."""
    flag = SHARD_FLAG
    if request.report_path is None:
        raise pytest.UsageError(f"{flag} needs --merge-report PATH: the part travels in it")
    if request.merged is None:
        raise pytest.UsageError(
            f"{flag} needs --merged-model: every part must read the same merged checkpoint"
        )
    if request.update_lock:
        raise pytest.UsageError(
            f"{flag}: a part cannot update the lock; pass --update-merge-lock to"
            " merge-harness combine, which sees every part"
        )


def xdist_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers this run starts (0 without distribution)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return 0
    count = config.getoption("numprocesses", None)
    if not isinstance(count, int) or config.getoption("dist", "no") == "no":
        return 0
    return count


def _settings(request: Request, config: pytest.Config, workdir: Path | None) -> Settings:
    try:
        settings = resolve(request, rootdir=config.rootpath, workdir=workdir)
        if settings.device != "cpu":
            # An accelerator that is not there is a usage error now, not three failed checks.
            resolve_device(settings.device)
        return settings
    except HarnessError as exc:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        raise pytest.UsageError(one_line(exc)) from None


def export_settings(settings: Settings) -> str:
    """The settings as text for ``node.workerinput`` (pickled: a channel between our processes).

    Only the controller writes it and only the workers it starts read it; a whole
    :class:`Settings` (paths, the validated configuration) crosses without a codec per field.
    """
    return base64.b64encode(pickle.dumps(settings)).decode("ascii")


def import_settings(text: str) -> Settings:
    """Inverse of :func:`export_settings` (on an xdist worker)."""
    settings = pickle.loads(base64.b64decode(text))
    if not isinstance(settings, Settings):
        raise HarnessError("merge-harness: the controller sent no settings to this worker")
    return settings
