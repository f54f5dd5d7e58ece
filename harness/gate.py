"""The gate: configuration loading, the pure decision, and its application once per run.

``decide`` is a pure function of the suite, the results and the configuration (no pytest, no
files), so the same verdict comes out on a laptop, under ``pytest-xdist`` (results reach the
controller through ``report.user_properties``) and in CI. ``apply_gate`` runs on the controller
at session finish: it decides, writes the lock file when asked and allowed, writes the JSON
report, the markdown summary and the weight-difference plot, and returns the exit status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import config as gate_config
from harness.context import Options
from harness.errors import ConfigError, HarnessError
from harness.result import Check, CheckResult, Outcome

if TYPE_CHECKING:
    from harness.plugin.state import State

#: Exit statuses after which the lock may be written (tests ran to the end).
_COMPLETED = (0, 1)


def load_settings(options: Options, rootdir: Path) -> None:
    """Read and validate the gate configuration into ``options``; raise ConfigError if invalid.

    Values from the configuration apply where the command line left an option at its default
    (the command line wins). Relative paths are resolved against the configuration file. The
    file is looked for in ``rootdir``, then in the current folder.
    """
    from harness.suite import FAMILIES

    source, table = gate_config.find(options.config_path, rootdir, Path.cwd())
    gate = gate_config.parse(table, source, tuple(FAMILIES))
    requested = options.lock_path is not None or gate.lock is not None
    if options.lock_path is None:
        # Beside the configuration file; without one, in the folder pytest was started in.
        folder = source.parent if source is not None else Path.cwd()
        options.lock_path = (gate.lock or folder / gate_config.DEFAULT_LOCK).absolute()
    options.gate = dataclasses.replace(gate, lock_requested=requested)
    options.settings = dict(table)
    _apply_defaults(options, table)


def _apply_defaults(options: Options, table: Mapping[str, Any]) -> None:
    defaults = Options()
    if "checks" in table and options.families is None:
        checks = table["checks"]
        options.families = frozenset([checks] if isinstance(checks, str) else checks)
    if "ulp_tolerance" in table and options.ulp_tolerance == defaults.ulp_tolerance:
        options.ulp_tolerance = float(table["ulp_tolerance"])
    if "examples" in table and options.examples == defaults.examples:
        options.examples = int(table["examples"])
    if "timeout" in table and options.check_timeout is None:
        options.check_timeout = float(table["timeout"])
    if "device" in table and options.device == defaults.device:
        options.device = str(table["device"])
    if "dtype" in table and options.dtype is None:
        from harness.dtypes import from_name

        try:
            options.dtype = from_name(str(table["dtype"]))
        except KeyError as exc:
            where = options.gate.source if options.gate else None
            raise ConfigError(f"{where}: dtype: {exc.args[0]}") from None


# ----------------------------------------------------------------------------- decision


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
        if result.metrics.get("reused"):
            reused.append(check.id)
        if result.outcome is Outcome.FAILED:
            reasons.append(f"{check.id}: {result.message}")
        elif result.outcome is Outcome.INCONCLUSIVE and inconclusive_blocks:
            reasons.append(f"{check.id}: inconclusive (inconclusive_blocks): {result.message}")
    return Verdict(not reasons, reasons, counts, missing, reused)


# ----------------------------------------------------------------------------- application


def apply_gate(state: State, exitstatus: int) -> int | None:
    """Decide, write lock/report/summary/plot, and return the exit status (None: pytest's own).

    Runs once, on the controller. The lock is written only with ``--update-merge-lock``, only
    when every check ran, the gate passed and the run completed; otherwise the terminal summary
    says why not. A gate that fails while pytest would exit 0 turns the status to 1; an I/O
    error writing an output the user asked for is reported and also gives 1.
    """
    options = state.options
    gate = options.gate or gate_config.GateConfig()
    if not state.suite:
        return None
    verdict = decide(state.suite, state.results, gate.inconclusive_blocks)
    lines = state.gate_lines
    status: int | None = None
    if verdict.reused:
        lines.append(
            f"benchmark: {len(verdict.reused)} result(s) reused from the lock file (digests"
            " unchanged: evaluation skipped)"
        )
    lock_info = _lock_transition(state, verdict, exitstatus, lines)
    if lock_info.get("error"):
        status = 1
    from harness.report import build_report, render_markdown

    artifacts: dict[str, str] = {}
    plot_target = gate.plot
    if plot_target is None and options.report_path is not None:
        plot_target = options.report_path.with_name(options.report_path.stem + "-layers.png")
    if plot_target is not None:
        written = _write_plot(state, plot_target, explicit=gate.plot is not None, lines=lines)
        if written:
            artifacts["plot"] = str(written)
    report = build_report(
        state.suite,
        state.results,
        options,
        verdict=verdict,
        exit_status=_final_status(exitstatus, verdict, status),
        lock=lock_info,
        notes=list(state.notes),
        artifacts=artifacts,
    )
    from harness import github

    if github.in_actions():
        # Workflow commands at the start of a summary line: GitHub turns them into annotations
        # on the run (the gate command hides GITHUB_ACTIONS from its pytest, so no duplicates).
        lines.extend(github.report_annotations(report))
    for path, text, label in (
        (options.report_path, None, "--merge-report"),
        (options.summary_path, render_markdown(report), "--merge-summary"),
    ):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if text is None:
                from harness.report import dumps_report

                text = dumps_report(report)
            path.write_text(text, encoding="utf-8")
            lines.append(f"{label}: wrote {path}")
        except OSError as exc:
            lines.append(f"{label}: cannot write {path}: {exc.strerror or exc}")
            status = 1
    lines.append(
        "gate: PASSED" if verdict.passed else f"gate: FAILED ({len(verdict.reasons)} reason(s))"
    )
    final = _final_status(exitstatus, verdict, status)
    return None if final == exitstatus else final


def _final_status(exitstatus: int, verdict: Verdict, status: int | None) -> int:
    if exitstatus not in (0, 5):
        return exitstatus
    if status is not None or not verdict.passed:
        return 1
    return exitstatus


def _lock_transition(
    state: State, verdict: Verdict, exitstatus: int, lines: list[str]
) -> dict[str, Any]:
    """Write the lock file when asked and allowed; describe what happened to it."""
    from harness import lock as lockfile
    from harness.report import harness_version, library_versions

    options = state.options
    path = options.lock_path
    result = state.results.get(lockfile.CHECK_ID)
    info: dict[str, Any] = {
        "path": str(path) if path else None,
        "status": str(result.metrics.get("lock_status", "unknown")) if result else "off",
        "updated": False,
    }
    if result is not None:
        info["changed"] = list(result.metrics.get("changed", []))
    if not options.update_lock:
        if result is not None and info["status"] == "absent":
            lines.append(
                f"lock: no lock file at {path}; run with --update-merge-lock to record one"
            )
        elif result is not None and info["status"] == "match":
            stale = _stale(state)
            if stale:
                lines.append(
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
        why_not = f"{len(verdict.missing)} check(s) did not run"
    elif not verdict.passed:
        why_not = "the gate failed"
    elif exitstatus not in _COMPLETED:
        why_not = f"the run did not complete (exit status {exitstatus})"
    if why_not is not None:
        lines.append(f"lock: NOT updated ({why_not}): {path}")
        info["reason"] = why_not
        return info
    assert path is not None
    new = lockfile.build_lock(state.results, library_versions(), harness_version())
    if new is None:
        lines.append(f"lock: NOT updated (no digests recorded): {path}")
        info["reason"] = "no digests recorded"
        return info
    try:
        old = lockfile.read_lock(path)
    except HarnessError:
        old = None
    try:
        lockfile.write_lock(path, new)
    except OSError as exc:
        lines.append(f"lock: cannot write {path}: {exc.strerror or exc}")
        info["error"] = str(exc)
        return info
    info["updated"] = True
    action = (
        "recorded"
        if old is None
        else ("unchanged" if old.to_json() == new.to_json() else "updated")
    )
    info["action"] = action
    lines.append(
        f"lock: {action} {path} ({len(new.benchmarks)} benchmark result(s), merged"
        f" {new.digests.get('merged', '')[:12]})"
    )
    return info


def _stale(state: State) -> list[str]:
    return [
        check.id
        for check in state.suite
        if check.id in state.results
        and "fingerprint" in state.results[check.id].metrics
        and not state.results[check.id].metrics.get("reused")
    ]


def _write_plot(state: State, target: Path, *, explicit: bool, lines: list[str]) -> Path | None:
    from harness.plot import layer_rows, plot_layers

    rows = layer_rows(state.results.values())
    if not rows:
        if explicit:
            lines.append("plot: no per-layer weight figures in this run (weights checks off?)")
        return None
    try:
        written = plot_layers(rows, target, title=_plot_title(state))
    except ImportError:
        if explicit:
            lines.append(
                "plot: matplotlib is not installed (pip install 'pytest-merge-harness[plot]')"
            )
        return None
    except OSError as exc:
        lines.append(f"plot: cannot write {target}: {exc.strerror or exc}")
        return None
    lines.append(f"plot: wrote {written}")
    return written


def _plot_title(state: State) -> str:
    merged = state.options.merged
    return f"merge-harness: weight deltas of {merged.name if merged else 'merge'}"
