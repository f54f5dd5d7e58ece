"""MoE adapters with ``target_parameters``: verified per expert, in both stored layouts.

Tiny Qwen3-MoE, Mixtral and gpt-oss models are built with transformers 5, which fuses the experts
into 3-d parameters; peft 0.21 adapts them with ``lora.ParamWrapper`` and merges; the merge is
saved as transformers saves it: per expert by default for Qwen3-MoE and Mixtral (the layout their
hub checkpoints have), fused with ``save_original_format=False`` and for gpt-oss (stored fused).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.checkpoints import read_tensors
from support.moe import Moe
from support.oracle import oracle, weight_results

from harness.checks.structure import checks as structure_checks
from harness.merger import merge_checkpoint
from harness.run.context import Context
from harness.run.result import Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.tiny_configs import MOE


def _fused_copy(folder: Path, out: Path) -> Path:
    """``folder`` loaded by transformers 5 and saved with its experts fused."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    model.save_pretrained(out, save_original_format=False)
    return out


@pytest.fixture(scope="module", params=sorted(MOE))
def moe(request, tmp_path_factory):
    return Moe(tmp_path_factory.mktemp(f"moe-{request.param}"), request.param)


def test_the_layouts_are_what_transformers_saves(moe):
    names = set(read_tensors(moe.merged))
    if moe.arch == "gpt_oss":
        assert "model.layers.0.mlp.experts.gate_up_proj" in names
    elif moe.arch == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names
    else:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names
    config = json.loads((moe.adapter / "adapter_config.json").read_text())
    assert config["target_parameters"]


def test_a_correct_moe_merge_passes_expert_by_expert(moe):
    found = weight_results(moe.merged, moe.base, moe.adapter)
    assert {n: r.outcome for n, r in found.items() if r.outcome is Outcome.FAILED} == {}
    supported = found["adapter_supported"].message
    kind = "lora-experts" if moe.arch == "gpt_oss" else "lora-expert"
    assert kind in supported and "lora-param" in supported
    result = oracle(moe.merged, moe.base, moe.adapter)
    edited = [t for t in result.tensors if t.role.value == "targeted"]
    # q_proj and the router per layer, plus the experts: fused 2 stacks, else 4 experts x 3
    per_layer = 4 if moe.arch == "gpt_oss" else 2 + 4 * 3
    assert len(edited) == 2 * per_layer


def test_the_fused_layout_passes_too(moe, tmp_path):
    if moe.arch == "gpt_oss":
        pytest.skip("gpt-oss is stored fused already")
    base = _fused_copy(moe.base, tmp_path / "base")
    merged = _fused_copy(moe.merged, tmp_path / "merged")
    assert "model.layers.0.mlp.experts.gate_up_proj" in read_tensors(merged)
    found = weight_results(merged, base, moe.adapter)
    assert {n: r.message for n, r in found.items() if r.outcome is Outcome.FAILED} == {}
    assert "lora-experts" in found["adapter_supported"].message


def test_the_streaming_merger_is_peft_bit_for_bit(moe, tmp_path):
    ours = merge_checkpoint(moe.base, moe.adapter, tmp_path / "ours", progress=False)
    theirs, mine = read_tensors(moe.merged), read_tensors(ours)
    assert theirs.keys() == mine.keys()
    assert [n for n in theirs if not torch.equal(theirs[n], mine[n])] == []


def _layer0_experts(names, parameter_parts):
    return sorted(n for n in names if ".layers.0." in n and any(p in n for p in parameter_parts))


def test_experts_left_unmerged_are_named(moe, tmp_path):
    base, merged = read_tensors(moe.base), read_tensors(moe.merged)
    out = tmp_path / "skipped"
    shutil.copytree(moe.merged, out)
    tensors = load_file(out / "model.safetensors")
    if moe.arch == "gpt_oss":
        name = "model.layers.0.mlp.experts.gate_up_proj"
        tensors[name][[1, 3]] = base[name][[1, 3]]  # an exporter that skipped experts 1 and 3
    else:
        for name in merged:
            if ".layers.0." in name and (".experts.2." in name or ".experts.3." in name):
                tensors[name] = base[name].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    result = oracle(out, moe.base, moe.adapter)
    failing = {t.name: t.diagnosis for t in result.tensors if not t.ok}
    assert failing
    expected = "1, 3 of 4" if moe.arch == "gpt_oss" else "2, 3 of 4"
    for name, diagnosis in failing.items():
        assert ".layers.0." in name
        assert "delta applied to only some experts of model.layers.0.mlp.experts." in diagnosis
        assert f"expert(s) {expected} hold the base values" in diagnosis


def test_an_expert_parameter_left_out_entirely_is_named(moe, tmp_path):
    if moe.arch == "gpt_oss":
        pytest.skip("one fused tensor: 'adapter not applied' names it")
    base, merged = read_tensors(moe.base), read_tensors(moe.merged)
    out = tmp_path / "none"
    shutil.copytree(moe.merged, out)
    tensors = load_file(out / "model.safetensors")
    down = "w2" if moe.arch == "mixtral" else "down_proj"
    for name in merged:
        if ".experts." in name and f".{down}." in name:
            tensors[name] = base[name].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    failing = {t.name: t.diagnosis for t in oracle(out, moe.base, moe.adapter).tensors
               if not t.ok}
    assert len(failing) == 8
    assert all("delta applied to none of the 4 experts of" in d for d in failing.values())


def test_an_expert_with_a_doubled_delta_is_named(moe, tmp_path):
    base, merged = read_tensors(moe.base), read_tensors(moe.merged)
    name = sorted(n for n in merged if ".layers.1." in n and "experts" in n
                  and not torch.equal(merged[n], base[n]))[0]
    doubled = (base[name].float() + 2 * (merged[name].float() - base[name].float()))
    out = tmp_path / "doubled"
    shutil.copytree(moe.merged, out)
    tensors = load_file(out / "model.safetensors")
    tensors[name] = doubled.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    failing = {t.name: t.diagnosis for t in oracle(out, moe.base, moe.adapter).tensors
               if not t.ok}
    assert list(failing) == [name]
    assert "delta applied twice" in failing[name]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_target_modules_rewritten_by_peft_are_verified(arch, tmp_path):
    # peft 0.21 rewrites target_modules naming the v4 experts and router into target_parameters
    # (with rank and alpha doubled for the fused gate_up_proj)
    names = ["q_proj", "gate", "w1", "w2", "w3"] if arch == "mixtral" else "all-linear"
    case = Moe(tmp_path, arch, target_modules=names, target_parameters=None)
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["rank_pattern"]
    found = weight_results(case.merged, case.base, case.adapter)
    assert {n: r.message for n, r in found.items() if r.outcome is Outcome.FAILED} == {}


def test_a_merge_saved_fused_against_a_per_expert_base_says_why_names_differ(tmp_path):
    case = Moe(tmp_path / "case", "qwen3_moe")
    merged = _fused_copy(case.merged, tmp_path / "fused")
    settings = Settings(merged=merged, base=case.base, adapter=case.adapter)
    [check] = [c for c in structure_checks(settings) if c.name == "same_tensor_names"]
    found = run_check(check, Context(settings))
    assert found.outcome is Outcome.FAILED
    assert "'model.layers.0.mlp.experts.down_proj' is the other checkpoint's per-expert" in (
        found.message)
    assert "save both in the same layout" in found.message
