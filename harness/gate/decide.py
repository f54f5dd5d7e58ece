"""The gate's decision: a pure function of the suite, the results and what the run asked for.

No pytest, no files: the same verdict comes out on a laptop, under ``pytest-xdist`` (results
reach the controller through ``report.user_properties``), in ``merge-harness combine`` and in CI.
``harness.gate.apply`` applies it at the end of a run.

The gate passes only when the run verified what it was asked to verify:

- a failed check fails it; an inconclusive one only with ``inconclusive_blocks``;
- a run in which no check produced a result (``--collect-only``, a ``-k`` that matches nothing,
  an interrupted run) has verified nothing: its outcome is ``not_run``, never ``passed``;
- without an explicit choice of families (``--merge-checks`` or ``checks`` in the gate file) the
  run is a full verification: every check of the :data:`REQUIRED` families that applies must
  produce a verdict, so a check skipped for want of an input (no ``--adapter``, transformers not
  installed, not enough memory) fails the gate and says what is missing;
- with an explicit choice the run is a partial gate: only the chosen families are required,
  each must verify something, and what was not verified is listed.

Checks deselected with ``-k``/``-m`` or a node id neither pass nor fail the gate (the user asked
for less), but they are listed, and they keep the lock file from being rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.run.check import Check
from harness.run.result import CheckResult, Family, Outcome

#: Families a full verification needs: without an explicit choice each must give a verdict.
REQUIRED: frozenset[Family] = frozenset(
    {Family.STRUCTURE, Family.SECURITY, Family.WEIGHTS, Family.HASH, Family.BEHAVIOUR}
)
#: The verdict's outcome when nothing ran.
NOT_RUN = "not_run"


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
    #: The families this run had to verify.
    required: list[str] = field(default_factory=list)
    #: Whether the families were chosen explicitly (a partial gate).
    partial: bool = False
    #: ``check id: what it needed`` for every check that applies but verified nothing.
    unverified: list[str] = field(default_factory=list)
    #: ``K/N`` for one part of a sharded run: it decides nothing but what it saw fail.
    part: str | None = None

    @property
    def ran(self) -> bool:
        """Whether any check of the suite produced a result."""
        return bool(self.counts)

    @property
    def outcome(self) -> str:
        """``passed``, ``failed``, or ``not_run`` when no check produced a result."""
        if not self.ran:
            return NOT_RUN
        if self.part is not None and self.passed:
            return "part"
        return "passed" if self.passed else "failed"

    def headline(self) -> str:
        """The one line the terminal, the summary and annotations lead with."""
        if not self.ran:
            return "gate: NO CHECKS RAN (nothing was verified)"
        if self.part is not None:
            if self.passed:
                return (
                    f"gate: part {self.part} recorded, no verdict yet (merge-harness combine"
                    " judges the parts together)"
                )
            return f"gate: part {self.part} FAILED ({len(self.reasons)} reason(s))"
        kind = "partial gate" if self.partial else "gate"
        if self.passed:
            return f"{kind}: PASSED"
        return f"{kind}: FAILED ({len(self.reasons)} reason(s))"

    def to_json(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "outcome": self.outcome,
            "reasons": list(self.reasons),
            "counts": dict(sorted(self.counts.items())),
            "missing": list(self.missing),
            "reused": list(self.reused),
            "required": list(self.required),
            "partial": self.partial,
            "unverified": list(self.unverified),
        }


def decide(
    suite: Sequence[Check],
    results: Mapping[str, CheckResult],
    inconclusive_blocks: bool,
    families: frozenset[Family] | None = None,
) -> Verdict:
    """The gate decision (see the module docstring); ``families`` is the explicit choice."""
    partial = families is not None
    required = families if families is not None else REQUIRED
    counts: dict[str, int] = {}
    reasons: list[str] = []
    missing: list[str] = []
    reused: list[str] = []
    unverified: list[str] = []
    verified: set[Family] = set()
    present = {check.family for check in suite}
    for check in suite:
        result = results.get(check.id)
        if result is None:
            missing.append(check.id)
            continue
        counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
        if result.outcome is not Outcome.SKIPPED:
            verified.add(check.family)
        if result.record is not None and result.record.reused:
            reused.append(check.id)
        if result.outcome is Outcome.FAILED:
            reasons.append(f"{check.id}: {result.message}")
        elif result.outcome is Outcome.INCONCLUSIVE and inconclusive_blocks:
            reasons.append(f"{check.id}: inconclusive (inconclusive_blocks): {result.message}")
        elif result.unverified and check.family in required:
            unverified.append(f"{check.id}: needs {', '.join(result.needs)}")
    if not counts:
        reasons.insert(0, "no checks ran: nothing was verified")
    elif not partial:
        reasons.extend(_grouped(suite, results, required))
    else:
        ran = present & required
        for family in sorted(ran - verified, key=lambda f: f.value):
            skipped = [results.get(c.id) for c in suite if c.family is family]
            # A family blocked by a failed root cause needs no reason of its own.
            if any(r is not None and r.blocked_by is None for r in skipped):
                reasons.append(f"{family.value}: verified nothing (every check skipped)")
    return Verdict(
        not reasons,
        reasons,
        counts,
        missing,
        reused,
        sorted(f.value for f in required),
        partial,
        unverified,
    )


def decide_part(
    suite: Sequence[Check],
    results: Mapping[str, CheckResult],
    label: str,
    recorded: bool,
    families: frozenset[Family] | None = None,
) -> Verdict:
    """The decision of part ``label`` of a sharded run (``--merge-shard``).

    A part verifies nothing on its own: its streamed checks are judged by ``combine``. It
    fails only on what it saw fail (a check of part 1, a part that could not be computed) and
    when its part is not in the report; it never reports ``passed``.
    """
    whole = decide(suite, results, False, families)
    reasons = [
        f"{check.id}: {result.message}"
        for check in suite
        if (result := results.get(check.id)) is not None and result.outcome is Outcome.FAILED
    ]
    if whole.ran and not recorded and not reasons:
        reasons.append(f"part {label} was not computed (its streamed checks did not run)")
    if not whole.ran:
        reasons.insert(0, "no checks ran: nothing was verified")
    # The families chosen travel with the part: combine's gate is partial exactly when the
    # run's would have been.
    return Verdict(
        not reasons, reasons, whole.counts, whole.missing, whole.reused, whole.required,
        whole.partial, [], label,
    )


def _grouped(
    suite: Sequence[Check], results: Mapping[str, CheckResult], required: frozenset[Family]
) -> list[str]:
    """One reason per family and missing input: ``weights not verified: needs --adapter (...)``."""
    groups: dict[tuple[Family, tuple[str, ...]], list[str]] = {}
    for check in suite:
        result = results.get(check.id)
        if result is not None and result.unverified and check.family in required:
            groups.setdefault((check.family, tuple(result.needs)), []).append(check.name)
    return [
        f"{family.value} not verified: needs {', '.join(needs)} ({', '.join(names)}); give it,"
        " or choose the families to run with --merge-checks for a partial gate"
        for (family, needs), names in groups.items()
    ]
