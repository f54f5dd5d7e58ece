"""A merge checked against another base than the one it was made into: the cause is named.

Each case is made the way users make it: peft merges into a base that bitsandbytes quantised to
NF4 and dequantised (a QLoRA-style merge), into a model that already holds an earlier merge, or
into another snapshot of the base; the harness is then given the original base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.oracle import oracle, weight_results

from harness.oracle.bases import NF4_LEVELS
from harness.run.result import Outcome
from harness.tiny import build_adapter, build_base, peft_merge


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("wrong-base") / "base", "llama", "BF16")


def _messages(merged: Path, base: Path, adapter: Path) -> str:
    found = weight_results(merged, base, adapter)
    assert found["targeted_match_reference"].outcome is Outcome.FAILED
    return " ".join(r.message for r in found.values())


def test_the_nf4_levels_are_bitsandbytes_own():
    functional = pytest.importorskip("bitsandbytes.functional")
    table = functional.get_4bit_type("nf4", device="cpu")
    assert [float(x) for x in table] == list(NF4_LEVELS)


@pytest.mark.parametrize("order", ["dequantize then merge", "merge into 4-bit"])
def test_a_qlora_style_merge_into_a_dequantized_nf4_base_is_named(base, tmp_path, order):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    quantised = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantised,
                                                 dtype=torch.bfloat16, device_map="cpu")
    if order == "dequantize then merge":
        model = model.dequantize()
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    else:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().dequantize()
    merged.save_pretrained(tmp_path / "merged")
    text = _messages(tmp_path / "merged", base, adapter)
    assert "merged into a dequantized 4-bit (NF4) base" in text
    assert "one scale per block of 64 elements" in text
    label = "M - delta takes" if order == "dequantize then merge" else "M takes"
    assert label in text
    assert "merge the adapter into the 16-bit base instead" in text


def test_a_sequential_merge_checked_against_the_original_base_is_named(base, tmp_path):
    first = build_adapter(base, tmp_path / "first", seed=11, target_modules="all-linear")
    earlier = peft_merge(base, first, tmp_path / "earlier")
    second = build_adapter(earlier, tmp_path / "second", seed=12,
                           target_modules=["q_proj", "v_proj"])
    merged = peft_merge(earlier, second, tmp_path / "merged")
    assert all(t.ok for t in oracle(merged, earlier, second).tensors)
    text = _messages(merged, base, second)
    assert "an earlier merge is already in the weights" in text
    assert "the base to give is the earlier merge" in text


def test_a_merge_into_another_base_revision_is_named(base, tmp_path):
    # another snapshot: every tensor moved a little (as further training moves it)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", "generation_config.json"):
        if (base / name).exists():
            (snapshot / name).write_bytes((base / name).read_bytes())
    generator = torch.Generator().manual_seed(5)
    tensors = {n: (t.float() * (1 + 0.02 * torch.randn(t.shape, generator=generator))).to(t.dtype)
               for n, t in load_file(base / "model.safetensors").items()}
    save_file(tensors, snapshot / "model.safetensors", metadata={"format": "pt"})
    adapter = build_adapter(snapshot, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    merged = peft_merge(snapshot, adapter, tmp_path / "merged")
    text = _messages(merged, base, adapter)
    assert "merged into a different base revision" in text
    assert "give the base the merge was made from" in text


def test_one_noisy_tensor_is_not_called_a_base_problem(base, tmp_path):
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    merged = peft_merge(base, adapter, tmp_path / "merged")
    tensors = load_file(merged / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    generator = torch.Generator().manual_seed(3)
    tensors[name] = (tensors[name].float() + 0.05 * torch.randn(tensors[name].shape,
                                                                generator=generator)).bfloat16()
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
    failing = {t.name: t.diagnosis for t in oracle(merged, base, adapter).tensors if not t.ok}
    assert failing == {name: "no known fault fits"}
