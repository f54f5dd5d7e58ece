"""Outcomes of checks: plain data shared by the checks, the gate, reports and the plugin.

A :class:`CheckResult` carries a one-line message and free-form figures (``metrics``, shown in
reports), plus typed evidence that other parts of the run read back: the digests a check
computed, the oracle's per-tensor rows, the lock comparison and the benchmark record the lock
keeps. Results cross process boundaries (xdist workers to the controller) as JSON.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Outcome(str, enum.Enum):
    """What a check concluded."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    INCONCLUSIVE = "inconclusive"
    WARNING = "warning"

    def __str__(self) -> str:
        return self.value


class Family(str, enum.Enum):
    """A family of checks: its items' middle id part, pytest marker and report label."""

    STRUCTURE = "structure"
    SECURITY = "security"
    WEIGHTS = "weights"
    HASH = "hash"
    BEHAVIOUR = "behaviour"
    LOCK = "lock"
    BENCHMARK = "benchmark"
    EXPORT = "export"

    def __str__(self) -> str:
        return self.value

    @property
    def marker_help(self) -> str:
        """The line ``pytest --markers`` shows for this family's marker."""
        return f"merge-harness {self.value} check"


@dataclass
class LockEvidence:
    """The lock check's comparison of this run's digests with the lock file."""

    path: str
    #: ``absent``, ``match`` or ``changed``.
    status: str
    changed: list[str] = field(default_factory=list)
    #: The merged checkpoint's per-tensor digests, carried to the controller that writes the
    #: lock (only when this run may write one).
    merged_tensors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON view (transport and report)."""
        return {
            "path": self.path,
            "status": self.status,
            "changed": list(self.changed),
            "merged_tensors": dict(self.merged_tensors),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LockEvidence:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["path"]),
            str(data["status"]),
            [str(c) for c in data.get("changed", [])],
            {str(k): str(v) for k, v in dict(data.get("merged_tensors", {})).items()},
        )


@dataclass
class BenchmarkRecord:
    """What the lock file keeps of one benchmark check, and the figures reports show."""

    #: What the result depends on besides the weights (task files, settings, tokenizer).
    fingerprint: str
    #: Sufficient statistics of every evaluated model (re-judged against the thresholds).
    evidence: dict[str, Any]
    #: The merged model's value, and every evaluated model's.
    value: float | None
    values: dict[str, float | None] = field(default_factory=dict)
    #: Whether the evidence came from the lock file (evaluation skipped).
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "fingerprint": self.fingerprint,
            "evidence": self.evidence,
            "value": self.value,
            "values": dict(self.values),
            "reused": self.reused,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchmarkRecord:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["fingerprint"]),
            dict(data["evidence"]),
            data.get("value"),
            dict(data.get("values", {})),
            bool(data.get("reused", False)),
        )


@dataclass
class CheckResult:
    """The verdict of one check: an outcome, a one-line message, figures and typed evidence."""

    outcome: Outcome
    message: str
    details: list[str] = field(default_factory=list)
    #: Free-form figures for reports (JSON-able).
    metrics: dict[str, Any] = field(default_factory=dict)
    #: model (``merged``, ``base``, ``adapter``) -> canonical digest this check computed.
    digests: dict[str, str] = field(default_factory=dict)
    #: The oracle's per-tensor weight-difference rows (the plot and the report read them).
    layers: list[dict[str, Any]] = field(default_factory=list)
    lock: LockEvidence | None = None
    record: BenchmarkRecord | None = None
    #: What a skipped check needed and the run did not have (``--adapter``, ``transformers``,
    #: ``memory``): the check verified nothing, although it applies to this merge.
    needs: list[str] = field(default_factory=list)
    #: The check whose failure made this one meaningless (it was skipped, not failed again).
    blocked_by: str | None = None
    #: Wall time of the check (set by the runner).
    seconds: float | None = None
    #: The traceback of an internal error (``--full-trace`` shows it).
    traceback: str | None = None

    @classmethod
    def passed(cls, message: str, **metrics: Any) -> CheckResult:
        """A passing result with optional metrics."""
        return cls(Outcome.PASSED, message, metrics=dict(metrics))

    @classmethod
    def failed(
        cls,
        message: str,
        details: list[str] | None = None,
        *,
        metrics: dict[str, Any] | None = None,
        **more: Any,
    ) -> CheckResult:
        """A failing result: ``message`` is the one-line cause, ``details`` the figures."""
        return cls(Outcome.FAILED, message, list(details or []), {**(metrics or {}), **more})

    @classmethod
    def skipped(cls, message: str, *, needs: list[str] | None = None) -> CheckResult:
        """A check that does not apply, or (with ``needs``) could not run for lack of an input."""
        return cls(Outcome.SKIPPED, message, needs=list(needs or []))

    @property
    def unverified(self) -> bool:
        """Whether the check applies to this merge but verified nothing (an input was missing)."""
        return self.outcome is Outcome.SKIPPED and bool(self.needs)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable view with every field (the transport between processes)."""
        return {
            "outcome": self.outcome.value,
            "message": self.message,
            "details": list(self.details),
            "metrics": self.metrics,
            "digests": dict(self.digests),
            "layers": list(self.layers),
            "lock": None if self.lock is None else self.lock.to_json(),
            "record": None if self.record is None else self.record.to_json(),
            "needs": list(self.needs),
            "blocked_by": self.blocked_by,
            "seconds": self.seconds,
            "traceback": self.traceback,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckResult:
        """Inverse of :meth:`to_json`."""
        lock = data.get("lock")
        record = data.get("record")
        seconds = data.get("seconds")
        return cls(
            Outcome(data["outcome"]),
            str(data["message"]),
            [str(d) for d in data.get("details", [])],
            dict(data.get("metrics", {})),
            {str(k): str(v) for k, v in dict(data.get("digests", {})).items()},
            list(data.get("layers", [])),
            None if lock is None else LockEvidence.from_json(lock),
            None if record is None else BenchmarkRecord.from_json(record),
            [str(n) for n in data.get("needs", [])],
            None if data.get("blocked_by") is None else str(data["blocked_by"]),
            float(seconds) if isinstance(seconds, (int, float)) else None,
            None if data.get("traceback") is None else str(data["traceback"]),
        )
