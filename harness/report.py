"""Human-readable reports of a run: the terminal summary (JSON and markdown live in the gate)."""

from __future__ import annotations

from collections.abc import Mapping

from harness.result import Check, CheckResult, Outcome


def summary_lines(
    suite: list[Check], results: Mapping[str, CheckResult], marks: Mapping[Outcome, str]
) -> list[str]:
    """One line per check that ran (mark, id, message), then the digests and sizes."""
    lines: list[str] = []
    width = max((len(c.id) for c in suite if c.id in results), default=0)
    for check in suite:
        result = results.get(check.id)
        if result is None:
            continue
        lines.append(f"{marks[result.outcome]} {check.id.ljust(width)}  {result.message}")
    digests = {}
    for result in results.values():
        for key in ("merged_digest", "base_digest"):
            if key in result.metrics:
                digests[key] = str(result.metrics[key])
    for key, value in sorted(digests.items()):
        lines.append(f"{key.replace('_', ' ')}: {value}")
    return lines
