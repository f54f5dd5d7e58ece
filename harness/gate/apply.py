"""The end of a run: apply the verdict, the lock file and the reports, return the exit status.

The verdict itself is ``harness.gate.decide`` (pure); this module applies it once, after every
result has arrived (on the pytest controller, or in ``merge-harness combine``): it writes the
lock file when asked and allowed, the JSON report, the markdown summary and the
weight-difference plot, and returns the exit status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.errors import HarnessError, one_line
from harness.extras import install_hint
from harness.gate import github
from harness.gate.decide import Verdict, decide, decide_part
from harness.gate.lockfile import CHECK_ID, build_lock, read_lock, write_lock
from harness.gate.markdown import render_markdown
from harness.gate.plot import layer_rows, plot_layers
from harness.gate.report import build_report, dumps_report, harness_version, library_versions
from harness.io.output import write_text_atomic
from harness.run.result import Outcome
from harness.run.state import State
from harness.text import safe_line

#: pytest's status for a run that collected nothing (``ExitCode.NO_TESTS_COLLECTED``).
NO_TESTS = 5
#: Exit statuses after which the lock may be written (tests ran to the end).
_COMPLETED = (0, 1)


def apply_gate(state: State, exitstatus: int) -> int | None:
    """Decide, write lock/report/summary/plot, and return the exit status (None: pytest's own).

    Runs once, on the controller. The lock is written only with ``--update-merge-lock``, only
    when every check ran, the gate passed, nothing was inconclusive and the run completed;
    otherwise the update has failed, which fails the run (an update job must not go green
    having recorded nothing). A gate that fails while pytest would exit 0 turns the status to
    1; a run in which no check produced a result exits 5 ("no checks ran"); an I/O error
    writing an output the user asked for is reported and also gives 1.
    """
    settings = state.settings
    gate = settings.config
    if not state.suite:
        return None
    if settings.shard is not None:
        label = f"{settings.shard[0]}/{settings.shard[1]}"
        verdict = decide_part(
            state.suite, state.results, label, state.part is not None, settings.families
        )
    else:
        verdict = decide(state.suite, state.results, gate.inconclusive_blocks, settings.families)
    lines = state.gate_lines
    status: int | None = None
    if verdict.reused:
        _say(
            lines,
            f"benchmark: {len(verdict.reused)} result(s) reused from the lock file (digests"
            " unchanged: evaluation skipped)"
        )
    lock_info = _lock_transition(state, verdict, exitstatus, lines)
    if lock_info.get("error") or (settings.update_lock and not lock_info.get("updated")):
        status = 1
    artifacts: dict[str, str] = {}
    plot_target = gate.plot
    if plot_target is None and settings.report_path is not None:
        plot_target = settings.report_path.with_name(settings.report_path.stem + "-layers.png")
    if plot_target is not None:
        written = _write_plot(state, plot_target, explicit=gate.plot is not None, lines=lines)
        if written:
            artifacts["plot"] = str(written)
    report = build_report(
        state.suite,
        state.results,
        settings,
        verdict,
        exit_status=_final_status(exitstatus, verdict, status, state.other_tests),
        lock=lock_info,
        notes=list(state.notes),
        artifacts=artifacts,
        fingerprint=state.fingerprint,
        part=state.part,
    )
    if github.in_actions():
        # Workflow commands at the start of a summary line: GitHub turns them into annotations
        # on the run (the gate command hides GITHUB_ACTIONS from its pytest, so no duplicates).
        lines.extend(github.report_annotations(report))
    for path, text, label in (
        (settings.report_path, None, "--merge-report"),
        (settings.summary_path, render_markdown(report), "--merge-summary"),
    ):
        if path is None:
            continue
        try:
            write_text_atomic(path, dumps_report(report) if text is None else text)
            _say(lines, f"{label}: wrote {path}")
        except HarnessError as exc:
            _say(lines, f"{label}: {one_line(exc)}")
            status = 1
    for reason in verdict.reasons:
        if " not verified: " in reason:
            _say(lines, f"  {reason}")
    if verdict.unverified and verdict.partial:
        lines.append(f"partial gate: {len(verdict.unverified)} check(s) not verified:")
        for line in verdict.unverified:
            _say(lines, f"  {line}")
    if verdict.missing and verdict.ran:
        lines.append(f"{len(verdict.missing)} check(s) deselected or not run")
    if not verdict.ran and state.other_tests:
        lines.append(
            f"gate: not applied: no merge check selected ({state.other_tests} other test(s) ran)"
        )
    else:
        lines.append(verdict.headline())
    final = _final_status(exitstatus, verdict, status, state.other_tests)
    return None if final == exitstatus else final


def _say(lines: list[str], text: str) -> None:
    """Add one line to the gate's summary, escaped: it may quote paths and input values."""
    lines.append(safe_line(text))


def _final_status(exitstatus: int, verdict: Verdict, status: int | None, others: int) -> int:
    """Pytest's status, unless the gate says otherwise: 5 when nothing ran, 1 when it failed.

    A session whose own tests ran while every merge check was deselected keeps pytest's
    status: the gate was not applied, and the report and summary say so.
    """
    if exitstatus not in (0, 5):
        return exitstatus
    if not verdict.ran:
        return exitstatus if others else NO_TESTS
    if status is not None or not verdict.passed:
        return 1
    return 0


def _lock_transition(
    state: State, verdict: Verdict, exitstatus: int, lines: list[str]
) -> dict[str, Any]:
    """Write the lock file when asked and allowed; describe what happened to it."""
    settings = state.settings
    path = settings.lock_path
    result = state.results.get(CHECK_ID)
    evidence = result.lock if result is not None else None
    info: dict[str, Any] = {
        "path": str(path) if path else None,
        "status": evidence.status if evidence else ("unknown" if result else "off"),
        "updated": False,
    }
    if evidence is not None:
        info["changed"] = list(evidence.changed)
    if not settings.update_lock:
        if result is not None and info["status"] == "absent":
            _say(
            lines,
                f"lock: no lock file at {path}; run with --update-merge-lock to record one"
            )
        elif result is not None and info["status"] == "match":
            stale = _stale(state)
            if stale:
                _say(
            lines,
                    f"lock: {len(stale)} benchmark result(s) were evaluated afresh (task or"
                    " settings changed); --update-merge-lock records them"
                )
        return info
    why_not = None
    if path is None:
        why_not = "no lock path"
    elif result is None:
        why_not = "the lock check did not run"
    elif verdict.missing:
        why_not = f"{len(verdict.missing)} check(s) did not run; an update needs every check"
    elif not verdict.passed:
        why_not = "the gate failed"
    elif verdict.counts.get(Outcome.INCONCLUSIVE.value):
        count = verdict.counts[Outcome.INCONCLUSIVE.value]
        why_not = f"{count} inconclusive result(s) approve nothing"
    elif exitstatus not in _COMPLETED:
        why_not = f"the run did not complete (exit status {exitstatus})"
    if why_not is not None:
        _say(lines, f"lock: NOT updated ({why_not}): {path}")
        info["reason"] = why_not
        return info
    assert path is not None
    new = build_lock(state.results, library_versions(), harness_version())
    if new is None:
        _say(lines, f"lock: NOT updated (no digests recorded): {path}")
        info["reason"] = "no digests recorded"
        return info
    try:
        old = read_lock(path, named=settings.lock_named)
    except HarnessError:
        old = None
    try:
        write_lock(path, new, named=settings.lock_named)
    except HarnessError as exc:
        _say(lines, f"lock: {one_line(exc)}")
        info["error"] = one_line(exc)
        return info
    info["updated"] = True
    action = (
        "recorded"
        if old is None
        else ("unchanged" if old.to_json() == new.to_json() else "updated")
    )
    info["action"] = action
    _say(
            lines,
        f"lock: {action} {path} ({len(new.benchmarks)} benchmark result(s), merged"
        f" {new.digests.get('merged', '')[:12]})"
    )
    return info


def _stale(state: State) -> list[str]:
    """Benchmark checks evaluated afresh although the digests matched the lock."""
    stale: list[str] = []
    for check in state.suite:
        result = state.results.get(check.id)
        if result is not None and result.record is not None and not result.record.reused:
            stale.append(check.id)
    return stale


def _write_plot(state: State, target: Path, *, explicit: bool, lines: list[str]) -> Path | None:
    rows = layer_rows(state.results.values())
    if not rows:
        if explicit:
            _say(lines, "plot: no per-layer weight figures in this run (weights checks off?)")
        return None
    try:
        written = plot_layers(rows, target, title=_plot_title(state))
    except ImportError:
        if explicit:
            _say(lines, f"plot: matplotlib is not installed ({install_hint('plot')})")
        return None
    except HarnessError as exc:
        _say(lines, f"plot: {one_line(exc)}")
        return None
    _say(lines, f"plot: wrote {written}")
    return written


def _plot_title(state: State) -> str:
    merged = state.settings.merged
    return f"merge-harness: weight deltas of {merged.name if merged else 'merge'}"
