"""The gate's markdown summary (for ``$GITHUB_STEP_SUMMARY``), rendered from a JSON report.

A pure function of the report, so CI tooling can render a report written elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.gate.report import NOT_RUN
from harness.text import safe_text

_EMOJI = {
    "passed": "✅",
    "failed": "❌",
    "skipped": "⏭️",
    "inconclusive": "❔",
    "warning": "⚠️",
    NOT_RUN: "➖",
}


def _cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    return str(value)


def _benchmark_rows(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for check in checks:
        record = check.get("record")
        if check.get("family") != "benchmark" or not isinstance(record, Mapping):
            continue
        values = record.get("values", {})
        reused = "♻️ reused" if record.get("reused") else "evaluated"
        rows.append(
            f"| {_EMOJI.get(check['outcome'], '')} | `{_cell(check['name'])}` |"
            f" {_fmt(values.get('merged'))} | {_fmt(values.get('base'))} |"
            f" {_fmt(values.get('adapter'))} | {reused} | {_cell(check['message'])} |"
        )
    return rows


def render_markdown(report: Mapping[str, Any]) -> str:
    """A GitHub-flavoured markdown summary of a JSON report (for ``$GITHUB_STEP_SUMMARY``)."""
    verdict = report.get("verdict", {})
    outcome = verdict.get("outcome")
    checks: list[Mapping[str, Any]] = list(report.get("checks", []))
    counts = verdict.get("counts", {})
    out: list[str] = []
    kind = "partial gate" if verdict.get("partial") else "gate"
    shard = report.get("shard") or {}
    headline = {
        "passed": f"✅ merge-harness: {kind} passed",
        "part": (
            f"🧩 merge-harness: part {shard.get('index')}/{shard.get('count')} recorded (no"
            " verdict: merge-harness combine judges the parts)"
        ),
        "not_run": "⛔ merge-harness: no checks ran (nothing was verified)",
    }.get(str(outcome), f"❌ merge-harness: {kind} failed")
    out.append(f"## {headline}")
    out.append("")
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    inputs = report.get("inputs", {})
    named = " · ".join(f"**{k}** `{_cell(v)}`" for k, v in inputs.items() if v and k != "config")
    if named:
        out.append(named)
        out.append("")
    out.append(
        f"{len(checks)} checks: {tally or 'none ran'} (exit status {verdict.get('exit_status')})"
    )
    out.append("")
    reasons = verdict.get("reasons", [])
    if reasons:
        out.append("### Why the gate failed")
        out.append("")
        out.extend(f"- {_cell(r)}" for r in reasons)
        out.append("")
    unverified = verdict.get("unverified", [])
    if unverified and verdict.get("partial"):
        out.append(
            f"Partial gate ({', '.join(verdict.get('required', []))}): not verified:"
        )
        out.append("")
        out.extend(f"- {_cell(u)}" for u in unverified)
        out.append("")
    if checks:
        out.append("| | Check | Result |")
        out.append("|---|---|---|")
        for check in checks:
            out.append(
                f"| {_EMOJI.get(str(check.get('outcome')), '')} | `{_cell(check.get('id'))}` |"
                f" {_cell(check.get('message', ''))} |"
            )
        out.append("")
    rows = _benchmark_rows(checks)
    if rows:
        out.append("### Benchmarks")
        out.append("")
        if verdict.get("reused"):
            out.append(
                f"{len(verdict['reused'])} result(s) reused from the lock file: the digests are"
                " unchanged, so the evaluation was skipped."
            )
            out.append("")
        out.append("| | Metric | merged | base | adapter | source | verdict |")
        out.append("|---|---|---|---|---|---|---|")
        out.extend(rows)
        out.append("")
    failed = [
        c for c in checks if c.get("outcome") in ("failed", "inconclusive") and c.get("details")
    ]
    if failed:
        out.append("<details><summary>Figures of the checks that did not pass</summary>")
        out.append("")
        for check in failed:
            out.append(f"**`{_cell(check['id'])}`**")
            out.append("")
            out.append("```")
            out.extend(str(d) for d in check["details"])
            out.append("```")
            out.append("")
        out.append("</details>")
        out.append("")
    lock = report.get("lock", {})
    if lock and lock.get("status") not in (None, "off"):
        text = {
            "absent": "no lock file yet",
            "match": "digests match the lock",
            "changed": "digests changed since the lock: " + ", ".join(lock.get("changed", [])),
        }.get(str(lock.get("status")), str(lock.get("status")))
        if lock.get("updated"):
            text += f"; lock file {lock.get('action', 'written')}"
        elif lock.get("reason"):
            text += f"; lock file not updated ({lock['reason']})"
        out.append(f"**Lock** `{_cell(lock.get('path'))}`: {_cell(text)}")
        out.append("")
    digests = report.get("digests", {})
    if digests:
        out.append("| Digest | sha256 |")
        out.append("|---|---|")
        out.extend(f"| {k} | `{v}` |" for k, v in digests.items())
        out.append("")
    env = report.get("environment", {})
    if env:
        out.append("<details><summary>Environment</summary>")
        out.append("")
        out.append(
            f"merge-harness {env.get('harness')}, Python {env.get('python')} on"
            f" {env.get('platform')}, device `{env.get('device')}`, dtype"
            f" `{env.get('dtype') or 'as stored'}`"
        )
        out.append("")
        versions = env.get("versions", {})
        if versions:
            out.append("| Library | Version |")
            out.append("|---|---|")
            out.extend(f"| {k} | {v} |" for k, v in versions.items())
            out.append("")
        out.append("</details>")
        out.append("")
    plot = report.get("artifacts", {}).get("plot")
    if plot:
        out.append(f"Per-layer weight-difference plot: `{_cell(plot)}`")
        out.append("")
    # one place for the whole page: whatever a check quoted from an input is escaped and inert
    return safe_text("\n".join(out).rstrip()) + "\n"
