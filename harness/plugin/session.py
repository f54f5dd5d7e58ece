"""The hooks of an active run, as a plugin object that holds the run's :class:`State`."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from harness.gate.report import summary_lines
from harness.plugin.finish import apply_gate
from harness.plugin.items import RESULT_PROPERTY, CheckItem, MergeSuite
from harness.plugin.state import State
from harness.run.result import CheckResult, Outcome
from harness.text import safe_line

_MARK = {
    Outcome.PASSED: "PASS",
    Outcome.FAILED: "FAIL",
    Outcome.SKIPPED: "skip",
    Outcome.INCONCLUSIVE: "????",
    Outcome.WARNING: "WARN",
}


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
        items.extend(generated)
        # Report the generated items like collected ones, so "collected N items" counts them.
        report = pytest.CollectReport(suite.nodeid, "passed", None, list(generated))
        session.ihook.pytest_collectreport(report=report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep each check's result (reports from xdist workers arrive here on the controller)."""
        for key, value in report.user_properties:
            if key == RESULT_PROPERTY:
                check_id = "merge::" + report.nodeid.split("merge::", 1)[-1]
                self.state.results[check_id] = CheckResult.from_json(json.loads(str(value)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The merge-harness section: each check, the digests and the size comparison."""
        if self.is_worker or not (self.state.results or self.state.gate_lines):
            return
        terminalreporter.section("merge-harness")
        for line in self.state.notes:
            terminalreporter.write_line(safe_line(line))
        for line in summary_lines(self.state.suite, self.state.results, _MARK):
            terminalreporter.write_line(line)
        for line in self.state.gate_lines:
            terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Apply the gate once, on the controller: reports, lock file and final exit status."""
        if self.is_worker:
            return
        status = apply_gate(self.state, int(exitstatus))
        if status is not None:
            session.exitstatus = status

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """Remove the harness's own temporary merge (never a user's folder)."""
        workdir = self.state.settings.workdir
        if workdir is not None and not self.is_worker and workdir.name.startswith("merge-harness-"):
            shutil.rmtree(workdir, ignore_errors=True)
