"""``merge-harness gate`` as the GitHub Action runs it: real merges, real pytest subprocesses.

Each gate run is a fresh ``python -m pytest`` (a few seconds each), on tiny Llama merges built
once for the module: a correct peft merge, a "merge" that is the base itself (adapter never
applied), and a merge with a NaN written into one tensor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import action, cli
from harness.gate import github
from harness.tiny import build_adapter, build_base, peft_merge


class Merges:
    """The tiny folders the tests gate."""

    def __init__(self, root: Path) -> None:
        self.base = build_base(root / "base")
        self.adapter = build_adapter(self.base, root / "adapter")
        self.merged = peft_merge(self.base, self.adapter, root / "merged")
        # The classic silent failure: the "merged" model is the base, unchanged.
        self.unapplied = Path(shutil.copytree(self.base, root / "unapplied"))
        self.nan = Path(shutil.copytree(self.merged, root / "nan"))
        tensors = load_file(self.nan / "model.safetensors")
        name = "model.layers.0.self_attn.q_proj.weight"
        tensors[name][3, 5] = float("nan")
        save_file(tensors, self.nan / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def merges(tmp_path_factory: pytest.TempPathFactory) -> Merges:
    return Merges(tmp_path_factory.mktemp("gate-merges"))


@pytest.fixture
def actions_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A workspace with the files GitHub gives a step, and GITHUB_ACTIONS=true."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.chdir(workspace)
    files = {"summary": tmp_path / "step_summary.md", "output": tmp_path / "github_output"}
    for path in files.values():
        path.write_text("")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(workspace))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(files["summary"]))
    monkeypatch.setenv("GITHUB_OUTPUT", str(files["output"]))
    for name in action.ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    return files


def gate(*argv: str | Path) -> int:
    """Run the gate command as the action does (``merge-harness gate ...``)."""
    return cli.main(["gate", *(str(a) for a in argv)])


#: The forward-pass family takes most of a gate run's time and adds nothing to what these tests
#: check (the plumbing between pytest and GitHub), so the runs here leave it out.
FAST = ("--", "--merge-checks", "structure,weights,hash,lock")


def inputs(merged: Path, merges: Merges) -> list[str | Path]:
    return ["--merged-model", merged, "--base-model", merges.base, "--adapter", merges.adapter]


def workflow_commands(stdout: str) -> list[str]:
    """The lines GitHub reads as workflow commands (::name ...::message)."""
    return [line for line in stdout.splitlines() if line.startswith("::")]


class Approved:
    """A passing gate run in GitHub mode that recorded the lock file (the label workflow)."""

    def __init__(self, root: Path, merges: Merges) -> None:
        self.workspace = root / "workspace"
        self.workspace.mkdir()
        self.summary_file, self.output_file = root / "step_summary.md", root / "github_output"
        self.summary_file.write_text("")
        self.output_file.write_text("")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MERGE_"))},
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(self.workspace),
            "GITHUB_STEP_SUMMARY": str(self.summary_file),
            "GITHUB_OUTPUT": str(self.output_file),
        }
        stream = io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(self.workspace)
            request = action.request_from_args(parse(
                # No --lock: the default one in the working directory, named by the report.
                *map(str, inputs(merges.merged, merges)), "--update-lock",
                "--report-dir", "reports", *FAST,
            ), env)
            self.run = action.run_gate(request, env=env, stream=stream)
        self.stdout = stream.getvalue()
        self.lock = self.workspace / "merge-harness.lock"
        self.reports = self.workspace / "reports"


@pytest.fixture(scope="module")
def approved(merges: Merges, tmp_path_factory: pytest.TempPathFactory) -> Approved:
    return Approved(tmp_path_factory.mktemp("approved"), merges)


def test_a_correct_merge_passes_records_the_lock_and_says_so(approved: Approved) -> None:
    assert approved.run.exit_code == 0
    commands = workflow_commands(approved.stdout)
    assert not [c for c in commands if c.startswith(("::error", "::warning"))], commands

    outputs = github.parse_outputs(approved.output_file.read_text())
    assert outputs["outcome"] == "passed"
    assert outputs["exit-code"] == "0"
    assert outputs["report-dir"] == str(approved.reports)
    for name, filename in action.REPORT_FILES.items():
        assert outputs[name] == str(approved.reports / filename)
        assert (approved.reports / filename).is_file()
    # The label workflow commits the lock only when this says it changed.
    assert outputs["lock-file"] == str(approved.lock)
    assert outputs["lock-changed"] == "true"
    assert approved.lock.is_file()
    report = json.loads((approved.reports / "merge-report.json").read_text())
    assert report["verdict"]["outcome"] == "passed"
    assert report["lock"]["updated"] is True

    # The step summary is the plugin's markdown summary, appended as it is.
    summary = approved.summary_file.read_text()
    assert summary == (approved.reports / "merge-summary.md").read_text()
    assert summary.startswith("## ✅ merge-harness: partial gate passed")
    assert "| | Check | Result |\n|---|---|---|\n" in summary
    assert "| ✅ | `merge::hash::differs_from_base` |" in summary
    assert "| ✅ | `merge::lock::digests` |" in summary
    assert "| ❌ |" not in summary


def test_a_merge_that_never_applied_the_adapter_fails_with_an_annotation(
    merges, actions_env, capfd
) -> None:
    code = gate(*inputs(merges.unapplied, merges), "--report-dir", "reports", *FAST)
    stdout = capfd.readouterr().out
    assert code == 1

    errors = [c for c in workflow_commands(stdout) if c.startswith("::error")]
    assert any(
        c.startswith("::error title=merge%3A%3Ahash%3A%3Adiffers_from_base::") for c in errors
    ), errors
    hash_error = next(c for c in errors if "differs_from_base" in c)
    assert "identical to the base" in hash_error
    assert "\n" not in hash_error

    outputs = github.parse_outputs(actions_env["output"].read_text())
    assert outputs["outcome"] == "failed"
    assert outputs["exit-code"] == "1"
    summary = actions_env["summary"].read_text()
    assert summary.startswith("## ❌ merge-harness: partial gate failed")
    assert "### Why the gate failed" in summary
    row = next(line for line in summary.splitlines() if "`merge::hash::differs_from_base`" in line)
    assert row.startswith("| ❌ |") and "identical to the base" in row


def test_a_changed_merge_fails_against_the_lock_with_fenced_off_log(
    merges, approved, actions_env, capfd
) -> None:
    shutil.copy(approved.lock, "merge-harness.lock")
    lock_before = Path("merge-harness.lock").read_bytes()
    code = gate(*inputs(merges.nan, merges), "--lock", "merge-harness.lock", "--report-dir",
                "reports", *FAST, "-q")
    stdout = capfd.readouterr().out
    assert code == 1
    stop = re.search(r"^::stop-commands::([0-9a-f]{32})$", stdout, re.M)
    assert stop, stdout
    resume = stdout.index(f"\n::{stop.group(1)}::\n")
    assert "PASS merge::structure::loads" in stdout[stop.end():resume]  # the child's log
    errors = [c for c in workflow_commands(stdout[resume:]) if c.startswith("::error")]
    title = "::error title=merge%3A%3Astructure%3A%3Aall_finite"
    finite = [c for c in errors if c.startswith(title)]
    assert finite and "model.layers.0.self_attn.q_proj.weight" in finite[0], errors
    # The lock check's annotation points at the lock file, and names the changed tensor.
    lock_errors = [c for c in errors if c.startswith(
        "::error title=merge%3A%3Alock%3A%3Adigests,file=merge-harness.lock::merged digest changed"
    )]
    assert lock_errors and "model.layers.0.self_attn.q_proj.weight" in lock_errors[0], errors
    outputs = github.parse_outputs(actions_env["output"].read_text())
    assert outputs["outcome"] == "failed"
    assert outputs["lock-changed"] == "false"
    assert Path("merge-harness.lock").read_bytes() == lock_before


def test_outside_github_nothing_is_published(merges, actions_env, monkeypatch, capfd) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "false")
    code = gate(*inputs(merges.unapplied, merges), "--report-dir", "reports", *FAST, "-q")
    stdout = capfd.readouterr().out
    assert code == 1
    assert workflow_commands(stdout) == []
    assert actions_env["summary"].read_text() == ""
    assert actions_env["output"].read_text() == ""
    assert "merge-harness gate: failed (pytest exit status 1)" in stdout
    assert Path("reports/junit.xml").is_file()


def test_a_pytest_usage_error_fails_with_a_note_and_no_stale_report(
    actions_env, capfd, tmp_path
) -> None:
    reports = Path("reports")
    reports.mkdir()
    (reports / "merge-report.json").write_text(json.dumps({"checks": []}))
    (reports / "merge-summary.md").write_text("stale summary of an earlier run\n")
    code = gate("--merged-model", tmp_path / "missing", "--report-dir", reports)
    stdout = capfd.readouterr().out
    assert code == 4
    assert not (reports / "merge-report.json").exists()
    errors = [c for c in workflow_commands(stdout) if c.startswith("::error")]
    assert errors == [
        "::error title=merge-harness gate::pytest exited with status 4 without writing a JSON"
        " report; see the log"
    ]
    summary = actions_env["summary"].read_text()
    assert "stale" not in summary and "pytest exited with status 4" in summary
    outputs = github.parse_outputs(actions_env["output"].read_text())
    assert outputs["outcome"] == "failed" and outputs["report"] == ""


def test_nothing_to_check_is_a_usage_error_before_pytest(actions_env, capfd) -> None:
    assert gate() == 4
    captured = capfd.readouterr()
    assert "nothing to check" in captured.err
    assert captured.out.startswith("::error title=merge-harness gate::nothing to check")
    assert github.parse_outputs(actions_env["output"].read_text())["outcome"] == "failed"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    action.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_inputs_come_from_environment_variables_as_the_action_sets_them(tmp_path) -> None:
    env = {
        "MERGE_HARNESS_MERGED_MODEL": "out/merged",
        "MERGE_HARNESS_BASE_MODEL": "models/base",
        "MERGE_HARNESS_ADAPTER": "",
        "MERGE_HARNESS_LOCK": "merge-harness.lock",
        "MERGE_HARNESS_UPDATE_LOCK": "true",
        "MERGE_HARNESS_PYTEST_ARGS": "-n 2 -k 'structure or hash'",
        "MERGE_HARNESS_REPORT_DIR": "out/reports",
    }
    request = action.request_from_args(parse("--base-model", "given/base", "--", "-x"), env)
    assert request.merged_model == "out/merged"
    assert request.base_model == "given/base"  # an option beats its variable
    assert request.adapter is None  # an empty input is no input
    assert request.update_lock is True
    assert request.report_dir == Path("out/reports")
    assert request.pytest_args == ["-n", "2", "-k", "structure or hash", "-x"]


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_a_bad_boolean_input_is_refused(value: str) -> None:
    env = {"MERGE_HARNESS_MERGED_MODEL": "m", "MERGE_HARNESS_UPDATE_LOCK": value}
    with pytest.raises(action.GateUsageError, match="MERGE_HARNESS_UPDATE_LOCK"):
        action.request_from_args(parse(), env)


def test_the_pytest_command_collects_only_the_report_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    request = action.request_from_args(
        parse("--merged-model", "m", "--config", "gate.toml", "--lock", "l.lock", "--update-lock",
              "--report-dir", "r", "--", "-x"),
        {},
    )
    command = action.pytest_command(request, python="python")
    reports = tmp_path / "r"
    assert command[:4] == ["python", "-m", "pytest", str(reports)]
    assert f"--rootdir={tmp_path}" in command
    assert command[command.index("--merge-config") + 1] == "gate.toml"
    assert command[command.index("--merge-lock") + 1] == "l.lock"
    assert "--update-merge-lock" in command
    assert f"--merge-report={reports / 'merge-report.json'}" in command
    assert f"--merge-summary={reports / 'merge-summary.md'}" in command
    assert f"--junitxml={reports / 'junit.xml'}" in command
    assert command[-1] == "-x"


@pytest.mark.parametrize("folder", [".", ".."])
def test_the_working_directory_is_no_report_folder(tmp_path, monkeypatch, folder) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(action.GateUsageError, match="dedicated folder"):
        action.request_from_args(parse("--merged-model", "m", "--report-dir", folder), {})


def test_the_child_does_not_talk_to_github_itself() -> None:
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": "s", "GITHUB_OUTPUT": "o", "CI": "1"}
    child = action._child_env(env)
    assert child["CI"] == "1" and child["HF_HUB_OFFLINE"] == "1"
    assert not set(child) & {"GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT"}


def test_nan_fixture_really_holds_a_nan(merges) -> None:
    tensors = load_file(merges.nan / "model.safetensors")
    assert torch.isnan(tensors["model.layers.0.self_attn.q_proj.weight"]).sum() == 1


@pytest.mark.parametrize("which", ["merged", "nan"])
def test_parts_in_matrix_jobs_then_one_combining_gate(
    merges, actions_env, capfd, tmp_path, which
) -> None:
    merged = getattr(merges, which)
    # Each matrix job: its part, into its own report folder (the uploaded artifact).
    for index in (1, 2):
        actions_env["output"].write_text("")
        code = gate(*inputs(merged, merges), "--shard", f"{index}/2", "--report-dir",
                    tmp_path / "parts" / f"merge-harness-part-{index}", *FAST)
        outputs = github.parse_outputs(actions_env["output"].read_text())
        assert code == 0
        assert outputs["outcome"] == "part"
    assert "## 🧩 merge-harness: part 2/2 recorded" in actions_env["summary"].read_text()
    capfd.readouterr()
    # The combining job: every downloaded report, judged together.
    actions_env["output"].write_text("")
    actions_env["summary"].write_text("")
    code = gate("--combine", tmp_path / "parts", "--report-dir", "reports")
    stdout = capfd.readouterr().out
    outputs = github.parse_outputs(actions_env["output"].read_text())
    report = json.loads(Path(outputs["report"]).read_text())
    assert Path(outputs["junit"]).read_text().count("<testcase") == len(report["checks"])
    parts = next(c for c in report["checks"] if c["id"] == "merge::structure::parts")
    assert parts["outcome"] == "passed"
    if which == "merged":
        assert code == 0 and outputs["outcome"] == "passed"
        assert actions_env["summary"].read_text().startswith("## ✅ merge-harness: partial gate")
    else:
        assert code == 1 and outputs["outcome"] == "failed"
        errors = [c for c in workflow_commands(stdout) if c.startswith("::error")]
        assert any("all_finite" in c and "NaN" in c for c in errors), errors


def test_combine_without_part_reports_is_a_usage_error(actions_env, capfd, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert gate("--combine", tmp_path / "empty", "--report-dir", "reports") == 4
    assert "no part reports there" in capfd.readouterr().err
    assert github.parse_outputs(actions_env["output"].read_text())["outcome"] == "failed"
