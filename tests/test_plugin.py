"""The pytest layer: options, ini keys, generated items, no-op mode, xdist."""

from __future__ import annotations

import subprocess
import sys

import pytest

STRUCTURE = "--merge-checks=structure,hash"


def test_help_lists_the_option_group(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "merge-harness: verify a merged LoRA/PEFT checkpoint:",
            "*--merged-model=PATH*",
            "*--base-model=PATH*",
            "*--adapter=PATH*",
            "*merged_model (string)*",
        ]
    )


def test_without_merged_model_the_plugin_does_nothing(pytester):
    pytester.makepyfile("def test_user(): assert True")
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=1)
    assert "merge::" not in result.stdout.str()
    assert "= merge-harness =" not in result.stdout.str()


def test_plugin_import_does_not_import_torch():
    code = (
        "import sys, harness, harness.plugin; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_empty_folder_collects_readable_item_ids(pytester, tiny_llama):
    result = pytester.runpytest(
        STRUCTURE,
        "--collect-only",
        "-q",
        "--merged-model",
        str(tiny_llama.merged),
        "--base-model",
        str(tiny_llama.base),
    )
    result.stdout.fnmatch_lines(
        [
            "merge::structure::loads",
            "merge::structure::no_adapter_leftovers",
            "merge::hash::differs_from_base",
            "12 tests collected*",
        ]
    )


def test_keyword_selection_applies_to_generated_items(pytester, tiny_llama):
    result = pytester.runpytest(
        STRUCTURE, "-k", "finite or leftovers", "--merged-model", str(tiny_llama.merged)
    )
    result.assert_outcomes(passed=2, deselected=10)


def test_ini_keys_resolve_relative_to_the_ini_file(pytester, tiny_llama):
    pytester.makeini(
        f"""
        [pytest]
        merged_model = {tiny_llama.merged}
        base_model = {tiny_llama.base}
        """
    )
    result = pytester.runpytest(STRUCTURE)
    result.assert_outcomes(passed=12)


def test_missing_path_is_a_usage_error(pytester, tmp_path):
    result = pytester.runpytest("--merged-model", str(tmp_path / "nope"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--merged-model*nope: no such file or folder*"])


def test_unknown_family_is_a_usage_error(pytester, tiny_llama):
    result = pytester.runpytest(
        "--merge-checks=structure,vibes", "--merged-model", str(tiny_llama.merged)
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--merge-checks: unknown family vibes*"])


def test_base_is_discovered_from_the_adapter_config(pytester, tiny_llama):
    result = pytester.runpytest(
        STRUCTURE, "--merged-model", str(tiny_llama.merged), "--adapter", str(tiny_llama.adapter)
    )
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["*base model discovered from adapter_config.json*"])


def test_hub_id_as_base_is_a_usage_error(pytester, tiny_llama, tmp_path):
    import json
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_llama.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = pytester.runpytest(
        STRUCTURE, "--merged-model", str(tiny_llama.merged), "--adapter", str(adapter)
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*'meta-llama/Llama-3.2-1B' is not a local folder*never downloads*"]
    )


def test_runs_under_xdist(pytester, tiny_llama):
    result = pytester.runpytest_subprocess(
        STRUCTURE,
        "-n",
        "2",
        "--merged-model",
        str(tiny_llama.merged),
        "--base-model",
        str(tiny_llama.base),
    )
    result.assert_outcomes(passed=12)
    # The controller gathers every worker's results into one summary.
    result.stdout.fnmatch_lines(
        ["*merge-harness*", "PASS merge::structure::loads*", "merged digest: *"]
    )


def test_failure_under_xdist_exits_one(pytester, tiny_llama):
    result = pytester.runpytest_subprocess(
        STRUCTURE,
        "-n",
        "2",
        "--merged-model",
        str(tiny_llama.base),
        "--base-model",
        str(tiny_llama.base),
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*merged weights are identical to the base*"])


def test_failures_become_annotations_in_github_actions(pytester, tiny_llama, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = pytester.runpytest(
        STRUCTURE, "--merged-model", str(tiny_llama.base), "--base-model", str(tiny_llama.base)
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        ["::error title=merge%3A%3Ahash%3A%3Adiffers_from_base::merged weights are identical*"]
    )
    monkeypatch.delenv("GITHUB_ACTIONS")
    quiet = pytester.runpytest(
        STRUCTURE, "--merged-model", str(tiny_llama.base), "--base-model", str(tiny_llama.base)
    )
    assert "::error" not in quiet.stdout.str()
