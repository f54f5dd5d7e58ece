"""The workflows and the composite action: schemas, zizmor, and the rules they must keep.

check-jsonschema validates against the schemas it vendors (no network), zizmor audits offline;
both are the lint tools of tox's ``lint`` environment, run here too so that CI enforces them.
The remaining tests read the YAML and hold it to what the harness's code expects.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# PyYAML is a dependency of transformers, which the root conftest imports unconditionally.
import yaml

from harness import action

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTION = ROOT / "action.yml"
#: 40 hex digits and a version comment: `uses: owner/repo@<sha> # v4.2.2`.
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*$")


def tool(name: str) -> str:
    """The tool beside this interpreter (the venv's), else on PATH; skip when not installed."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[lint]')")
    return found


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )


def load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(document: dict[Any, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(job name, step) for every step of a workflow or a composite action."""
    if "runs" in document:
        return [("action", step) for step in document["runs"]["steps"]]
    return [(name, step) for name, job in document["jobs"].items() for step in job.get("steps", [])]


def test_there_are_workflows_to_check() -> None:
    assert {p.name for p in WORKFLOWS} >= {
        "ci.yml", "merge-gate.yml", "merge-gate-sharded.yml", "merge-lock-update.yml"
    }
    assert ACTION.is_file()


def test_workflows_match_the_vendored_github_workflow_schema() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                 *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_action_matches_the_vendored_github_action_schema() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", ACTION)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing() -> None:
    # Exit 0 only with no finding at all (any severity); --offline: no GitHub API calls.
    result = run(tool("zizmor"), "--offline", "--no-progress", ".github/workflows", "action.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings" in result.stdout


def test_zizmor_would_catch_template_injection(tmp_path: Path) -> None:
    # The audit this suite relies on really fires: an input interpolated into a script.
    bad = tmp_path / "action.yml"
    text = ACTION.read_text().replace(
        """run: '"$RUNNER_TEMP/merge-harness-venv/bin/merge-harness" gate'""",
        'run: merge-harness gate "${{ inputs.adapter }}"',
    )
    assert text != ACTION.read_text()
    bad.write_text(text)
    result = run(tool("zizmor"), "--offline", "--no-progress", bad)
    assert result.returncode != 0
    assert "template-injection" in result.stdout


@pytest.mark.parametrize("path", [*WORKFLOWS, ACTION], ids=lambda p: p.name)
def test_actions_are_pinned_by_full_commit_sha(path: Path) -> None:
    for job, step in steps(load(path)):
        uses = step.get("uses")
        if uses is None or uses.startswith("./"):
            continue
        line = next(line.strip() for line in path.read_text().splitlines()
                    if f"uses: {uses}" in line)
        assert PINNED.match(line.removeprefix("- ").removeprefix("uses: ")), (job, line)


def test_the_same_action_is_pinned_to_the_same_commit_everywhere() -> None:
    pins: dict[str, set[str]] = {}
    for path in [*WORKFLOWS, ACTION]:
        for _, step in steps(load(path)):
            uses = step.get("uses", "")
            if "@" in uses:
                name, ref = uses.split("@")
                pins.setdefault(name, set()).add(ref)
    assert {"actions/checkout", "actions/setup-python", "actions/upload-artifact",
            "actions/cache"} <= set(pins)
    assert {name: refs for name, refs in pins.items() if len(refs) > 1} == {}


@pytest.mark.parametrize("path", [*WORKFLOWS, ACTION], ids=lambda p: p.name)
def test_no_expression_is_expanded_inside_a_script(path: Path) -> None:
    # Inputs, labels and branch names reach scripts as environment variables only.
    for job, step in steps(load(path)):
        assert "${{" not in step.get("run", ""), (job, step.get("name"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(path: Path) -> None:
    workflow = load(path)
    assert workflow.get("permissions") == {}, "top level: permissions: {}"
    for name, job in workflow["jobs"].items():
        permissions = job.get("permissions")
        assert isinstance(permissions, dict), f"job {name} states its permissions"
        writes = {scope for scope, level in permissions.items() if level == "write"}
        if writes:
            assert (path.name, name, writes) == (
                "merge-lock-update.yml", "update-lock", {"contents"}
            )
    for job, step in steps(workflow):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False, job


def test_ci_tests_every_supported_python_and_self_tests_the_action() -> None:
    ci = load(ROOT / ".github" / "workflows" / "ci.yml")
    assert ci["jobs"]["test"]["strategy"]["matrix"]["python-version"] == ["3.10", "3.11", "3.12"]
    assert [s["uses"].split(" ")[0] for _, s in steps(ci) if s.get("uses", "").startswith("./")]
    assert {"lint", "test", "demo", "action-self-test"} <= set(ci["jobs"])


def test_merge_gate_example_has_the_three_tiers() -> None:
    gate = load(ROOT / ".github" / "workflows" / "merge-gate.yml")
    update = load(ROOT / ".github" / "workflows" / "merge-lock-update.yml")
    assert {"pull_request", "workflow_dispatch", "schedule"} <= set(gate["on"])
    assert "merge-harness.lock" in gate["on"]["pull_request"]["paths"]
    assert {"gate", "benchmarks"} == set(gate["jobs"])
    assert "'update-merge-lock'" in update["jobs"]["update-lock"]["if"]
    updating = [s for _, s in steps(update) if s.get("with", {}).get("update-lock") == "true"]
    assert len(updating) == 1
    assert not [s for _, s in steps(gate) if s.get("with", {}).get("update-lock") == "true"]


def test_sharded_example_runs_every_part_and_one_combining_gate() -> None:
    sharded = load(ROOT / ".github" / "workflows" / "merge-gate-sharded.yml")
    jobs = sharded["jobs"]
    parts = jobs["part"]["strategy"]["matrix"]["part"]
    assert parts == list(range(1, int(sharded["env"]["PARTS"]) + 1))
    assert jobs["part"]["strategy"]["fail-fast"] is False
    step = next(s for _, s in steps({"jobs": {"part": jobs["part"]}}) if s.get("uses") == "./")
    assert step["with"]["shard"] == "${{ matrix.part }}/${{ env.PARTS }}"
    assert step["with"]["artifact-name"] == "merge-harness-input-part-${{ matrix.part }}"
    gate = jobs["gate"]
    assert set(gate["needs"]) == {"part", "whole-model"}
    assert gate["if"] == "${{ !cancelled() }}"
    download = next(s for s in gate["steps"] if "download-artifact" in s.get("uses", ""))
    combine = next(s for s in gate["steps"] if s.get("uses") == "./")
    assert combine["with"]["combine"] == download["with"]["path"]
    pattern = download["with"]["pattern"].rstrip("*")
    names = [step["with"]["artifact-name"], jobs["whole-model"]["steps"][-1]["with"][
        "artifact-name"]]
    assert all(name.startswith(pattern) for name in names)
    assert not combine["with"]["artifact-name"].startswith(pattern)


def evaluate(condition: str, event: str) -> bool:
    """A job's ``if`` for a run started by ``event`` (the expressions these workflows use)."""
    tokens = re.findall(r"github\.event_name|'[^']*'|==|!=|&&|\|\||\(|\)|\S+", condition)
    python = []
    for token in tokens:
        if token == "github.event_name":
            python.append(repr(event))
        elif token in ("==", "!=", "(", ")") or token.startswith("'"):
            python.append(token)
        elif token in ("&&", "||"):
            python.append({"&&": "and", "||": "or"}[token])
        else:
            raise AssertionError(f"the gate job's if uses {token!r}: keep it to event names")
    return bool(eval(" ".join(python), {"__builtins__": {}}))


def test_a_label_cannot_cancel_or_skip_the_required_gate() -> None:
    """Adding any label starts no gate run, so it can neither cancel one nor skip the job."""
    gate = load(ROOT / ".github" / "workflows" / "merge-gate.yml")
    update = load(ROOT / ".github" / "workflows" / "merge-lock-update.yml")
    types = gate["on"]["pull_request"]["types"]
    assert "labeled" not in types and "unlabeled" not in types
    # Every pull request event that starts the gate workflow runs the required job.
    job = gate["jobs"]["gate"]
    assert job["name"] == "merge gate"
    for _ in types:
        assert evaluate(job.get("if", "true"), "pull_request")
    # The label-driven workflow is in another concurrency group, and never cancels itself.
    gate_group = gate["concurrency"]["group"].split("${{")[0]
    update_group = update["concurrency"]["group"].split("${{")[0]
    assert gate_group != update_group and not update_group.startswith(gate_group)
    assert update["concurrency"]["cancel-in-progress"] is False
    assert update["on"]["pull_request"]["types"] == ["labeled"]


def test_action_inputs_reach_the_gate_through_its_environment_variables() -> None:
    document = load(ACTION)
    declared = set(document["inputs"])
    text = ACTION.read_text()
    assert set(re.findall(r"inputs\.([\w-]+)", text)) <= declared
    gate_step = next(s for _, s in steps(document) if s.get("id") == "gate")
    assert gate_step["run"] == '"$RUNNER_TEMP/merge-harness-venv/bin/merge-harness" gate'
    assert gate_step["env"]["MERGE_HARNESS_ACTION"] == "1"
    env = gate_step["env"]
    assert set(action.ENV_VARS.values()) <= set(env)
    expected = {
        "merged-model", "base-model", "adapter", "config", "lock-file", "python-version",
        "extra-pip-packages", "pip-extras", "upload-reports", "update-lock", "harness-source",
        "torch-index-url",
    }
    assert expected <= declared


def test_action_outputs_are_the_ones_the_gate_writes() -> None:
    outputs = load(ACTION)["outputs"]
    assert set(outputs) == set(action.OUTPUTS)
    for name, spec in outputs.items():
        assert spec["value"] == f"${{{{ steps.gate.outputs.{name} }}}}"


def test_tox_lint_checks_every_workflow_file() -> None:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    lint = tox["testenv:lint"]["commands"]
    for path in WORKFLOWS:
        assert f".github/workflows/{path.name}" in lint
    assert "--builtin-schema vendor.github-actions action.yml" in lint
    assert "zizmor --offline" in lint
    assert "mypy --strict harness" in lint
