"""The hooks of an active run, as a plugin object that holds the run's :class:`State`."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from harness.checks.split import fingerprint
from harness.gate.apply import apply_gate
from harness.gate.report import MARKS, summary_lines
from harness.plugin.items import PART_PROPERTY, RESULT_PROPERTY, CheckItem, MergeSuite
from harness.run.result import CheckResult, Family
from harness.run.state import State
from harness.text import safe_line


def _selects(selection: str, nodeid: str) -> bool:
    """Whether a ``merge::...`` argument selects the item ``nodeid`` (itself or a prefix)."""
    return nodeid == selection or nodeid.startswith(selection + "::")


class HarnessSession:
    """Generates the items, gathers their results, prints the summary and applies the gate."""

    def __init__(self, state: State, config: pytest.Config) -> None:
        self.state = state
        self.config = config
        self.is_worker = hasattr(config, "workerinput")

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        """Append one item per built-in check, before ``-k``/``-m`` deselection sees them."""
        merged = self.state.settings.merged
        if merged is not None:
            suite = MergeSuite.from_parent(session, name="merge", nodeid="merge", path=merged)
        else:
            suite = MergeSuite.from_parent(session, name="merge", nodeid="merge")
        generated: list[pytest.Item] = [
            CheckItem.from_parent(
                suite, name=f"{check.family.value}::{check.name}", check=check, state=self.state
            )
            for check in self.state.suite
        ]
        # Report the generated items like collected ones, so "collected N items" counts them.
        report = pytest.CollectReport(suite.nodeid, "passed", None, list(generated))
        session.ihook.pytest_collectreport(report=report)
        chosen = self.state.selection
        if chosen:
            unknown = [s for s in chosen if not any(_selects(s, i.nodeid) for i in generated)]
            if unknown:
                known = ", ".join(sorted({f"merge::{c.family.value}" for c in self.state.suite}))
                raise pytest.UsageError(
                    f"{unknown[0]} matches no merge check of this run (families: {known})"
                )
            dropped = [i for i in generated if not any(_selects(s, i.nodeid) for s in chosen)]
            if dropped:
                config.hook.pytest_deselected(items=dropped)
            generated = [i for i in generated if i not in dropped]
        items.extend(generated)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Tell the context which selected check reports each unreadable input (once)."""
        owners: dict[str, str] = {}
        for item in session.items:
            if isinstance(item, CheckItem):
                for which in item.check.reports:
                    owners.setdefault(which, item.check.id)
        self.state.context().owners = owners

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep each check's result (reports from xdist workers arrive here on the controller)."""
        found = False
        for key, value in report.user_properties:
            if key == RESULT_PROPERTY:
                check_id = "merge::" + report.nodeid.split("merge::", 1)[-1]
                self.state.results[check_id] = CheckResult.from_json(json.loads(str(value)))
                found = True
            elif key == PART_PROPERTY:
                self.state.part = json.loads(str(value))
        if found:
            return
        if report.when == "call" and not report.nodeid.startswith("merge::"):
            self.state.other_tests += 1

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The merge-harness section: each check, the digests and the size comparison."""
        if self.is_worker or not (self.state.results or self.state.gate_lines):
            return
        terminalreporter.section("merge-harness")
        settings = self.state.settings
        source = settings.config.source
        terminalreporter.write_line(f"config: {source if source is not None else 'none found'}")
        if settings.runs(Family.LOCK) or settings.update_lock:
            exists = settings.lock_path is not None and settings.lock_path.exists()
            terminalreporter.write_line(
                f"lock: {settings.lock_path}" + ("" if exists else " (none yet)")
            )
        for line in self.state.notes:
            terminalreporter.write_line(safe_line(line))
        for line in summary_lines(self.state.suite, self.state.results, MARKS):
            terminalreporter.write_line(line)
        for line in self.state.gate_lines:
            terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Apply the gate once, on the controller: reports, lock file and final exit status."""
        if self.is_worker:
            return
        if self.state.settings.report_path is not None and self.state.results:
            # What combine compares across partial reports; a run whose inputs cannot be
            # read has none (its checks say why).
            try:
                self.state.fingerprint = fingerprint(self.state.context())
            except Exception:  # an unreadable input: its own check has reported it
                self.state.fingerprint = None
        status = apply_gate(self.state, int(exitstatus))
        if status is not None:
            session.exitstatus = status

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """Remove the harness's own temporary merge (never a user's folder)."""
        if self.is_worker:
            return
        for folder in (self.state.settings.workdir, self.state.settings.share):
            if folder is not None and folder.name.startswith("merge-harness-"):
                shutil.rmtree(folder, ignore_errors=True)
