"""Names that are not valid Unicode, and JSON inputs past the size limit.

A file name with bytes that are not UTF-8 reaches Python as lone surrogates (``\\udcff``); so do
tensor names of an opted-in pickle. Every place that prints or writes them (the plugin's
terminal summary and reports, ``merge-harness hash``, the lock file) must escape them or refuse
them in one line, never fail with a UnicodeEncodeError traceback. JSON inputs larger than
:data:`harness.io.files.MAX_JSON_BYTES` are refused from their size, before a byte is parsed
(the files are sparse: nothing is written to disk).
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
from safetensors.torch import load_file

from harness.errors import ConfigError
from harness.gate.lockfile import Lock, read_lock, write_lock
from harness.io.files import MAX_JSON_BYTES


def non_utf8(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(bytes(folder) + b"/" + name))


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)],
                          capture_output=True, timeout=300, check=False, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_hash_of_a_non_utf8_folder_prints_it_escaped(tmp_path, tiny_llama):
    folder = non_utf8(tmp_path, b"merged-\xff\xfe")
    shutil.copytree(tiny_llama.merged, folder)
    done = cli("hash", folder)
    assert done.returncode == 0, done.stderr
    digest, printed = done.stdout.decode().split()
    assert printed == f"{tmp_path}/merged-\\udcff\\udcfe" and len(digest) == 64


def pickle_with_surrogate_names(source: Path, target: Path) -> Path:
    target.mkdir()
    tensors = load_file(source / "model.safetensors")
    tensors["weird-\udcff.weight"] = torch.ones(2)
    torch.save(tensors, target / "pytorch_model.bin")
    shutil.copy(source / "config.json", target / "config.json")
    return target


def test_hash_of_a_pickle_with_non_unicode_tensor_names(tmp_path, tiny_llama):
    folder = pickle_with_surrogate_names(tiny_llama.merged, tmp_path / "pickled")
    done = cli("hash", "--allow-pickle", "--json", folder)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert "weird-\udcff.weight" in manifest["tensors"]


def test_plugin_reports_non_unicode_names_escaped(pytester, tiny_llama):
    folder = pickle_with_surrogate_names(tiny_llama.merged, pytester.path / "pickled")
    report = non_utf8(pytester.path, b"report-\xff.json")
    result = pytester.runpytest(
        "-p", "no:randomly", "--merge-allow-pickle", "--merge-checks", "structure,hash,lock",
        "--merged-model", str(folder), "--base-model", str(tiny_llama.base),
        "--merge-report", str(report), "--update-merge-lock",
    )
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output and "UnicodeEncodeError" not in output
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        ["FAIL merge::structure::same_tensor_names *'weird-\\udcff.weight'*"]
    )
    data = json.loads(report.read_text(encoding="utf-8"))  # valid JSON, the path inside exact
    assert data["inputs"]["merged"] == str(folder)


def test_a_toml_lock_refuses_a_name_it_cannot_hold(tmp_path):
    with pytest.raises(ConfigError, match="not valid Unicode"):
        write_lock(tmp_path / "merge-harness.lock.toml",
                   Lock({"merged": "ab"}, {"weird-\udcff": "cd"}))
    assert list(tmp_path.iterdir()) == []
    write_lock(tmp_path / "merge-harness.lock", Lock({"merged": "ab"}, {"weird-\udcff": "cd"}))
    assert read_lock(tmp_path / "merge-harness.lock").merged_tensors == {"weird-\udcff": "cd"}


# ---- JSON inputs past the limit ------------------------------------------------------------------


def sparse(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        handle.write(b"{")
    os.truncate(path, size)


def test_an_oversized_adapter_config_is_refused_unread(pytester, tiny_llama):
    adapter = Path(shutil.copytree(tiny_llama.adapter, pytester.path / "adapter"))
    sparse(adapter / "adapter_config.json", MAX_JSON_BYTES + 1)
    result = pytester.runpytest("-p", "no:randomly", "--merge-checks", "weights",
                                "--merged-model", str(tiny_llama.merged), "--base-model",
                                str(tiny_llama.base), "--adapter", str(adapter))
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"FAIL merge::weights::* adapter_config.json: {MAX_JSON_BYTES + 1}"
                                 " bytes is too large for a JSON side file*"])


def test_an_oversized_lock_is_refused_unread(tmp_path):
    path = tmp_path / "merge-harness.lock"
    sparse(path, MAX_JSON_BYTES + 1)
    with pytest.raises(ConfigError, match="bytes is too large for a lock file"):
        read_lock(path)


def test_an_oversized_tokenizer_is_refused_unread(pytester, tiny_llama):
    from harness.evals.tokenizer import build_char_tokenizer

    folder = build_char_tokenizer(pytester.path / "tokenizer", 128)
    sparse(folder / "tokenizer.json", MAX_JSON_BYTES + 1)
    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "tasks"
    gate = pytester.path / "gate.toml"
    gate.write_text(f"tokenizer = '{folder}'\n[benchmark]\ninclude_path = '{fixtures}'\n"
                    "[benchmark.tasks.tiny_choice]\nacc = { floor = 0.0 }\n")
    result = pytester.runpytest("-p", "no:randomly", "--merge-checks", "benchmark",
                                "--merged-model", str(tiny_llama.merged), "--base-model",
                                str(tiny_llama.base), "--merge-config", str(gate))
    assert result.ret == 1
    assert "too large for a JSON side file" in result.stdout.str()
