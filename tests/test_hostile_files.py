"""Hostile side files: sidecars that point at secrets, custom code outside config.json, and
tokenizers that claim more than the model holds.

Every case is a private copy of a tiny real merge, changed the way a pull request would change
it, and checked through the real plugin. The runner's "secrets" are a file outside the folders
holding a token; no output of the run may contain it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

SECRET = "ghs_0123456789abcdefSECRET"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "runner" / "environ.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"GITHUB_TOKEN": SECRET, "do_sample": SECRET}) + "\n")
    return path


@pytest.fixture
def merge(pytester: pytest.Pytester, tiny_llama) -> Path:
    return Path(shutil.copytree(tiny_llama.merged, pytester.path / "merged"))


def run(pytester: pytest.Pytester, tiny_llama, merged: Path, *args: str) -> tuple[int, str]:
    report, summary = pytester.path / "report.json", pytester.path / "summary.md"
    result = pytester.runpytest(
        "-p", "no:randomly", "--merged-model", str(merged), "--base-model", str(tiny_llama.base),
        "--merge-report", str(report), "--merge-summary", str(summary), *args,
    )
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output and "INTERNALERROR" not in output, output
    texts = [output, report.read_text(encoding="utf-8"), summary.read_text(encoding="utf-8")]
    for text in texts:
        assert SECRET not in text
    return result.ret, "\n".join(texts)


# ---- sidecars ---------------------------------------------------------------------------------


SIDECARS = ("--merge-checks", "behaviour", "-k", "sidecars")


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json"])
def test_sidecar_symlinked_to_a_secret_is_refused_unread(pytester, tiny_llama, merge, secret,
                                                         name):
    from harness.evals.tokenizer import build_char_tokenizer

    base = Path(shutil.copytree(tiny_llama.base, pytester.path / "base"))
    build_char_tokenizer(base, 128)  # the base ships a tokenizer: the merge must too
    (merge / name).unlink(missing_ok=True)
    (merge / name).symlink_to(secret)
    result = pytester.runpytest("-p", "no:randomly", "--merged-model", str(merge),
                                "--base-model", str(base), *SIDECARS)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 1 and SECRET not in output and "Traceback" not in output
    result.stdout.fnmatch_lines([f"FAIL merge::behaviour::sidecars *{merge / name}: symlink"
                                 " resolves outside its folder*"])


def test_sidecar_that_is_a_pipe_is_refused(pytester, tiny_llama, merge):
    (merge / "generation_config.json").unlink()
    os.mkfifo(merge / "generation_config.json")
    status, text = run(pytester, tiny_llama, merge, *SIDECARS)
    assert status == 1
    assert "generation_config.json: not a regular file (a pipe, socket or device)" in text


def test_sidecar_diff_is_bounded_and_escaped(pytester, tiny_llama, merge):
    config = json.loads((merge / "generation_config.json").read_text())
    config["eos_token_id"] = "\n::error::x" + "A" * 5000
    (merge / "generation_config.json").write_text(json.dumps(config))
    status, text = run(pytester, tiny_llama, merge, *SIDECARS)
    assert status == 0  # a differing sidecar is a warning
    assert "AAAA" in text and "A" * 100 not in text


# ---- custom code in any configuration file ----------------------------------------------------

AUTO_MAP = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}


@pytest.mark.parametrize(
    "name",
    ["tokenizer_config.json", "processor_config.json", "generation_config.json",
     "preprocessor_config.json"],
)
def test_auto_map_outside_config_json_is_refused(pytester, tiny_llama, merge, name):
    path = merge / name
    data = json.loads(path.read_text()) if path.exists() else {}
    data["auto_map"] = AUTO_MAP
    path.write_text(json.dumps(data))
    (merge / "tokenization_evil.py").write_text("import os\nos.system('echo pwned')\n")
    status, text = run(pytester, tiny_llama, merge, "--merge-checks", "security")
    assert status == 1
    assert (f"{path} has auto_map (custom code (tokenization_evil.py)); refusing custom code"
            in text)


def test_nested_auto_map_and_adapter_folder_are_in_scope(pytester, tiny_llama, merge):
    adapter = Path(shutil.copytree(tiny_llama.adapter, pytester.path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": "Evil", "parent_library": "evil_module"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    status, text = run(pytester, tiny_llama, merge, "--adapter", str(adapter),
                       "--merge-checks", "security")
    assert status == 1
    assert f"{adapter / 'adapter_config.json'} has auto_mapping (custom code)" in text


def test_configuration_symlinked_out_is_refused(pytester, tiny_llama, merge, secret):
    (merge / "processor_config.json").symlink_to(secret)
    status, text = run(pytester, tiny_llama, merge, "--merge-checks", "security")
    assert status == 1
    assert "processor_config.json: symlink resolves outside its folder" in text


# ---- tokenizers that claim more than the model --------------------------------------------------


def benchmark_config(root: Path, tokenizer: str) -> Path:
    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "tasks"
    config = root / "gate.toml"
    config.write_text(
        f"tokenizer = '{tokenizer}'\nconfig_allow = ['vocab_size']\n[benchmark]\n"
        f"include_path = '{fixtures}'\n[benchmark.tasks.tiny_choice]\nacc = {{ floor = 0.0 }}\n"
    )
    return config


def test_builtin_tokenizer_sized_by_the_model_not_the_config(pytester, tiny_llama, merge):
    """An allow-listed vocab_size of 10**9 with builtin:chars: refused before building."""
    config = json.loads((merge / "config.json").read_text())
    config["vocab_size"] = 10**9
    (merge / "config.json").write_text(json.dumps(config))
    gate = benchmark_config(pytester.path, "builtin:chars")
    status, text = run(pytester, tiny_llama, merge, "--merge-config", str(gate),
                       "--merge-checks", "benchmark")
    assert status == 1
    assert (f"{merge / 'config.json'}: vocab_size 1000000000 but the input embedding holds"
            " 128 rows; refusing to build a builtin:chars tokenizer larger than the model") in text


def test_tokenizer_claiming_a_billion_ids_is_refused_before_loading(pytester, tiny_llama, merge):
    from harness.evals.tokenizer import build_char_tokenizer

    folder = build_char_tokenizer(pytester.path / "tokenizer", 128)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 10**9, "content": "<x>", "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(data))
    gate = benchmark_config(pytester.path, str(folder))
    status, text = run(pytester, tiny_llama, merge, "--merge-config", str(gate),
                       "--merge-checks", "benchmark")
    assert status == 1
    assert (f"{folder / 'tokenizer.json'}: declares token id 1000000000 but the model's input"
            " embedding holds 128 rows") in text


# ---- the merger copies side files under the same guards ------------------------------------------


def test_merge_refuses_a_side_file_symlinked_to_a_secret(tmp_path, tiny_llama, secret):
    import subprocess
    import sys

    base = Path(shutil.copytree(tiny_llama.base, tmp_path / "base"))
    (base / "generation_config.json").unlink()
    (base / "generation_config.json").symlink_to(secret)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "merge", str(base), str(tiny_llama.adapter),
         str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 4
    assert done.stderr.strip() == (
        f"merge-harness merge: {base / 'generation_config.json'}: symlink resolves outside its"
        f" folder (to {secret}); refusing to read it"
    )
    assert not out.exists() and SECRET not in done.stdout + done.stderr


# ---- hostile inputs that used to be "internal error" or "ran out of resources" ------------------


def _deep_sidecar(merge: Path, adapter: Path) -> Path:
    (merge / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000)
    return merge / "generation_config.json"


def _deep_pattern(merge: Path, adapter: Path) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"(" * 5000 + "q_proj" + ")" * 5000: 4}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return Path("adapter_config.json")


def _repeat_count(merge: Path, adapter: Path) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = "q_proj{4294967296}"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return Path("adapter_config.json")


def _huge_empty_dimension(merge: Path, adapter: Path) -> Path:
    from hostile import join, split

    path = merge / "model.safetensors"
    header, data = split(path)
    header["empty"] = {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [len(data)] * 2}
    path.write_bytes(join(header, data))
    return path


@pytest.mark.parametrize(
    "make",
    [_deep_sidecar, _deep_pattern, _repeat_count, _huge_empty_dimension],
    ids=["sidecar-nested-100000", "rank-pattern-nested-5000", "repeat-2**32", "dimension-2**64"],
)
def test_hostile_inputs_are_named_not_internal_errors(pytester, tiny_llama, merge, make):
    adapter = Path(shutil.copytree(tiny_llama.adapter, pytester.path / "adapter"))
    named = make(merge, adapter)
    result = pytester.runpytest(
        "-p", "no:randomly", "--merge-checks", "structure,weights,behaviour", "-k",
        "not forward and not generation and not logits",
        "--merged-model", str(merge), "--base-model", str(tiny_llama.base),
        "--adapter", str(adapter), "--merge-examples", "2",
    )
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 1
    assert "Traceback" not in output and "INTERNALERROR" not in output
    assert "internal error" not in output and "ran out of resources" not in output, output
    failed = [line for line in result.stdout.lines if line.startswith("FAIL merge::")]
    assert failed and all(str(named) in line for line in failed), failed


def test_tokenizer_naming_custom_code_is_not_loaded(pytester, tiny_llama, merge):
    from harness.evals.tokenizer import build_char_tokenizer

    folder = build_char_tokenizer(pytester.path / "tokenizer", 128)
    data = json.loads((folder / "tokenizer_config.json").read_text())
    data["auto_map"] = AUTO_MAP
    (folder / "tokenizer_config.json").write_text(json.dumps(data))
    (folder / "tokenization_evil.py").write_text("raise SystemExit('imported')\n")
    gate = benchmark_config(pytester.path, str(folder))
    status, text = run(pytester, tiny_llama, merge, "--merge-config", str(gate),
                       "--merge-checks", "benchmark")
    assert status == 1
    assert (f"{folder / 'tokenizer_config.json'}: auto_map asks for custom code; refusing to load"
            " the tokenizer") in text
