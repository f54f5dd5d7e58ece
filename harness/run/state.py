"""What one run knows while it runs: settings, the suite, the results gathered, the gate's lines.

The pytest plugin keeps one per process (in ``config.stash``); ``merge-harness combine``
builds one from partial reports. The gate (``harness.gate.apply``) reads it at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult
from harness.run.settings import Settings


@dataclass
class State:
    """What a run knows (one per process under xdist)."""

    settings: Settings
    suite: list[Check] = field(default_factory=list)
    #: check id -> result, filled on the controller from every report (xdist included).
    results: dict[str, CheckResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Lines the gate adds to the terminal summary (lock transitions, verdict).
    gate_lines: list[str] = field(default_factory=list)
    #: ``merge::...`` arguments that select checks (empty: every check of the suite).
    selection: list[str] = field(default_factory=list)
    #: The user's own tests that ran in the same session (beside the merge checks).
    other_tests: int = 0
    #: ``--merge-shard``: the part of the streamed pass this run computed (its JSON).
    part: dict[str, Any] | None = None
    #: The identity of the inputs and settings (see ``harness.checks.split.fingerprint``).
    fingerprint: dict[str, str] | None = None
    _context: Context | None = None

    def context(self) -> Context:
        """The lazily created context of this process."""
        if self._context is None:
            self._context = Context(self.settings)
        return self._context
