"""The ``lock`` family: this run's digests against the approved lock file.

See :mod:`harness.gate.lockfile` for the file and its transitions. The check reads the digests
the shared scans computed (no second pass over the weights) and the adapter's own digest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.checks.passes import base_scan, merged_scan
from harness.checks.split import adapter_fingerprint
from harness.errors import HarnessError
from harness.gate.lockfile import MODELS, Lock, LockStatus, read_lock
from harness.run.check import Check
from harness.run.config import DEFAULT_LOCK
from harness.run.context import Context, Key
from harness.run.result import CheckResult, Family, LockEvidence, Outcome
from harness.run.settings import Settings
from harness.text import shown

#: Changed tensor names kept in a result (the message shows a few, the metrics up to this many).
MAX_LISTED = 50


@dataclass
class Current:
    """The digests of this run's inputs."""

    digests: dict[str, str]
    merged_tensors: dict[str, str]


CURRENT: Key[Current] = Key("lock:current")
STATE: Key[LockState] = Key("lock:state")


def current_digests(ctx: Context) -> Current:
    """Digests of the merged, base and adapter inputs (cached; shares the structure scans)."""

    def compute() -> Current:
        merged = merged_scan(ctx).manifest
        digests = {"merged": merged.digest}
        if ctx.has_base:
            digests["base"] = base_scan(ctx).manifest.digest
        if ctx.has_adapter:
            digests["adapter"] = adapter_fingerprint(ctx)
        return Current(digests, dict(merged.tensors))

    return ctx.memo(CURRENT, compute)


@dataclass
class LockState:
    """How this run's inputs compare with the lock file."""

    path: Path
    status: LockStatus
    current: Current
    recorded: Lock | None = None
    #: Which of merged/base/adapter changed.
    changed: list[str] = field(default_factory=list)
    #: Merged tensors whose digest changed (or that appeared or disappeared).
    changed_tensors: list[str] = field(default_factory=list)


def lock_path(settings: Settings) -> Path:
    """Where the lock file is (resolved with the settings; the current folder otherwise)."""
    return settings.lock_path if settings.lock_path is not None else Path.cwd() / DEFAULT_LOCK


def lock_state(ctx: Context) -> LockState:
    """Compare this run's digests with the lock file (cached)."""

    def compute() -> LockState:
        path = lock_path(ctx.settings)
        recorded = read_lock(path, named=ctx.settings.lock_named)
        current = current_digests(ctx)
        if recorded is None:
            return LockState(path, LockStatus.ABSENT, current)
        changed = [m for m in MODELS if recorded.digests.get(m) != current.digests.get(m)]
        tensors: list[str] = []
        if "merged" in changed:
            old, new = recorded.merged_tensors, current.merged_tensors
            tensors = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
        status = LockStatus.CHANGED if changed else LockStatus.MATCH
        return LockState(path, status, current, recorded, changed, tensors)

    return ctx.memo(STATE, compute)


def reusable(ctx: Context, check_id: str, fingerprint: str) -> dict[str, Any] | None:
    """The recorded benchmark entry for ``check_id`` when the lock allows reusing it.

    Reuse needs every digest to match the lock and the same evaluation fingerprint; a lock that
    cannot be read allows nothing (its own check reports why). A sharded run
    (``--merge-shard``) holds a part of the digests only: it reuses nothing.
    """
    if ctx.settings.shard is not None:
        return None
    if not lock_path(ctx.settings).is_file():
        return None  # nothing recorded: skip computing the digests here
    try:
        state = lock_state(ctx)
    except HarnessError:
        return None
    if state.status is not LockStatus.MATCH or state.recorded is None:
        return None
    entry = state.recorded.benchmarks.get(check_id)
    if entry is None or entry.get("fingerprint") != fingerprint:
        return None
    return entry


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:12]


def _names(names: list[str], limit: int = 3) -> str:
    quoted = ", ".join(shown(n) for n in names[:limit])
    return quoted + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_lock(ctx: Context) -> CheckResult:
    """Compare the inputs' digests with the lock file; fail on a change not being approved."""
    state = lock_state(ctx)
    result = _judge(state, ctx.settings.update_lock)
    result.digests = dict(state.current.digests)
    # The per-tensor digests travel to the controller only when it is going to write the lock.
    tensors = dict(state.current.merged_tensors) if ctx.settings.update_lock else {}
    result.lock = LockEvidence(str(state.path), state.status.value, list(state.changed), tensors)
    result.metrics.update(
        update=ctx.settings.update_lock,
        changed_tensors=state.changed_tensors[:MAX_LISTED],
        changed_tensor_count=len(state.changed_tensors),
    )
    return result


def _judge(state: LockState, update: bool) -> CheckResult:
    """The lock check's outcome and message for one comparison."""
    current = state.current.digests
    name = state.path.name
    if state.status is LockStatus.ABSENT:
        if update:
            return CheckResult.passed(
                f"no lock file {name} yet: this run records one if the gate passes"
                " (--update-merge-lock)"
            )
        return CheckResult(
            Outcome.WARNING,
            f"no lock file {name}: nothing approved to compare with; run with"
            " --update-merge-lock to record this merge",
        )
    if state.status is LockStatus.MATCH:
        reused = (
            "recorded benchmark results are reused"
            if state.recorded and (state.recorded.benchmarks)
            else "no benchmark results recorded"
        )
        return CheckResult.passed(
            f"digests match {name} (merged {_short(current.get('merged'))}): {reused}"
        )
    recorded = state.recorded.digests if state.recorded else {}
    parts = []
    details = []
    for model in state.changed:
        parts.append(f"{model} {_short(recorded.get(model))} -> {_short(current.get(model))}")
        details.append(f"{model}: locked {recorded.get(model)}, now {current.get(model)}")
    summary = f"{' and '.join(state.changed)} digest{'s' if len(state.changed) > 1 else ''}"
    text = f"{summary} changed since {name} ({'; '.join(parts)})"
    if state.changed_tensors:
        count = len(state.changed_tensors)
        text += f"; {count} merged tensor(s) differ: {_names(state.changed_tensors)}"
        details.extend(f"changed tensor: {n}" for n in state.changed_tensors[:10])
    if update:
        return CheckResult(
            Outcome.PASSED, text + "; benchmarks re-run, lock rewritten if the gate passes", details
        )
    return CheckResult.failed(
        text + "; benchmarks re-run; approve with --update-merge-lock", details
    )


def active(settings: Settings) -> bool:
    """Whether the lock check applies: asked for, or a lock file exists, or updating."""
    return settings.update_lock or settings.lock_requested or lock_path(settings).exists()


def checks(settings: Settings) -> list[Check]:
    """The lock family: one check comparing digests with the lock file, when a lock applies."""
    if not active(settings):
        return []
    return [
        Check(
            Family.LOCK,
            "digests",
            "merged, base and adapter digests match the approved lock file",
            check_lock,
            streamed=True,
        )
    ]


