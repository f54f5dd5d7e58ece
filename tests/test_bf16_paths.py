"""LoRA factors held in bf16 at merge time: documented peft paths, judged by their own arithmetic.

``PeftModel.from_pretrained(..., autocast_adapter_dtype=False)`` and ``.to(torch.bfloat16)``
before merging round the fp32 factors to bf16 first; a PiSSA or OLoRA adapter converted to LoRA
(rank 2r, large cancelling products) and merged that way magnifies the effect. Each correct merge
passes and says which arithmetic was recognised; every fault of the corpus made on such a merge
is still caught, and the tiny-delta no-op still fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.checkpoints import read_tensors, write_faulty
from support.faults import DELTA_FAULTS, inject
from support.oracle import oracle, weight_results

from harness.behaviour.models import release_models
from harness.checks.behaviour import checks as behaviour_checks
from harness.run.context import Context
from harness.run.result import CheckResult, Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.tiny import build_adapter, build_base

Q0 = "model.layers.0.self_attn.q_proj.weight"
RECOGNISED = "LoRA factors held in bf16 at merge time"


def _merge(base: Path, adapter: Path, out: Path, how: str) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    if how == "autocast_off":
        peft_model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
    else:
        peft_model = PeftModel.from_pretrained(model, adapter)
        peft_model.to(torch.bfloat16)
    peft_model.merge_and_unload().save_pretrained(out)
    return out


def _converted(base: Path, root: Path, init: str) -> Path:
    """A PiSSA/OLoRA adapter trained a little and converted to plain LoRA, as peft documents."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=init))
    peft_model.save_pretrained(root / "initial")
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(root / "adapter",
                               path_initial_model_for_weight_conversion=str(root / "initial"))
    return root / "adapter"


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("bf16") / "base", "llama", "BF16")


@pytest.fixture(scope="module", params=["autocast_off", "to_bfloat16"])
def plain(request, bf16_base, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    adapter = build_adapter(bf16_base, root / "adapter")
    return bf16_base, adapter, _merge(bf16_base, adapter, root / "merged", request.param)


@pytest.fixture(scope="module", params=["pissa", "olora"])
def converted(request, bf16_base, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    adapter = _converted(bf16_base, root, request.param)
    return bf16_base, adapter, _merge(bf16_base, adapter, root / "merged", "autocast_off")


def test_the_default_arithmetic_really_refuses_these_merges(plain):
    from harness.deltas.lowrank import LoraLinear

    base, adapter, merged = plain
    original = LoraLinear.rounded
    try:
        LoraLinear.rounded = lambda self, code: None  # type: ignore[method-assign]
        assert any(not t.ok for t in oracle(merged, base, adapter).tensors)
    finally:
        LoraLinear.rounded = original  # type: ignore[method-assign]


def _passes_by_its_arithmetic(base: Path, adapter: Path, merged: Path) -> None:
    found = weight_results(merged, base, adapter)
    assert {n: r.message for n, r in found.items() if r.outcome is Outcome.FAILED} == {}
    assert RECOGNISED in found["targeted_match_reference"].message


def test_a_merge_with_bf16_factors_passes_and_names_its_arithmetic(plain):
    _passes_by_its_arithmetic(*plain)


def test_a_pissa_or_olora_adapter_converted_in_bf16_passes(converted):
    _passes_by_its_arithmetic(*converted)


@pytest.mark.parametrize("fault", [*sorted(DELTA_FAULTS), "layer"])
def test_every_fault_on_such_a_merge_is_caught(plain, tmp_path, fault):
    base, adapter, merged = plain
    out = inject(merged, base, fault, tmp_path / "faulty")
    result = oracle(out, base, adapter)
    failing = [t for t in result.tensors if not t.ok]
    assert failing, f"{fault} not caught"
    if fault != "layer":
        assert all(t.diagnosis and t.diagnosis != "no known fault fits" for t in failing)


def test_a_tiny_delta_left_out_is_still_caught(bf16_base, tmp_path):
    # weights in [1, 2) have a bf16 ULP of 2^-7: a delta below it passes the tolerance even
    # when never added; only the change requirement, under either arithmetic, catches it
    base = tmp_path / "base"
    shutil.copytree(bf16_base, base)
    tensors = load_file(base / "model.safetensors")
    tensors[Q0] = (tensors[Q0].float() * 0.5 + 1.25).to(torch.bfloat16)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    raw = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    a = raw[key.replace("lora_B", "lora_A")]
    raw[key] = raw[key] * (0.9 * 2**-7 / float(((raw[key] @ a) * 2).abs().max()))
    save_file(raw, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    merged = _merge(base, adapter, tmp_path / "merged", "autocast_off")
    assert {r.outcome for r in weight_results(merged, base, adapter).values()} <= {
        Outcome.PASSED, Outcome.SKIPPED}
    noop = write_faulty(merged, tmp_path / "noop", {Q0: read_tensors(base)[Q0]})
    found = weight_results(noop, base, adapter)
    assert found["adapter_applied"].outcome is Outcome.FAILED
    assert "adapter not applied" in found["adapter_applied"].message


def _forward_results(base: Path, adapter: Path, merged: Path) -> dict[str, CheckResult]:
    settings = Settings(merged=merged, base=base, adapter=adapter, examples=6)
    ctx = Context(settings)
    try:
        return {c.name: run_check(c, ctx) for c in behaviour_checks(settings)
                if c.name in ("equivalence", "layers")}
    finally:
        release_models(ctx)


def _accepted(base: Path, adapter: Path, merged: Path) -> None:
    """Their rounding differs from the twin's: within the allowance of every comparison."""
    found = _forward_results(base, adapter, merged)
    assert {n: r.message for n, r in found.items() if r.outcome is not Outcome.PASSED} == {}


def test_the_forward_passes_accept_a_merge_with_bf16_factors(plain):
    _accepted(*plain)


def test_the_forward_passes_accept_a_converted_adapter_merged_in_bf16(converted):
    _accepted(*converted)
