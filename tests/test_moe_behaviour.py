"""The behaviour family on MoE merges: outputs compared at positions routed alike.

A correct bf16 merge of an adapter on the experts and the router rounds the router's scores a
little differently from the unmerged adapter model, and at a near-tie a token goes to another
expert: its logits then differ far beyond rounding noise. The positions whose top-k experts
differ from R's are counted (bounded) and left out of |Δ|; faults still fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.checkpoints import read_tensors
from support.moe import Moe

from harness.behaviour.batch import run_probes, run_routed
from harness.behaviour.measure import Comparer, deviation, deviation_at
from harness.behaviour.models import adapter_model, merged_model, setup
from harness.behaviour.probe import pad_rows
from harness.case import MergeCase
from harness.checks import behaviour
from harness.run.result import CheckResult
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.tiny import build_adapter, peft_merge
from harness.tiny_configs import MOE_PARAMETERS

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    return Moe(tmp_path_factory.mktemp(f"moe-{request.param}"), request.param)


def _run(merged: Path, case: Moe, check: str, **settings) -> CheckResult:
    checks = {c.name: c for c in behaviour.checks(Settings())}
    fresh = MergeCase(merged, case.base, case.adapter, None, Settings(**settings))
    try:
        return run_check(checks[check], fresh.context())
    finally:
        fresh.release()


@pytest.mark.parametrize("dtype", [None, "BF16"])
def test_a_correct_moe_merge_passes_the_behaviour_family(moe, dtype):
    # before routing was recorded, the fp32 comparison failed the Qwen3-MoE merge 24.6x over
    # its allowance at positions routed to other experts
    for check in ("loads", "equivalence", "generation"):
        result = _run(moe.merged, moe, check, dtype=dtype)
        assert result.outcome.value == "passed", (check, result.message)
    found = _run(moe.merged, moe, "equivalence", dtype=dtype)
    assert "routed differently from R" in found.message
    metrics = found.metrics
    assert metrics["positions"] > 200 and 0 <= metrics["rerouted"] < metrics["rerouted_allowed"]
    assert metrics["tolerance"]["routing"]["floor"] == 0.125


def _variant(case: Moe, out: Path, replace) -> Path:
    """``case.merged`` with the tensors ``replace`` names set to what it gives."""
    base = read_tensors(case.base)
    shutil.copytree(case.merged, out)
    tensors = load_file(out / "model.safetensors")
    for name in list(tensors):
        if replace(name):
            tensors[name] = base[name].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("left", ["router", "experts"])
def test_a_router_or_experts_left_unmerged_fails_on_its_routing(moe, left, tmp_path):
    part = ".gate.weight" if left == "router" else ".experts."
    broken = _variant(moe, tmp_path / "broken", lambda n: part in n)
    result = _run(broken, moe, "equivalence")
    assert result.outcome.value == "failed"
    assert "positions to other experts than the F32 reference" in result.message
    routing = result.metrics["routing"]
    assert routing["merged"] > routing["allowed"]


def test_another_adapters_merge_fails_on_its_routing(moe, tmp_path):
    options = {"target_modules": ["q_proj"], "target_parameters": list(MOE_PARAMETERS[moe.arch]),
               "r": 2, "lora_alpha": 4}
    other = build_adapter(moe.base, tmp_path / "other-adapter", seed=7, **options)
    result = _run(peft_merge(moe.base, other, tmp_path / "other"), moe, "equivalence")
    assert result.outcome.value == "failed"
    assert "positions to other experts than the F32 reference" in result.message


def test_a_doubled_expert_delta_still_fails(moe, tmp_path):
    base, merged = read_tensors(moe.base), read_tensors(moe.merged)
    out = tmp_path / "doubled"
    shutil.copytree(moe.merged, out)
    tensors = load_file(out / "model.safetensors")
    for name in merged:
        if ".experts." in name and not torch.equal(merged[name], base[name]):
            doubled = base[name].float() + 2 * (merged[name].float() - base[name].float())
            tensors[name] = doubled.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    result = _run(out, moe, "equivalence")
    assert result.outcome.value == "failed", result.message
    assert "routing" in result.metrics  # the minimal probe's routing figures are reported


def test_routing_is_recorded_through_peft_and_cut_like_the_logits(moe):
    case = MergeCase(moe.merged, moe.base, moe.adapter, None, Settings(dtype="BF16"))
    try:
        ctx = case.context()
        s = setup(ctx)
        alone = pad_rows([[5, 9, 2]], "none", 0)
        padded = pad_rows([[5, 9, 2], [7, 1, 3, 3, 8, 4]], "right", 0)
        for model in (merged_model(ctx), adapter_model(ctx)):  # A's routers are peft-wrapped
            one, both = run_routed(model, [alone, padded], s.task, s.space)
            assert one.routes is not None and both.routes is not None
            # (positions, layers x top-k): the tiny models have 2 layers and pick 2 experts
            assert one.routes.shape == (3, 4) and both.routes.shape == (9, 4)
            assert torch.equal(one.routes, both.routes[:3])  # padding routes nothing else
            assert bool((one.routes.diff(dim=-1)[:, ::2] > 0).all())  # each set sorted
            # the values are those run_probes gives, row for row
            assert torch.equal(one.values, run_probes(model, [alone], s.task, s.space)[0])
    finally:
        case.release()


def test_a_model_without_routers_is_judged_on_every_position(tiny_llama_bf16):
    case = MergeCase(tiny_llama_bf16.merged, tiny_llama_bf16.base, tiny_llama_bf16.adapter,
                     None, Settings(examples=3))
    try:
        comparer = Comparer(case.context())
        probe = pad_rows([[1, 2, 3, 4]], "none", 0)
        [ran] = run_routed(comparer.merged, [probe], comparer.setup.task, comparer.setup.space)
        assert ran.routes is None
        figures = comparer.measure(probe)
        assert figures.routing is None and comparer.tolerance.routing is None
        assert "routing" not in comparer.tolerance.to_json()
    finally:
        case.release()


def test_positions_routed_differently_are_left_out_of_the_deviation():
    reference = torch.zeros(4, 3, dtype=torch.float64)
    values = reference.clone()
    values[2] = 5.0  # one position routed to another expert
    flipped = torch.tensor([False, False, True, False])
    assert deviation_at(values, reference, flipped, True).max_abs == 0.0
    assert deviation_at(values, reference, None, True) == deviation(values, reference, True)
    assert deviation_at(values, reference, torch.ones(4, dtype=torch.bool), True).max_abs == 0.0
