"""The generated test items: one :class:`CheckItem` per :class:`Check`, under one collector."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import TYPE_CHECKING, Any

import pytest

from harness.checks.split import PART, record_part, shard_part
from harness.errors import one_line
from harness.gate.report import junit_properties
from harness.run.check import Check
from harness.run.result import CheckResult, Family, Outcome
from harness.run.runner import run_check

if TYPE_CHECKING:
    from harness.run.state import State

RESULT_PROPERTY = "merge_result"
#: The user property that carries a sharded run's part to the controller.
PART_PROPERTY = "merge_part"


class MergeHarnessWarning(UserWarning):
    """A check that passed with something worth reading (a sidecar differs, a note)."""


class CheckFailed(Exception):
    """Raised by a failing item; carries the result so ``repr_failure`` prints no traceback."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__(result.message)
        self.result = result


class MergeSuite(pytest.Collector):
    """The parent of every generated item; its node id is ``merge``."""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        """Items are created by the plugin's collection hook, not by collecting files."""
        return []


class CheckItem(pytest.Item):
    """A built-in merge check run as a pytest item (``merge::<family>::<name>``)."""

    def __init__(self, *, check: Check, state: State, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.state = state
        self.add_marker(pytest.mark.merge_harness)
        self.add_marker(getattr(pytest.mark, check.family.value))
        grouped = (Family.BENCHMARK, Family.EXPORT)
        if check.family in grouped and self.config.pluginmanager.hasplugin("xdist"):
            # Under ``pytest-xdist --dist loadgroup`` every benchmark item runs on one worker, so
            # each model is evaluated once per run instead of once per worker; the export items
            # likewise share one value pass per export.
            self.add_marker(pytest.mark.xdist_group(f"merge-harness-{check.family.value}"))
        self.sharded = check.streamed and state.settings.shard is not None
        if self.sharded and self.config.pluginmanager.hasplugin("xdist"):
            # One worker computes the run's part; the other streamed items read it there.
            self.add_marker(pytest.mark.xdist_group("merge-harness-part"))

    def runtest(self) -> None:
        """Run the check; fail, skip or warn according to its outcome."""
        ctx = self.state.context()
        check = dataclasses.replace(self.check, run=record_part) if self.sharded else self.check
        result = run_check(check, ctx, self.state.settings.timeout)
        self.user_properties.append((RESULT_PROPERTY, json.dumps(result.to_json(), default=str)))
        if self.sharded and self.state.part is None and ctx.known(PART):
            # The first streamed item of the process hands the part to the controller.
            self.state.part = shard_part(ctx).to_json()
            self.user_properties.append((PART_PROPERTY, json.dumps(self.state.part)))
        # Family, outcome, message and scalar figures as JUnit <property> elements (--junitxml).
        self.user_properties.extend(junit_properties(self.check, result))
        if result.outcome is Outcome.FAILED:
            raise CheckFailed(result)
        if result.outcome is Outcome.INCONCLUSIVE:
            if self.state.settings.config.inconclusive_blocks:
                raise CheckFailed(result)
            pytest.skip(f"inconclusive: {result.message}")
        if result.outcome is Outcome.SKIPPED:
            pytest.skip(result.message)
        if result.outcome is Outcome.WARNING:
            warnings.warn(MergeHarnessWarning(f"{self.check.id}: {result.message}"), stacklevel=1)

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str:
        """The one-line cause and the few figures that matter; no traceback."""
        if isinstance(excinfo.value, CheckFailed):
            result = excinfo.value.result
            lines = [result.message, *("  " + d for d in result.details)]
            if result.traceback and self.config.getoption("fulltrace", False):
                lines.append(result.traceback)
            return "\n".join(lines)
        if self.config.getoption("fulltrace", False):
            return str(super().repr_failure(excinfo, style=style))
        error = excinfo.value
        text = one_line(error) if str(error).strip() else ""
        if isinstance(error, MergeHarnessWarning):
            # A passing check's note, turned into an error by -W error / filterwarnings.
            return f"{text or self.check.id} (a warning, raised as an error by -W)"
        # Not a check's verdict: a bug in the harness itself. Still one line, no traceback.
        return (
            f"internal error in {self.check.id}: {type(error).__name__}:"
            f" {text} (--full-trace shows the traceback)"
        )

    def reportinfo(self) -> tuple[Any, int | None, str]:
        """Where the item comes from: the merged checkpoint, named by its check id."""
        return self.path, None, self.check.id
