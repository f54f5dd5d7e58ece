"""An fp16 merge whose exact value exceeds the fp16 range fails with the overflow named.

The base is a tiny fp16 Llama with one weight at the top of the fp16 range (as outlier weights
in real checkpoints are); peft merges a LoRA whose delta pushes it beyond, computes the sum in
fp32 and rounds it to Inf when saving: every merged element is peft's faithful rounding, and
the model is still broken.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.oracle import weight_results

from harness import cli
from harness.run.result import Outcome
from harness.tiny import build_adapter, build_base, peft_merge

Q0 = "model.layers.0.self_attn.q_proj.weight"
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("overflow")
    base = build_base(root / "base", "llama", "F16")
    adapter = build_adapter(base, root / "adapter", scale=3.0, target_modules=["q_proj"])
    # where the delta is largest, put the base weight at the fp16 maximum with the same sign
    raw = load_file(adapter / "adapter_model.safetensors")
    a = raw[KEY.replace("lora_B", "lora_A")].float()
    delta = (raw[KEY].float() @ a) * 2.0  # alpha/r = 8/4
    flat = int(delta.abs().argmax())
    row, col = divmod(flat, delta.shape[1])
    assert abs(float(delta[row, col])) > 16  # more than half an fp16 ULP at 65504
    tensors = load_file(base / "model.safetensors")
    tensors[Q0][row, col] = math.copysign(65504.0, float(delta[row, col]))
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    merged = peft_merge(base, adapter, root / "merged")
    return base, adapter, merged, (row, col)


def test_peft_really_wrote_an_inf(overflow):
    _, _, merged, (row, col) = overflow
    value = load_file(merged / "model.safetensors")[Q0][row, col]
    assert torch.isinf(value)


def test_the_weights_family_names_the_overflow(overflow):
    base, adapter, merged, (row, col) = overflow
    found = weight_results(merged, base, adapter)
    targeted = found["targeted_match_reference"]
    assert targeted.outcome is Outcome.FAILED
    assert "overflow: W + delta exceeds the fp16 range" in targeted.message
    assert f"[{row}, {col}]" in targeted.message
    assert "1 element(s) are Inf" in targeted.message


def test_a_nan_where_the_reference_fits_is_not_called_an_overflow(overflow, tmp_path):
    base, adapter, merged, _ = overflow
    out = tmp_path / "nan"
    shutil.copytree(merged, out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][2, 3] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    targeted = weight_results(out, base, adapter)["targeted_match_reference"]
    assert targeted.outcome is Outcome.FAILED
    assert "NaN or Inf where the exact merge is finite and within the fp16 range" in (
        targeted.message + " ".join(targeted.details))


def test_the_gate_fails_with_only_weights_and_hash(overflow, tmp_path, monkeypatch):
    base, adapter, merged, _ = overflow
    monkeypatch.chdir(tmp_path)
    for name in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT"):
        monkeypatch.delenv(name, raising=False)
    code = cli.main(["gate", "--merged-model", str(merged), "--base-model", str(base),
                     "--adapter", str(adapter), "--report-dir", str(Path(tmp_path, "r")),
                     "--", "--merge-checks", "weights,hash"])
    assert code != 0
