"""A check: a named function from the run's context to a ``CheckResult``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.run.context import Context
from harness.run.result import CheckResult, Family


@dataclass(frozen=True)
class Check:
    """One named check: becomes the pytest item ``merge::<family>::<name>``."""

    family: Family
    name: str
    description: str
    run: Callable[[Context], CheckResult]
    #: Inputs (``merged``, ``base``, ``adapter``) whose unreadability this check reports; the
    #: other checks that need an unreadable input skip, naming it, instead of failing again.
    reports: frozenset[str] = frozenset()
    #: Whether the check judges the streamed pass over the weights (digests, scans, oracle):
    #: such checks are judged from the combined parts when the pass is divided.
    streamed: bool = False

    @property
    def id(self) -> str:
        """The stable identifier used in item ids, reports and the lock file."""
        return f"merge::{self.family.value}::{self.name}"
