"""Hostile numbers and sizes: non-finite adapter factors, overflowing deltas, DoRA without its
magnitudes, tensors larger than the inputs justify, and floods of output.

Each input is a real adapter or checkpoint changed as an attacker would change it (a value set
to Inf, a header declaring a 6 GiB tensor over a sparse file, a 50 MB config value), checked
through the real plugin in-process or, where memory is measured, in a subprocess that reports
its own peak RSS.
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
from hostile import add_tensor, join, split
from safetensors.torch import load_file, save_file

from harness.tiny import peft_merge

GIB = 1024**3


def copy(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


def edit_adapter(folder: Path, change) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def first(tensors: dict[str, torch.Tensor], role: str) -> str:
    return sorted(k for k in tensors if role in k and "q_proj" in k)[0]


def run(pytester, *args: str) -> pytest.RunResult:
    result = pytester.runpytest("-p", "no:randomly", *args)
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output and "INTERNALERROR" not in output, output
    return result


# ---- non-finite and overflowing adapters --------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_a_non_finite_adapter_factor_fails_by_itself(pytester, tiny_llama, value):
    """One Inf in lora_B: the bound would be infinite and pass anything; the check fails."""
    adapter = copy(tiny_llama.adapter, pytester.path / "adapter")
    names: list[str] = []

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        names.append(first(tensors, "lora_B"))
        tensors[names[0]][0, 0] = value

    edit_adapter(adapter, poison)
    result = run(pytester, "--merge-checks", "weights", "--merged-model", str(tiny_llama.merged),
                 "--base-model", str(tiny_llama.base), "--adapter", str(adapter))
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        f"FAIL merge::weights::* {adapter}/adapter_model.safetensors: adapter tensor"
        f" '{names[0]}' holds 1 NaN/Inf value(s): a non-finite adapter factor makes every"
        " merged value unverifiable",
    ])
    assert "PASS merge::weights::targeted" not in result.stdout.str()


def test_an_overflowing_delta_never_widens_the_bound(pytester, tiny_llama_bf16):
    """Finite factors whose product overflows: peft writes Inf, and Inf == Inf must not pass."""
    adapter = copy(tiny_llama_bf16.adapter, pytester.path / "adapter")

    def inflate(tensors: dict[str, torch.Tensor]) -> None:
        for role in ("lora_A", "lora_B"):
            name = first(tensors, role)
            tensors[name] = (tensors[name].float() * 1e20).to(tensors[name].dtype)

    edit_adapter(adapter, inflate)
    merged = peft_merge(tiny_llama_bf16.base, adapter, pytester.path / "merged")
    assert not torch.isfinite(load_file(merged / "model.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"].float()).all()  # what peft really writes
    result = run(pytester, "--merge-checks", "weights", "--merged-model", str(merged),
                 "--base-model", str(tiny_llama_bf16.base), "--adapter", str(adapter))
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAIL merge::weights::targeted_match_reference *"])
    assert "the reference is not finite" in result.stdout.str()


def test_merge_refuses_a_non_finite_adapter(tmp_path, tiny_llama):
    adapter = copy(tiny_llama.adapter, tmp_path / "adapter")
    edit_adapter(adapter, lambda t: t[first(t, "lora_A")].__setitem__((0, 0), float("inf")))
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "merge", str(tiny_llama.base), str(adapter),
         str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 4
    assert "holds 1 NaN/Inf value(s)" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_use_dora_without_magnitudes_is_a_broken_adapter(pytester, tiny_llama):
    adapter = copy(tiny_llama.adapter, pytester.path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = run(pytester, "--merge-checks", "weights", "--merged-model", str(tiny_llama.merged),
                 "--base-model", str(tiny_llama.base), "--adapter", str(adapter))
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "FAIL merge::weights::* adapter module '*': use_dora is set but the adapter holds no"
        " lora_magnitude_vector for it*",
    ])


def test_a_complex_adapter_tensor_is_refused(pytester, tiny_llama):
    adapter = copy(tiny_llama.adapter, pytester.path / "adapter")
    edit_adapter(adapter, lambda t: t.__setitem__("base_model.model.extra.lora_A.weight",
                                                   torch.zeros(2, 2, dtype=torch.complex64)))
    result = run(pytester, "--merge-checks", "weights", "--merged-model", str(tiny_llama.merged),
                 "--base-model", str(tiny_llama.base), "--adapter", str(adapter))
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAIL merge::weights::* adapter tensor"
                                 " 'base_model.model.extra.lora_A.weight' is C64; adapter weights"
                                 " are floating point"])


# ---- sizes the inputs do not justify, measured ------------------------------------------------

PEAK = """
import resource, sys, pytest
code = pytest.main(sys.argv[1:])
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(code)
"""


def measured(cwd: Path, *args: str) -> tuple[int, str, int]:
    """Run pytest in a subprocess; return its exit status, its output and its peak RSS (bytes)."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK, "-p", "no:randomly", "-p", "no:cacheprovider", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    peak = int(done.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    return done.returncode, done.stdout + done.stderr, peak


def test_an_unjustified_6_gib_tensor_is_refused_before_it_is_read(tmp_path, tiny_llama):
    """A merged checkpoint declaring an extra 6 GiB tensor (a sparse file): refused from its
    header, with memory staying at the size of the tiny model's run."""
    merged = copy(tiny_llama.merged, tmp_path / "merged")
    path = merged / "model.safetensors"
    header, data = split(path)
    size = 6 * GIB
    header["extra.weight"] = {"dtype": "F32", "shape": [size // 4],
                              "data_offsets": [len(data), len(data) + size]}
    raw = join(header, data)
    path.write_bytes(raw)
    os.truncate(path, len(raw) + size)  # sparse: 6 GiB declared, nothing on disk
    status, output, peak = measured(tmp_path, "--merge-checks", "structure,hash",
                                    "--merged-model", str(merged),
                                    "--base-model", str(tiny_llama.base))
    assert status == 1, output
    assert "Traceback" not in output
    assert (f"{path}: tensor 'extra.weight' holds 6.00 GiB, more than 2x any tensor of the base"
            " or the adapter") in output
    assert peak < 1.5 * GIB, f"peak RSS {peak / GIB:.2f} GiB"


def test_a_50_mb_config_value_does_not_flood_the_output(tmp_path, tiny_llama):
    merged = copy(tiny_llama.merged, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    config["notes"] = "x" * (50 * 1024 * 1024)
    (merged / "config.json").write_text(json.dumps(config))
    add_tensor(merged / "model.safetensors", "n" * 5_000_000)  # a 5 MB tensor name too
    report = tmp_path / "report.json"
    status, output, peak = measured(tmp_path, "--merge-checks", "structure",
                                    "--merged-model", str(merged), "--base-model",
                                    str(tiny_llama.base), "--merge-report", str(report))
    assert status == 1
    assert "config_allowlist" in output and "more characters" in output
    assert len(output) < 200_000, len(output)
    assert report.stat().st_size < 1_000_000
    assert peak < 2 * GIB, f"peak RSS {peak / GIB:.2f} GiB"
