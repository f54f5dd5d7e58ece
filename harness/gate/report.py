"""Reports of a run: the terminal summary, the JSON report and JUnit properties.

The JSON report follows ``harness/schema/report.schema.json`` (``schema_version`` 2): the
verdict, the inputs and their digests, the lock file transition, the environment (versions,
device, dtype) and every check with its family, outcome, one-line message, figures and typed
evidence. ``harness.gate.markdown`` renders it for ``$GITHUB_STEP_SUMMARY``; both are pure
functions of their inputs so CI tooling can call them.
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

from harness.run.check import Check
from harness.run.result import CheckResult, Outcome
from harness.text import safe_line

if TYPE_CHECKING:
    from harness.gate.decide import Verdict
    from harness.run.settings import Settings

SCHEMA = "merge-harness/report"
SCHEMA_VERSION = 2
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
#: Longest line of the terminal summary (a check's message is bounded before it gets there).
LINE = 2000
#: Outcome of a check that is part of the suite but produced no result (deselected).
NOT_RUN = "not_run"
#: The mark each outcome gets in the terminal summary.
MARKS: dict[Outcome, str] = {
    Outcome.PASSED: "PASS",
    Outcome.FAILED: "FAIL",
    Outcome.SKIPPED: "skip",
    Outcome.INCONCLUSIVE: "INCONCLUSIVE",
    Outcome.WARNING: "WARN",
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
        lines.append(
            safe_line(f"{marks[result.outcome]} {check.id.ljust(width)}  {result.message}", LINE)
        )
    for model, digest in collect_digests(results.values()).items():
        lines.append(f"{model} digest: {digest}")
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


def environment(settings: Settings | None) -> dict[str, Any]:
    """Python, platform, device, dtype and library versions of this run."""
    return {
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "device": settings.device if settings is not None else "cpu",
        "dtype": settings.dtype if settings is not None else None,
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


def check_entry(check: Check, result: CheckResult | None) -> dict[str, Any]:
    """One check of the report."""
    entry: dict[str, Any] = {
        "id": check.id,
        "family": check.family.value,
        "name": check.name,
        "description": check.description,
    }
    if result is None:
        entry.update(
            outcome=NOT_RUN,
            message="did not run (deselected or interrupted)",
            details=[],
            metrics={},
            digests={},
            layers=[],
            lock=None,
            record=None,
            needs=[],
            blocked_by=None,
            seconds=None,
        )
        return entry
    entry.update(
        outcome=result.outcome.value,
        message=result.message,
        details=list(result.details),
        metrics=_clean(result.metrics),
        digests=dict(result.digests),
        layers=_clean(result.layers),
        lock=None if result.lock is None else _lock_view(result),
        record=None if result.record is None else _clean(result.record.to_json()),
        needs=list(result.needs),
        blocked_by=result.blocked_by,
        seconds=result.seconds,
    )
    return entry


def _lock_view(result: CheckResult) -> dict[str, Any]:
    """The lock evidence as reported: without the per-tensor digests (those go to the lock)."""
    assert result.lock is not None
    return {"path": result.lock.path, "status": result.lock.status, "changed": result.lock.changed}


def collect_digests(results: Iterable[CheckResult]) -> dict[str, str]:
    """Every model digest any check computed, by model name (sorted)."""
    digests: dict[str, str] = {}
    for result in results:
        digests.update(result.digests)
    return dict(sorted(digests.items()))


def build_report(
    suite: Sequence[Check],
    results: Mapping[str, CheckResult],
    settings: Settings | None,
    verdict: Verdict,
    *,
    exit_status: int | None = None,
    lock: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    artifacts: Mapping[str, str] | None = None,
    created: str | None = None,
    fingerprint: Mapping[str, str] | None = None,
    part: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report (a plain dict following ``report.schema.json``).

    ``fingerprint`` identifies the inputs and settings (what ``combine`` compares across
    reports); a sharded run adds ``shard`` and its ``part`` of the streamed pass.
    """
    config = settings.config.source if settings is not None else None
    inputs = {
        "merged": str(settings.merged) if settings and settings.merged else None,
        "base": str(settings.base) if settings and settings.base else None,
        "adapter": str(settings.adapter) if settings and settings.adapter else None,
        "config": str(config) if config else None,
    }
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "harness_version": harness_version(),
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": {
            **verdict.to_json(),
            "exit_status": exit_status if exit_status is not None else (0 if verdict.passed else 1),
        },
        "inputs": inputs,
        "digests": collect_digests(results.values()),
        "lock": _clean(dict(lock)) if lock else {"path": None, "status": "off", "updated": False},
        "environment": environment(settings),
        "checks": [check_entry(check, results.get(check.id)) for check in suite],
        "notes": list(notes),
        "artifacts": dict(artifacts or {}),
        "fingerprint": dict(fingerprint) if fingerprint is not None else None,
    }
    shard = settings.shard if settings is not None else None
    if shard is not None:
        report["shard"] = {"index": shard[0], "count": shard[1]}
        report["part"] = dict(part) if part is not None else None
    return report


def dumps_report(report: Mapping[str, Any]) -> str:
    """The report as indented, strict JSON with a trailing newline."""
    return json.dumps(report, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------- markdown


# ----------------------------------------------------------------------------- JUnit


def junit_properties(check: Check, result: CheckResult) -> list[tuple[str, str]]:
    """``(name, value)`` pairs that pytest's ``--junitxml`` writes as ``<property>`` elements.

    The family, outcome and message of the check, plus every scalar metric as
    ``merge.metric.<key>`` (lists and tables are left to the JSON report).
    """
    props = [
        ("merge.family", check.family.value),
        ("merge.outcome", result.outcome.value),
        ("merge.message", result.message),
    ]
    scalars = dict(result.metrics)
    if result.record is not None:
        scalars.update(value=result.record.value, reused=result.record.reused)
    for key, value in sorted(scalars.items()):
        if isinstance(value, (bool, int, float, str)):
            props.append((f"merge.metric.{key}", str(_clean(value))))
    return props
