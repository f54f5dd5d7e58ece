"""Reports of a run: the terminal summary, the JSON report, the markdown summary, JUnit properties.

The JSON report follows ``harness/schema/report.schema.json`` (``schema_version`` 1): the
verdict, the inputs and their digests, the lock file transition, the environment (versions,
device, dtype) and every check with its kind, outcome, one-line message, figures and metrics.
:func:`render_markdown` turns a report into GitHub-flavoured markdown for
``$GITHUB_STEP_SUMMARY``; both are pure functions of their inputs so CI tooling can call them.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from harness.result import Check, CheckResult, Outcome

if TYPE_CHECKING:
    from harness.context import Options
    from harness.gate import Verdict

SCHEMA = "merge-harness/report"
SCHEMA_VERSION = 1
DISTRIBUTION = "pytest-merge-harness"
#: Libraries whose versions are recorded (distribution names), when installed.
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "lm-eval",
    "datasets",
    "tokenizers",
    "accelerate",
    "numpy",
    "pytest",
    "hypothesis",
)
#: Outcome of a check that is part of the suite but produced no result (deselected).
NOT_RUN = "not_run"
_EMOJI = {
    "passed": "✅",
    "failed": "❌",
    "skipped": "⏭️",
    "inconclusive": "❔",
    "warning": "⚠️",
    NOT_RUN: "➖",
}


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
        for key in ("merged_digest", "base_digest", "adapter_digest"):
            if key in result.metrics:
                digests[key] = str(result.metrics[key])
    for key, value in sorted(digests.items()):
        lines.append(f"{key.replace('_', ' ')}: {value}")
    return lines


# ----------------------------------------------------------------------------- environment


def harness_version() -> str:
    """The installed version of merge-harness."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that affect results (installed ones only; nothing imported)."""
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment(options: Options | None) -> dict[str, Any]:
    """Python, platform, device, dtype and library versions of this run."""
    return {
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "device": options.device if options is not None else "cpu",
        "dtype": options.dtype if options is not None else None,
        "harness": harness_version(),
        "versions": library_versions(),
    }


# ----------------------------------------------------------------------------- JSON


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity: write them as strings so the report stays strict JSON.
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def public_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics without private transport keys (those starting with ``_``)."""
    return {k: _clean(v) for k, v in metrics.items() if not str(k).startswith("_")}


def check_entry(check: Check, result: CheckResult | None) -> dict[str, Any]:
    """One check of the report."""
    entry: dict[str, Any] = {
        "id": check.id,
        "family": check.family,
        "name": check.name,
        "kind": check.kind.value,
        "description": check.description,
    }
    if result is None:
        entry.update(
            outcome=NOT_RUN,
            message="did not run (deselected or interrupted)",
            details=[],
            metrics={},
            seconds=None,
        )
        return entry
    seconds = result.metrics.get("seconds")
    entry.update(
        outcome=result.outcome.value,
        message=result.message,
        details=list(result.details),
        metrics=public_metrics(result.metrics),
        seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
    )
    return entry


def _digests(results: Iterable[CheckResult]) -> dict[str, str]:
    digests: dict[str, str] = {}
    for result in results:
        for model in ("merged", "base", "adapter"):
            value = result.metrics.get(f"{model}_digest")
            if isinstance(value, str):
                digests[model] = value
    return dict(sorted(digests.items()))


def build_report(
    suite: Sequence[Check],
    results: Mapping[str, CheckResult],
    options: Options | None = None,
    *,
    verdict: Verdict | None = None,
    exit_status: int | None = None,
    lock: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    artifacts: Mapping[str, str] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """The JSON report (a plain dict following ``report.schema.json``)."""
    if verdict is None:
        from harness.gate import decide

        blocks = bool(options and options.gate and options.gate.inconclusive_blocks)
        verdict = decide(suite, results, blocks)
    gate = options.gate if options is not None else None
    inputs = {
        "merged": str(options.merged) if options and options.merged else None,
        "base": str(options.base) if options and options.base else None,
        "adapter": str(options.adapter) if options and options.adapter else None,
        "config": str(gate.source) if gate and gate.source else None,
    }
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "harness_version": harness_version(),
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": {
            **verdict.to_json(),
            "exit_status": exit_status if exit_status is not None else (0 if verdict.passed else 1),
        },
        "inputs": inputs,
        "digests": _digests(results.values()),
        "lock": _clean(dict(lock)) if lock else {"path": None, "status": "off", "updated": False},
        "environment": environment(options),
        "checks": [check_entry(check, results.get(check.id)) for check in suite],
        "notes": list(notes),
        "artifacts": dict(artifacts or {}),
    }


def dumps_report(report: Mapping[str, Any]) -> str:
    """The report as indented, strict JSON with a trailing newline."""
    return json.dumps(report, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------- markdown


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
        if check.get("kind") != "benchmark":
            continue
        metrics = check.get("metrics", {})
        values = metrics.get("values", {}) if isinstance(metrics, Mapping) else {}
        reused = "♻️ reused" if metrics.get("reused") else "evaluated"
        rows.append(
            f"| {_EMOJI.get(check['outcome'], '')} | `{_cell(check['name'])}` |"
            f" {_fmt(values.get('merged'))} | {_fmt(values.get('base'))} |"
            f" {_fmt(values.get('adapter'))} | {reused} | {_cell(check['message'])} |"
        )
    return rows


def render_markdown(report: Mapping[str, Any]) -> str:
    """A GitHub-flavoured markdown summary of a JSON report (for ``$GITHUB_STEP_SUMMARY``)."""
    verdict = report.get("verdict", {})
    passed = verdict.get("outcome") == "passed"
    checks: list[Mapping[str, Any]] = list(report.get("checks", []))
    counts = verdict.get("counts", {})
    out: list[str] = []
    out.append(
        f"## {'✅' if passed else '❌'} merge-harness: gate {'passed' if passed else 'failed'}"
    )
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
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- JUnit


def junit_properties(check: Check, result: CheckResult) -> list[tuple[str, str]]:
    """``(name, value)`` pairs that pytest's ``--junitxml`` writes as ``<property>`` elements.

    The kind, outcome and message of the check, plus every scalar metric as
    ``merge.metric.<key>`` (lists, tables and private keys are left to the JSON report).
    """
    props = [
        ("merge.kind", check.kind.value),
        ("merge.outcome", result.outcome.value),
        ("merge.message", result.message),
    ]
    for key, value in sorted(result.metrics.items()):
        if str(key).startswith("_") or key == "traceback":
            continue
        if isinstance(value, (bool, int, float, str)):
            props.append((f"merge.metric.{key}", str(_clean(value))))
    return props
