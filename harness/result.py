"""Outcomes of checks: plain data shared by the core, the reports and the pytest layer."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.context import Context


class Outcome(str, enum.Enum):
    """What a check concluded."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    INCONCLUSIVE = "inconclusive"
    WARNING = "warning"


class Kind(str, enum.Enum):
    """The family a check belongs to, as recorded in reports."""

    STRUCTURE = "structure"
    WEIGHTS = "weights"
    BEHAVIOUR = "behaviour"
    HASH = "hash"
    BENCHMARK = "benchmark"


@dataclass
class CheckResult:
    """The verdict of one check: an outcome, a one-line message, a few lines of figures."""

    outcome: Outcome
    message: str
    details: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

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
    def skipped(cls, message: str) -> CheckResult:
        """A check that does not apply to this merge case."""
        return cls(Outcome.SKIPPED, message)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable view."""
        return {
            "outcome": self.outcome.value,
            "message": self.message,
            "details": list(self.details),
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckResult:
        """Inverse of :meth:`to_json`."""
        return cls(
            Outcome(data["outcome"]),
            str(data["message"]),
            [str(d) for d in data.get("details", [])],
            dict(data.get("metrics", {})),
        )


@dataclass(frozen=True)
class Check:
    """One named check: becomes the pytest item ``merge::<family>::<name>``."""

    family: str
    name: str
    kind: Kind
    description: str
    run: Callable[[Context], CheckResult]

    @property
    def id(self) -> str:
        """The stable identifier used in item ids, reports and the lock file."""
        return f"merge::{self.family}::{self.name}"
