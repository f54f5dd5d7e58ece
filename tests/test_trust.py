"""A gate you can trust: it never passes on nothing, writes nothing near the models, says one
cause once, and runs isolated from the project it gates.

Each test reproduces the user's situation: pytester runs of the real plugin on real tiny merges,
a host project with its own ini and tests, ``merge-harness gate`` with the files GitHub gives a
step, and the console command as a shell pipeline uses it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.guard import install_family, snapshot

from harness.run.result import CheckResult, Outcome

ROOT = Path(__file__).resolve().parents[1]
#: The fast families: every run below that is not about behaviour uses them.
FAST = "--merge-checks=structure,security,weights,hash"


def _inputs(root: Path, tiny) -> dict[str, Path]:
    return {name: Path(shutil.copytree(getattr(tiny, name), root / name))
            for name in ("base", "adapter", "merged")}


def _args(inputs: dict[str, Path], *names: str, equals: bool = False) -> list[str]:
    flags = {"merged": "--merged-model", "base": "--base-model", "adapter": "--adapter"}
    out: list[str] = []
    for name in names or tuple(flags):
        out += [f"{flags[name]}={inputs[name]}"] if equals else [flags[name], str(inputs[name])]
    return out


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- the gate's word -----------------------------------------------------------------------


def test_collect_only_is_no_checks_ran(pytester, tiny_llama):
    report = pytester.path / "r.json"
    result = pytester.runpytest("--collect-only", *_args(tiny_llama.__dict__),
                                f"--merge-report={report}")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result.stdout.fnmatch_lines(["gate: NO CHECKS RAN (nothing was verified)"])
    verdict = _report(report)["verdict"]
    assert verdict["outcome"] == "not_run" and verdict["reasons"][0].startswith("no checks ran")


def test_a_k_that_matches_nothing_is_no_checks_ran(pytester, tiny_llama):
    summary = pytester.path / "s.md"
    result = pytester.runpytest("-k", "no_such_check", FAST, *_args(tiny_llama.__dict__),
                                f"--merge-summary={summary}")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert summary.read_text().startswith("## ⛔ merge-harness: no checks ran")


def test_one_check_is_selected_by_the_id_pytest_prints(pytester, tiny_llama):
    result = pytester.runpytest(*_args(tiny_llama.__dict__), "merge::hash::differs_from_base")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=1, deselected=22)
    result.stdout.fnmatch_lines(["PASS merge::hash::differs_from_base *", "gate: PASSED"])
    family = pytester.runpytest(*_args(tiny_llama.__dict__), "merge::structure")
    family.assert_outcomes(passed=11, deselected=12)
    unknown = pytester.runpytest(*_args(tiny_llama.__dict__), "merge::hash::nope")
    assert unknown.ret == pytest.ExitCode.USAGE_ERROR
    assert "merge::hash::nope matches no merge check of this run" in unknown.stderr.str()


def test_missing_adapter_does_not_ship(pytester, tiny_llama):
    """An empty CI variable drops --adapter: the default gate refuses to pass, and says why."""
    report = pytester.path / "r.json"
    result = pytester.runpytest(*_args(tiny_llama.__dict__, "merged", "base"),
                                f"--merge-report={report}")
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "*weights not verified: needs --adapter (adapter_supported, *",
        "*behaviour not verified: needs --adapter (equivalence, layers, generation)*",
        "gate: FAILED (2 reason(s))",
    ])
    verdict = _report(report)["verdict"]
    assert verdict["outcome"] == "failed" and not verdict["partial"]
    assert "merge::weights::targeted_match_reference: needs --adapter" in verdict["unverified"]


def test_merged_alone_does_not_ship_but_a_chosen_partial_gate_may(pytester, tiny_llama):
    alone = pytester.runpytest(*_args(tiny_llama.__dict__, "merged"))
    assert alone.ret == 1
    alone.stdout.fnmatch_lines(["*not verified: needs --base-model*", "gate: FAILED*"])
    summary = pytester.path / "s.md"
    partial = pytester.runpytest(*_args(tiny_llama.__dict__, "merged"),
                                 "--merge-checks=structure,security",
                                 f"--merge-summary={summary}")
    assert partial.ret == 0
    partial.stdout.fnmatch_lines(["partial gate: 6 check(s) not verified:", "partial gate: PASSED"])
    text = summary.read_text()
    assert text.startswith("## ✅ merge-harness: partial gate passed")
    assert "merge::structure::same_shapes: needs --base-model" in text


def test_inconclusive_has_a_label_and_is_never_locked(pytester, tiny_llama, monkeypatch):
    install_family(monkeypatch, {
        "unsure": lambda ctx: CheckResult(Outcome.INCONCLUSIVE, "6 documents cannot tell"),
    })
    lock = pytester.path / "merge-harness.lock"
    result = pytester.runpytest(*_args(tiny_llama.__dict__),
                                "--merge-checks=structure,hash,lock,security",
                                f"--merge-lock={lock}", "--update-merge-lock")
    result.stdout.fnmatch_lines([
        "INCONCLUSIVE merge::security::unsure *6 documents cannot tell",
        "lock: NOT updated (1 inconclusive result(s) approve nothing)*",
    ])
    assert result.ret == 1 and not lock.exists()


def test_an_update_that_cannot_write_the_lock_fails(pytester, tiny_llama):
    lock = pytester.path / "merge-harness.lock"
    result = pytester.runpytest(*_args(tiny_llama.__dict__), FAST + ",lock", "-k", "hash or lock",
                                f"--merge-lock={lock}", "--update-merge-lock")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["lock: NOT updated (* check(s) did not run; an update needs"
                                 " every check)*"])
    assert not lock.exists()


# ---- read-only, really ---------------------------------------------------------------------


@pytest.mark.parametrize("equals", [False, True], ids=["space-form", "equals-form"])
def test_no_file_lands_under_the_inputs_or_their_parents(pytester, tiny_llama, tmp_path,
                                                         monkeypatch, equals):
    """From a grandparent, the parent and an unrelated folder, in both option forms: nothing
    appears in the model folders or above them, the rootdir is the working folder and the node
    ids read merge::..."""
    top = tmp_path / "data"
    inputs = _inputs(top / "models", tiny_llama)
    reports = tmp_path / "reports"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for number, where in enumerate((top, top / "models", elsewhere)):
        before = snapshot(top)
        monkeypatch.chdir(where)
        result = pytester.runpytest(*_args(inputs, equals=equals), FAST,
                                    f"--merge-report={reports / f'{number}.json'}")
        assert result.ret == 0, result.stdout.str()
        assert snapshot(top) == before, where
        result.stdout.fnmatch_lines([f"rootdir: {where}", "PASS merge::structure::loads *"])
        assert "../merge::" not in result.stdout.str()


def test_config_and_lock_paths_are_printed(pytester, tiny_llama):
    pytester.makefile(".toml", **{"merge-harness": "confidence = 0.9\n"})
    result = pytester.runpytest(*_args(tiny_llama.__dict__), FAST + ",lock")
    result.stdout.fnmatch_lines([f"config: {pytester.path / 'merge-harness.toml'}",
                                 f"lock: {pytester.path / 'merge-harness.lock'} (none yet)"])


def test_a_project_ini_naming_a_merge_stays_out_of_its_own_test_runs(pytester, tiny_llama):
    pytester.makeini(f"[pytest]\nmerged_model = {tiny_llama.merged}\n"
                     f"base_model = {tiny_llama.base}\nadapter = {tiny_llama.adapter}\n")
    pytester.makepyfile(test_mine="def test_mine():\n    assert True\n")
    pytester.makefile(".toml", **{"merge-harness": "checks = ['structure', 'hash']\n"})
    own = pytester.runpytest("test_mine.py")
    own.assert_outcomes(passed=1)
    assert "merge::" not in own.stdout.str()
    everything = pytester.runpytest()
    everything.assert_outcomes(passed=13)
    only_merge = pytester.runpytest("merge")
    only_merge.assert_outcomes(passed=12)


# ---- one cause, said once ------------------------------------------------------------------


def test_an_unreadable_merge_fails_once_and_the_rest_name_it(pytester, tiny_llama, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_llama.merged / "config.json", pickled)
    torch.save(load_file(tiny_llama.merged / "model.safetensors"), pickled / "pytorch_model.bin")
    result = pytester.runpytest("--merged-model", str(pickled), "--base-model",
                                str(tiny_llama.base), "--adapter", str(tiny_llama.adapter), FAST)
    assert result.ret == 1
    result.assert_outcomes(failed=1, passed=1, skipped=16)  # security reads no weights
    result.stdout.fnmatch_lines([
        "FAIL merge::structure::loads *only pickle checkpoint(s) (pytorch_model.bin)*"
        "--merge-allow-pickle with pytest*",
        "skip merge::weights::targeted_match_reference *not checked: the merged input cannot be"
        " read (merge::structure::loads reports why)",
        "partial gate: FAILED (1 reason(s))",
    ])


def test_an_adapter_folder_given_as_the_merge_is_a_usage_error(pytester, tiny_llama):
    result = pytester.runpytest("--merged-model", str(tiny_llama.adapter))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "this is a PEFT adapter folder" in result.stderr.str()
    assert "did you mean --adapter?" in result.stderr.str()


def test_a_wrong_base_is_named(pytester, tiny_merge_factory, tiny_llama):
    other = tiny_merge_factory(arch="llama", seed=7)  # same shapes, other weights
    result = pytester.runpytest("--merged-model", str(tiny_llama.merged), "--base-model",
                                str(other.base), "--adapter", str(tiny_llama.adapter), FAST)
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "FAIL merge::weights::untouched_identical *the merge was not made from this base: *"
        " tensors the adapter does not touch differ from it*",
    ])


def test_a_hub_id_and_a_missing_accelerator_are_usage_errors(pytester, tiny_llama):
    hub = pytester.runpytest("--merged-model", str(tiny_llama.merged),
                             "--base-model", "meta-llama/Llama-3.1-8B")
    assert hub.ret == pytest.ExitCode.USAGE_ERROR
    assert "looks like a Hugging Face Hub id, and merge-harness never downloads" in (
        hub.stderr.str()
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    gpu = pytester.runpytest(*_args(tiny_llama.__dict__), "--merge-device", "cuda")
    assert gpu.ret == pytest.ExitCode.USAGE_ERROR
    assert "--merge-device cuda: CUDA is not available on this machine" in gpu.stderr.str()


def test_a_behaviour_load_error_keeps_the_real_cause(pytester, tiny_llama, tmp_path):
    """transformers' first line is generic; the size mismatch behind it must reach the user."""
    broken = Path(shutil.copytree(tiny_llama.merged, tmp_path / "broken"))
    tensors = load_file(broken / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = pytester.runpytest("--merged-model", str(broken), "--merge-checks=behaviour",
                                "-k", "loads")
    assert result.ret == 1
    line = next(ln for ln in result.outlines if ln.startswith("FAIL merge::behaviour::loads"))
    assert "down_proj" in line and ("size mismatch" in line or "shape" in line), line


# ---- isolated from the host project --------------------------------------------------------


def test_the_gate_command_ignores_the_host_pytest_setup(tmp_path, monkeypatch, tiny_llama):
    """A project whose pyproject adds --cov and a plugin of its own, and whose conftest would
    break any run: the gate reads only [tool.merge-harness] and is not disturbed."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = "--cov=myproj -p myproj.plugin --strict-markers"\n'
        "[tool.merge-harness]\nchecks = ['structure', 'hash']\n"
    )
    (project / "conftest.py").write_text("raise RuntimeError('the host conftest must not load')\n")
    (project / "tests").mkdir()
    (project / "tests" / "test_host.py").write_text("def test_host():\n    assert False\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    env["PYTEST_ADDOPTS"] = "--this-flag-does-not-exist"
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "gate", "--merged-model", str(tiny_llama.merged),
         "--base-model", str(tiny_llama.base), "--report-dir", str(tmp_path / "reports")],
        cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "partial gate: PASSED" in done.stdout
    assert f"config: {project / 'pyproject.toml'}" in done.stdout
    assert not (project / ".pytest_cache").exists()


def test_the_action_names_its_own_input_for_a_missing_extra(monkeypatch):
    from harness.extras import ACTION_ENV, install_hint

    monkeypatch.delenv(ACTION_ENV, raising=False)
    assert install_hint("eval") == "pip install 'pytest-merge-harness[eval]'"
    monkeypatch.setenv(ACTION_ENV, "1")
    assert "action input pip-extras" in install_hint("eval")


# ---- the console command -------------------------------------------------------------------


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False, **kwargs)


def test_cli_exit_codes_follow_pytest(tmp_path):
    assert _cli("--version").stdout.startswith("merge-harness ")
    bad = _cli("hash")
    assert bad.returncode == 4 and "the following arguments are required: PATH" in bad.stderr
    missing = _cli("hash", str(tmp_path / "nope"))
    assert missing.returncode == 4 and missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr


def test_hash_into_a_closed_pipe_is_quiet(tiny_llama_sharded):
    reader, writer = os.pipe()
    os.close(reader)  # the consumer (``head``) is gone before we write
    done = subprocess.run([sys.executable, "-m", "harness.cli", "hash", "--json",
                           str(tiny_llama_sharded.merged)], stdout=writer, stderr=subprocess.PIPE,
                          text=True, timeout=300, check=False)
    os.close(writer)
    assert done.returncode == 141
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_pickle_advice_names_the_flags_that_exist(tmp_path, tiny_llama):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(tiny_llama.merged / "model.safetensors"), pickled / "pytorch_model.bin")
    refused = _cli("hash", str(pickled))
    assert refused.returncode == 4
    assert "--allow-pickle with merge-harness hash and merge" in refused.stderr
    assert _cli("hash", "--allow-pickle", str(pickled)).returncode == 0


def test_merge_output_honours_the_umask(tmp_path, tiny_llama):
    out = tmp_path / "out"
    done = _cli("merge", "--no-progress", str(tiny_llama.base), str(tiny_llama.adapter), str(out),
                preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


# ---- small things ------------------------------------------------------------------------------


def test_a_tokenizer_saved_from_the_base_is_no_sidecar_difference(pytester, tiny_merge_factory,
                                                                  tmp_path):
    """Load the tokenizer from the base, save it with the merge: the usual flow warns nothing."""
    from transformers import AutoTokenizer

    case = tiny_merge_factory(arch="llama")
    merged = Path(shutil.copytree(case.merged, tmp_path / "merged"))
    AutoTokenizer.from_pretrained(case.base, local_files_only=True).save_pretrained(merged)
    result = pytester.runpytest("--merged-model", str(merged), "--base-model", str(case.base),
                                "--adapter", str(case.adapter), "--merge-checks=behaviour",
                                "-k", "sidecars")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["PASS merge::behaviour::sidecars *identical*"])


def test_a_tokenizer_shorter_than_the_vocabulary_is_named(tiny_llama, tmp_path):
    from harness.evals.tokenizer import build_char_tokenizer, resize_note
    from harness.run.config import parse
    from harness.run.context import Context
    from harness.run.settings import Settings

    short = build_char_tokenizer(tmp_path / "short", vocab_size=110)
    config = parse({"tokenizer": str(short)}, tmp_path / "gate.toml")
    settings = Settings(merged=tiny_llama.merged, base=tiny_llama.base,
                        adapter=tiny_llama.adapter, config=config)
    note = resize_note(Context(settings))
    assert note is not None and "has 110 tokens but vocab_size is 128" in note
    exact = parse({"tokenizer": "builtin:chars"}, tmp_path / "gate.toml")
    assert resize_note(Context(Settings(merged=tiny_llama.merged, config=exact))) is None


def test_an_update_job_that_records_nothing_is_red_in_actions(tiny_llama, tmp_path,
                                                                monkeypatch, capfd):
    """The label-driven update job with a -k that deselects checks: exit 1, an error annotation
    that says why, lock-changed=false, and no lock written."""
    from harness import action
    from harness.gate import github

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.chdir(workspace)
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    summary.write_text("")
    output.write_text("")
    for name, value in (("GITHUB_ACTIONS", "true"), ("GITHUB_WORKSPACE", str(workspace)),
                        ("GITHUB_STEP_SUMMARY", str(summary)), ("GITHUB_OUTPUT", str(output))):
        monkeypatch.setenv(name, value)
    code = action.main(["--merged-model", str(tiny_llama.merged), "--base-model",
                        str(tiny_llama.base), "--adapter", str(tiny_llama.adapter),
                        "--update-lock", "--report-dir", "reports", "--",
                        "--merge-checks=structure,hash,lock", "-k", "hash or lock"])
    stdout = capfd.readouterr().out
    assert code == 1
    outputs = github.parse_outputs(output.read_text())
    assert outputs["outcome"] == "failed" and outputs["lock-changed"] == "false"
    assert any(line.startswith("::error") and "NOT updated" in line
               for line in stdout.splitlines()), stdout[-2000:]
    assert not (workspace / "merge-harness.lock").exists()


def test_an_ini_above_the_models_is_not_picked_up(pytester, tiny_llama, tmp_path, monkeypatch):
    """A project whose pyproject sits above the model folders: with the space form and even
    with --rootdir, its pytest settings (here an addopts that would break the run) stay out."""
    project = tmp_path / "project"
    inputs = _inputs(project / "models", tiny_llama)
    (project / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = "--no-such-option-anywhere"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for extra in ([], [f"--rootdir={elsewhere}"]):
        result = pytester.runpytest(*_args(inputs), FAST, *extra)
        assert result.ret == 0, result.stdout.str() + result.stderr.str()
        assert "configfile" not in result.stdout.str()
