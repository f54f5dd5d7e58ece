"""``merge-harness combine``: judge the parts of a sharded run together, as one run would.

    merge-harness combine PART.json... [--merge-report F] [--merge-summary F] [--junitxml F]
                          [--merge-lock F] [--update-merge-lock] [--merge-config F]

Each ``pytest --merge-shard K/N --merge-report PART.json`` job wrote part K of the streamed pass
(per-tensor verdicts, digests, NaN/Inf findings) and, in part 1, the results of the checks that
need no streamed pass. Reports of runs of their own (``--merge-checks behaviour,benchmark``)
may join. Combine checks that the inputs form one whole run, recomputes the canonical digests
from the per-tensor digests, judges the streamed checks on the combined pass with the same
code a single run uses, then applies the gate and the lock file and writes the same outputs.

Inputs that do not fit together fail the check ``merge::structure::parts`` with a one-line
cause (exit 1): a report that cannot be read, from another harness version, inputs or
settings; a part missing, given twice or not computed; a tensor covered twice or by no part;
a check reported by two inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.checks import FAMILIES, build_suite
from harness.checks.passes import BASE_SCAN, MERGED_SCAN, ORACLE
from harness.checks.split import ADAPTER_DIGEST, config_digest, fingerprint
from harness.errors import HarnessError, one_line
from harness.gate.apply import apply_gate
from harness.gate.decide import REQUIRED
from harness.gate.junit import write_junit
from harness.gate.report import MARKS, SCHEMA, SCHEMA_VERSION, harness_version, summary_lines
from harness.io.files import read_json
from harness.oracle.parts import Combined, PartResult, combine_parts
from harness.oracle.stream import OraclePass
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family
from harness.run.runner import run_check, sanitize
from harness.run.settings import Request, Settings, resolve
from harness.run.state import State
from harness.text import safe_line

#: The check that stands for the parts fitting together.
PARTS_CHECK = Check(
    Family.STRUCTURE, "parts", "the partial reports form one whole run of the same inputs",
    lambda ctx: CheckResult.failed("not run"),
)


@dataclasses.dataclass
class Inputs:
    """The reports given to combine, read and checked to belong together."""

    reports: list[tuple[str, dict[str, Any]]]
    parts: list[tuple[str, PartResult]]
    fingerprint: dict[str, str]


def _read(path: Path) -> dict[str, Any]:
    """One report, as a dict of our schema and version; a HarnessError naming what is wrong."""
    try:
        data = read_json(path)
    except HarnessError as exc:
        raise HarnessError(f"{path.name} is corrupt: {one_line(exc).split(': ', 1)[-1]}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise HarnessError(f"{path.name} is not a merge-harness report")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise HarnessError(
            f"{path.name} has report schema {data.get('schema_version')!r}, this combine reads"
            f" {SCHEMA_VERSION}"
        )
    version = data.get("harness_version")
    if version != harness_version():
        raise HarnessError(
            f"{path.name} was written by merge-harness {version}, this is {harness_version()}:"
            " run every part and the combine with the same version"
        )
    return data


def _part(name: str, report: Mapping[str, Any]) -> PartResult | None:
    """The part a report carries (None for a report of a whole run)."""
    shard = report.get("shard")
    if shard is None:
        return None
    payload = report.get("part")
    label = f"{shard.get('index')}/{shard.get('count')}" if isinstance(shard, dict) else "?"
    if payload is None:
        reasons = report.get("verdict", {}).get("reasons") or ["its streamed checks did not run"]
        raise HarnessError(f"part {label} ({name}) was not computed: {reasons[0]}")
    try:
        part = PartResult.from_json(payload)
    except HarnessError as exc:
        raise HarnessError(f"{name} is corrupt: its part has {exc}") from None
    if isinstance(shard, dict) and (shard.get("index"), shard.get("count")) != (
        part.index, part.count
    ):
        raise HarnessError(f"{name} is corrupt: it says part {label} but holds part {part.label}")
    return part


def gather(paths: Sequence[Path]) -> Inputs:
    """Read the reports and check they come from one run of the same inputs and settings."""
    reports = [(p.name, _read(p)) for p in paths]
    first_name, first = reports[0]
    fingerprint = first.get("fingerprint")
    for name, report in reports:
        found = report.get("fingerprint")
        if not isinstance(found, dict):
            raise HarnessError(f"{name} has no input fingerprint (its run could not read them)")
        if found != fingerprint:
            assert isinstance(fingerprint, dict)
            differ = sorted(k for k in set(found) | set(fingerprint)
                            if found.get(k) != fingerprint.get(k))
            raise HarnessError(
                f"{name} and {first_name} were run on other inputs or settings (they differ in"
                f" {', '.join(differ)})"
            )
    parts = [(name, part) for name, report in reports
             if (part := _part(name, report)) is not None]
    if not parts:
        raise HarnessError("no part of a sharded run among the reports (--merge-shard K/N)")
    assert isinstance(fingerprint, dict)
    return Inputs(reports, parts, {str(k): str(v) for k, v in fingerprint.items()})


def _families(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> frozenset[Family] | None:
    """The families the runs chose together (None: a full gate).

    A full gate when any input ran every family that applies, or when the inputs' choices
    together cover every family a full gate requires (parts with the streamed families and a
    job of its own with the forward passes).
    """
    chosen: set[Family] = set()
    known = {f.value: f for f in Family}
    for _, report in reports:
        verdict = report.get("verdict", {})
        if not verdict.get("partial"):
            return None
        chosen.update(known[f] for f in verdict.get("required", []) if f in known)
    if chosen >= REQUIRED:
        return None
    return frozenset(chosen) or None


def _settings(args: argparse.Namespace, inputs: Inputs) -> Settings:
    """The combine's settings: the parts' inputs and families, its own outputs and lock."""
    recorded = inputs.reports[0][1].get("inputs", {})

    def path(key: str) -> Path | None:
        value = recorded.get(key)
        return Path(value) if isinstance(value, str) else None

    request = Request(
        merged=path("merged"),
        base=path("base"),
        adapter=path("adapter"),
        config_path=args.merge_config,
        lock_path=args.merge_lock,
        update_lock=args.update_merge_lock,
        report_path=args.merge_report,
        summary_path=args.merge_summary,
        overrides={"families": _families(inputs.reports)},
    )
    settings = resolve(request, rootdir=Path.cwd())
    recorded_config = inputs.fingerprint.get("config")
    if config_digest(settings) != recorded_config:
        found = settings.config.source
        raise HarnessError(
            f"the parts were run with {'a gate configuration' if recorded_config else 'no gate'}"
            f" file and this combine reads {found if found else 'none'}: give the same one"
            " (--merge-config)"
        )
    return settings


def _suite(settings: Settings, reports: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Check]:
    """Every check any input ran, in family order; streamed ones with their real code."""
    known = {c.id: c for c in build_suite(dataclasses.replace(settings, families=None,
                                                              lock_requested=True))}
    seen: dict[str, Check] = {}
    for _, report in reports:
        for entry in report.get("checks", []):
            check_id = str(entry.get("id"))
            if check_id in seen:
                continue
            family = Family(str(entry.get("family")))
            seen[check_id] = known.get(check_id) or Check(
                family, str(entry.get("name")), str(entry.get("description")),
                PARTS_CHECK.run,
            )
    lock = known.get("merge::lock::digests")
    if lock is not None and settings.runs(Family.LOCK) and (
        settings.update_lock or settings.lock_requested or
        (settings.lock_path is not None and settings.lock_path.exists())
    ):
        seen.setdefault(lock.id, lock)
    order = list(FAMILIES)
    return sorted(seen.values(), key=lambda c: order.index(c.family))


def _recorded(suite: Sequence[Check], inputs: Inputs) -> dict[str, CheckResult]:
    """The results of the checks that need no streamed pass, each from the one input that ran it."""
    streamed = {c.id for c in suite if c.streamed}
    results: dict[str, CheckResult] = {}
    source: dict[str, str] = {}
    for name, report in inputs.reports:
        for entry in report.get("checks", []):
            check_id = str(entry.get("id"))
            if check_id in streamed or entry.get("outcome") == "not_run":
                continue
            if check_id in results:
                raise HarnessError(f"{check_id} was run by both {source[check_id]} and {name}")
            try:
                # Reports are files from other jobs: bounded and escaped like a result made here.
                results[check_id] = sanitize(CheckResult.from_json(entry))
            except (KeyError, TypeError, ValueError) as exc:
                raise HarnessError(f"{name} is corrupt: {check_id}: {exc}") from None
            source[check_id] = name
    return results


def _finish(settings: Settings, combined: Combined, recorded: Mapping[str, str]) -> str | None:
    """Name the causes that need every tensor's verdict (experts, a wrong base) on failures.

    They re-read a few tensors, so the models must be at the recorded paths; a note says so
    when they are not (the verdicts stand; only those causes go unnamed).
    """
    found = combined.oracle
    if found is None or all(t.ok for t in found.tensors):
        return None
    ctx = Context(settings)
    try:
        same = {k: v for k, v in fingerprint(ctx).items() if k in ("merged", "base", "adapter")}
        if any(recorded.get(k) != v for k, v in same.items()):
            return "the models at the recorded paths are not the ones the parts read"
        whole = OraclePass(ctx.merged(), ctx.base(), [ctx.adapter()], found.k, scans=False,
                           workers=1)
        whole.finish(found)
    except Exception as exc:
        return (
            "causes that need several tensors (experts left unmerged, another base) were not"
            f" looked for: the models cannot be read here ({one_line(exc)})"
        )
    return None


def _judge(suite: Sequence[Check], settings: Settings, combined: Combined,
           recorded: Mapping[str, str]) -> dict[str, CheckResult]:
    """Run the streamed checks on the combined pass (nothing is read from the models)."""
    ctx = Context(settings)
    if combined.oracle is not None:
        ctx.seed(ORACLE, combined.oracle)
    ctx.seed(MERGED_SCAN, combined.merged)
    if combined.base is not None:
        ctx.seed(BASE_SCAN, combined.base)
    if "adapter" in recorded:
        ctx.seed(ADAPTER_DIGEST, recorded["adapter"])
    return {c.id: run_check(c, ctx) for c in suite if c.streamed}


def combine_run(args: argparse.Namespace) -> tuple[State, int]:
    """Combine the reports named by ``args``; the state judged and the exit status."""
    paths = [Path(p) for p in args.parts]
    try:
        inputs = gather(paths)
        settings = _settings(args, inputs)
        combined = combine_parts(inputs.parts)
        suite = _suite(settings, inputs.reports)
        results = _recorded(suite, inputs)
    except HarnessError as exc:
        state = _refused(args, one_line(exc))
        return state, apply_gate(state, 0) or 0
    note = _finish(settings, combined, inputs.fingerprint)
    results.update(_judge(suite, settings, combined, inputs.fingerprint))
    results[PARTS_CHECK.id] = CheckResult.passed(
        f"{len(inputs.parts)} part(s) of one plan and {len(inputs.reports) - len(inputs.parts)}"
        f" other report(s) combined: {len(combined.merged.manifest.tensors)} merged tensor(s),"
        " each covered once",
        parts=combined.parts,
    )
    state = State(settings, [PARTS_CHECK, *suite], results, fingerprint=inputs.fingerprint)
    state.notes.append(f"combined: {', '.join(p.name for p in paths)}")
    if note is not None:
        state.notes.append(note)
    return state, apply_gate(state, 0) or 0


def _refused(args: argparse.Namespace, cause: str) -> State:
    """The state of a combine whose inputs do not fit: one failed check naming why."""
    settings = Settings(
        report_path=args.merge_report, summary_path=args.merge_summary,
        lock_path=args.merge_lock, update_lock=args.update_merge_lock,
    )
    return State(settings, [PARTS_CHECK], {PARTS_CHECK.id: sanitize(CheckResult.failed(cause))})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``combine`` subcommand's arguments."""
    parser.add_argument("parts", metavar="PART.json", nargs="+",
                        help="reports of the parts (--merge-shard K/N --merge-report) and of"
                        " runs of their own (for example the behaviour family)")
    parser.add_argument("--merge-report", type=Path, metavar="PATH",
                        help="write the combined JSON report")
    parser.add_argument("--merge-summary", type=Path, metavar="PATH",
                        help="write the markdown summary (for $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--junitxml", type=Path, metavar="PATH",
                        help="write a JUnit XML file of the checks")
    parser.add_argument("--merge-lock", type=Path, metavar="FILE",
                        help="lock file of approved digests and results")
    parser.add_argument("--update-merge-lock", action="store_true",
                        help="record the combined digests and results in the lock file")
    parser.add_argument("--merge-config", type=Path, metavar="FILE",
                        help="the gate configuration the parts ran with (default: discovered"
                        " from the current folder, as pytest does)")


def run(args: argparse.Namespace) -> int:
    """Combine, print the summary and the gate's lines, write JUnit; the exit status."""
    state, status = combine_run(args)
    for line in summary_lines(state.suite, state.results, MARKS):
        print(line)
    for line in state.gate_lines:
        print(safe_line(line))
    if args.junitxml is not None:
        try:
            write_junit(args.junitxml, state.suite, state.results)
            print(safe_line(f"--junitxml: wrote {args.junitxml}"))
        except HarnessError as exc:
            print(safe_line(f"--junitxml: {one_line(exc)}"))
            status = 1
    return status
