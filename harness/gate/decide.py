"""The gate's decision: a pure function of the suite, the results and the configuration.

No pytest, no files: the same verdict comes out on a laptop, under ``pytest-xdist`` (results
reach the controller through ``report.user_properties``), in ``merge-harness combine`` and in CI.
The plugin applies it at the end of a session (``harness.plugin.finish``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.run.check import Check
from harness.run.result import CheckResult, Outcome


@dataclass
class Verdict:
    """The gate's decision for one run."""

    passed: bool
    #: One line per reason the gate failed (empty when it passed).
    reasons: list[str] = field(default_factory=list)
    #: outcome value -> number of checks.
    counts: dict[str, int] = field(default_factory=dict)
    #: Checks of the suite that produced no result (deselected, interrupted).
    missing: list[str] = field(default_factory=list)
    #: Benchmark checks whose results were reused from the lock (evaluation skipped).
    reused: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "outcome": "passed" if self.passed else "failed",
            "reasons": list(self.reasons),
            "counts": dict(sorted(self.counts.items())),
            "missing": list(self.missing),
            "reused": list(self.reused),
        }


def decide(
    suite: Sequence[Check], results: Mapping[str, CheckResult], inconclusive_blocks: bool
) -> Verdict:
    """The gate decision: pure function of the checks, their results and the configuration.

    A failed check fails the gate; an inconclusive one fails it only when
    ``inconclusive_blocks``. Checks that did not run (deselected with ``-k``) neither pass nor
    fail it, but they are listed (and they keep the lock file from being rewritten).
    """
    counts: dict[str, int] = {}
    reasons: list[str] = []
    missing: list[str] = []
    reused: list[str] = []
    for check in suite:
        result = results.get(check.id)
        if result is None:
            missing.append(check.id)
            continue
        counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
        if result.record is not None and result.record.reused:
            reused.append(check.id)
        if result.outcome is Outcome.FAILED:
            reasons.append(f"{check.id}: {result.message}")
        elif result.outcome is Outcome.INCONCLUSIVE and inconclusive_blocks:
            reasons.append(f"{check.id}: inconclusive (inconclusive_blocks): {result.message}")
    return Verdict(not reasons, reasons, counts, missing, reused)
