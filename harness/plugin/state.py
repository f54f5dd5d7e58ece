"""Per-run plugin state kept in ``config.stash``: settings, the context, collected results."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult
from harness.run.settings import Settings


@dataclass
class State:
    """What the plugin knows during one run (one per process under xdist)."""

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
    _context: Context | None = None

    def context(self) -> Context:
        """The lazily created context of this process."""
        if self._context is None:
            self._context = Context(self.settings)
        return self._context


STATE_KEY = pytest.StashKey[State]()
