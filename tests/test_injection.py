"""Workflow-command injection: no input string can make GitHub run a command.

Tensor names, config keys and values, and paths of a pull request's checkpoint reach the
terminal summary, the failure reports, the JSON and markdown reports, the annotations, the step
summary and the step outputs. The property: whatever the strings (newlines, ``::``, ``%``,
control characters, lone surrogates, every documented command form), every workflow command the
runner would execute from stdout, stderr and the GitHub files is one the harness meant to print,
and nothing fails to encode. Checked through the real plugin (pytester, with ``GITHUB_ACTIONS``)
and through the real ``merge-harness gate`` command in a subprocess, with GitHub's files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hostile import COMMAND_FORMS, executed_commands, foreign_commands, hostile_merge
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.guard import differences, snapshot

from harness.text import bounded, escape_controls, inert, is_command, safe_line, safe_text

#: Pieces an attacker strings together: every command form, line breaks of every kind, escapes.
PIECES = (
    *COMMAND_FORMS, "\n", "\r", "\r\n", "\x85", "\u2028", "\x0b", "%", "%0A", "::", "##[",
    "\x1b[2J", "\x1b]8;;http://x\x07", "\x00", "\t", " ", "\u3000", "\u202e", "\ufeff",
    "\ud800", "\udc80", "\udfff", "é", "名",
)
hostile_text = st.lists(
    st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), min_size=1, max_size=8
).map("".join)
#: The checks that quote names and config values (config_allowlist, same_tensor_names...).
FAMILIES = "structure,security,hash"


def _lines_ok(text: str) -> None:
    assert not any(is_command(line) for line in text.replace("\r", "\n").split("\n")), text


# ---- the escaping itself ----------------------------------------------------------------------


@given(hostile_text)
def test_safe_line_is_one_inert_encodable_line(text):
    line = safe_line(text)
    assert "\n" not in line and "\r" not in line
    assert not is_command(line)
    line.encode("utf-8")  # no lone surrogate left


@given(st.lists(hostile_text, max_size=5).map("\n".join))
def test_safe_text_keeps_lines_but_none_is_a_command(text):
    out = safe_text(text)
    assert out.count("\n") == text.count("\n")
    _lines_ok(out)
    out.encode("utf-8")


def test_escapes_are_readable():
    assert escape_controls("a\nb\x1b[0m\ud800") == "a\\nb\\x1b[0m\\ud800"
    assert inert("  ::error::x") == "  %3A:error::x"
    assert inert("see ##[error]x") == "see ##%5Berror]x"
    assert bounded("x" * 1005, 1000).endswith("... (5 more characters)")


# ---- the real plugin, as a step running pytest directly ---------------------------------------


@pytest.fixture
def actions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    files = {"summary": tmp_path / "step_summary.md", "output": tmp_path / "github_output"}
    for path in files.values():
        path.write_text("")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(files["summary"]))
    monkeypatch.setenv("GITHUB_OUTPUT", str(files["output"]))
    return files


def _check_run(output: str, folder: Path) -> None:
    assert "Traceback" not in output and "INTERNALERROR" not in output, output
    foreign = foreign_commands(output)
    assert not foreign, [c.line for c in foreign]
    for name in ("report.json", "summary.md"):
        text = (folder / name).read_text(encoding="utf-8")
        _lines_ok(text)
    json.loads((folder / "report.json").read_text(encoding="utf-8"))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=hostile_text)
@example(text="x\n::error title=merge-harness::gate PASSED")  # the reported attack
@example(text="##[error]legacy")
@example(text="\u3000::add-mask::x\r::set-output name=outcome::passed\udc80%0A")
def test_plugin_output_never_runs_a_foreign_command(pytester, tiny_llama, actions, text):
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=pytester.path))
    merged = hostile_merge(tiny_llama.merged, folder / "merged", text)
    before = snapshot(folder)
    result = pytester.runpytest(
        "-p", "no:randomly", "-rA", "--merge-checks", FAMILIES, "--merged-model", str(merged),
        "--base-model", str(tiny_llama.base), "--merge-report", str(folder / "report.json"),
        "--merge-summary", str(folder / "summary.md"),
    )
    assert result.ret == 1
    output = result.stdout.str() + "\n" + result.stderr.str()
    _check_run(output, folder)
    # no input byte changed, nothing written but the two named outputs
    changes = differences(before, snapshot(folder))
    assert {"added report.json", "added summary.md"} <= set(changes)
    assert all(c in ("added report.json", "added summary.md") or c.startswith("changed .:")
               for c in changes), changes  # (the folder's own mtime changes with new files)
    # the attack did reach the output, escaped: the failing checks quote the hostile name
    assert "same_tensor_names" in output
    # and the plugin's own annotations are there, one per failed check
    assert any(c.name == "error" for c in executed_commands(output))


def test_plugin_with_a_hostile_folder_name(pytester, tiny_llama, actions):
    """A path is input too: a folder named like a command, with a newline and a surrogate."""
    name = "m\n::error title=merge-harness::gate PASSED\udc80"
    merged = hostile_merge(tiny_llama.merged, pytester.path / os.fsdecode(os.fsencode(name)),
                           "x\n::add-mask::y")
    folder = pytester.path
    result = pytester.runpytest(
        "-p", "no:randomly", "--merge-checks", FAMILIES, "--merged-model", str(merged),
        "--base-model", str(tiny_llama.base), "--merge-report", str(folder / "report.json"),
        "--merge-summary", str(folder / "summary.md"),
    )
    assert result.ret == 1
    _check_run(result.stdout.str() + "\n" + result.stderr.str(), folder)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert report["inputs"]["merged"] == str(merged)  # the path reads back exactly


# ---- the real gate command, with GitHub's files --------------------------------------------------


def run_gate(merged: Path, base: Path, workspace: Path) -> tuple[subprocess.CompletedProcess[str],
                                                                   dict[str, Path]]:
    files = {"summary": workspace / "step_summary.md", "output": workspace / "github_output"}
    for path in files.values():
        path.write_text("")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MERGE_"))},
        "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace),
        "GITHUB_STEP_SUMMARY": str(files["summary"]), "GITHUB_OUTPUT": str(files["output"]),
        "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONIOENCODING": "utf-8",
    }
    completed = subprocess.run(
        [sys.executable, "-m", "harness.action", "--merged-model", str(merged), "--base-model",
         str(base), "--report-dir", str(workspace / "reports"), "--",
         "-p", "no:randomly", "--merge-checks", FAMILIES],
        cwd=workspace, env=env, capture_output=True, text=True, errors="strict", timeout=300,
        check=False,
    )
    return completed, files


# Each example is a whole gate run (a pytest subprocess, ~15 s): the plugin property above
# explores the strings, this one proves the gate's own path on the reported attack and a few.
@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=hostile_text)
@example(text="x\n::error title=merge-harness::gate PASSED")  # the reported attack
def test_gate_output_and_github_files_never_run_a_foreign_command(tmp_path, tiny_llama, text):
    workspace = Path(tempfile.mkdtemp(prefix="ws-", dir=tmp_path))
    merged = hostile_merge(tiny_llama.merged, workspace / "merged", text)
    completed, files = run_gate(merged, tiny_llama.base, workspace)
    output = completed.stdout + "\n" + completed.stderr
    assert completed.returncode == 1, output
    assert "Traceback" not in output
    # the gate stops commands around pytest's own output with a random token
    tokens = [c.data for c in executed_commands(output) if c.name == "stop-commands"]
    assert len(tokens) == 1
    foreign = foreign_commands(output, tokens)
    assert not foreign, [c.line for c in foreign]
    # even inside the stopped region, pytest's lines are escaped themselves
    inside = output.split(f"::stop-commands::{tokens[0]}", 1)[1].split(f"::{tokens[0]}::", 1)[0]
    _lines_ok(inside)
    for path in files.values():
        _lines_ok(path.read_text(encoding="utf-8"))
    assert "outcome<<" in files["output"].read_text()
