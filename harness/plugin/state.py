"""Per-run plugin state kept in ``config.stash``: options, the context, collected results."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from harness.context import Context, Options
from harness.result import Check, CheckResult


@dataclass
class State:
    """What the plugin knows during one run (one per process under xdist)."""

    options: Options
    suite: list[Check] = field(default_factory=list)
    #: check id -> result, filled on the controller from every report (xdist included).
    results: dict[str, CheckResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Lines the gate adds to the terminal summary (lock transitions, verdict).
    gate_lines: list[str] = field(default_factory=list)
    _context: Context | None = None

    def context(self) -> Context:
        """The lazily created context of this process."""
        if self._context is None:
            self._context = Context(self.options)
        return self._context

    def inconclusive_blocks(self) -> bool:
        """Whether an inconclusive outcome fails the run (gate setting; default no)."""
        return bool(self.options.settings.get("inconclusive_blocks", False))


STATE_KEY = pytest.StashKey[State]()
