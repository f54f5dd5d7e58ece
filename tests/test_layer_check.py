"""behaviour::layers: every layer, given the reference's input, judged on its own.

Real tiny models and real peft merges; the faults are made in a copy of the merged files the way
a broken exporter makes them (one layer's delta doubled, one layer left unmerged).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.faults import scale_layer
from support.moe import Moe

from harness.behaviour.layers import C_LAYER, layers_of, measure_layers
from harness.behaviour.models import merged_model, release_models
from harness.case import MergeCase
from harness.checks.behaviour import checks as behaviour_checks
from harness.run.context import Context
from harness.run.result import CheckResult, Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings


def layer_check(merged: Path, base: Path, adapter: Path) -> CheckResult:
    """Run ``behaviour::layers`` on a merge."""
    settings = Settings(merged=merged, base=base, adapter=adapter)
    check = {c.name: c for c in behaviour_checks(settings)}["layers"]
    ctx = Context(settings)
    try:
        return run_check(check, ctx)
    finally:
        release_models(ctx)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer bf16 Llama, an all-linear LoRA adapter, and peft's merge."""
    from harness.plugin.fixtures import TinyMergeFactory

    factory = TinyMergeFactory(tmp_path_factory.mktemp("layers"))
    return factory(arch="llama", dtype="BF16", layers=4, scale=0.05, target_modules="all-linear")


def test_a_correct_merge_passes_every_layer(deep):
    result = layer_check(deep.merged, deep.base, deep.adapter)
    assert result.outcome is Outcome.PASSED, result.message
    assert result.message.startswith("each of 4 layers, given the reference's input")
    assert result.metrics["layers"] == 4
    # peft's merge rounds as the twin does: the same outputs, layer by layer
    assert result.metrics["worst"]["merged"] == pytest.approx(result.metrics["worst"]["noise"])


@pytest.mark.parametrize(("times", "what"), [(2.0, "doubled"), (0.0, "left unmerged")])
def test_one_faulty_layer_is_named(deep, tmp_path, times, what):
    bad = scale_layer(deep.merged, deep.base, tmp_path / what.replace(" ", "-"), 2, times)
    result = layer_check(bad, deep.base, deep.adapter)
    assert result.outcome is Outcome.FAILED, result.message
    assert result.message.startswith("layer model.layers.2 computes ")
    assert result.message.endswith("every other layer is within its allowance"), result.message
    failed = result.metrics["failed"]
    assert [f["layer"] for f in failed] == ["model.layers.2"]
    assert failed[0]["merged"] > C_LAYER * failed[0]["noise"]


def test_teacher_forcing_isolates_each_layer(deep, tmp_path):
    """With layer 1 broken, layers 2 and 3 still match: each ran on the reference's input."""
    bad = scale_layer(deep.merged, deep.base, tmp_path / "broken-1", 1, 3.0)
    ctx = MergeCase(bad, deep.base, deep.adapter).context()
    try:
        figures = {f.name: f for f in measure_layers(ctx)}
    finally:
        release_models(ctx)
    assert not figures["model.layers.1"].ok
    for name in ("model.layers.0", "model.layers.2", "model.layers.3"):
        assert figures[name].merged == pytest.approx(figures[name].noise), name


def test_layers_are_named_as_in_the_transformers_model(deep):
    ctx = MergeCase(deep.merged, deep.base, deep.adapter).context()
    try:
        names = [name for name, _ in layers_of(merged_model(ctx))]
    finally:
        release_models(ctx)
    assert names == [f"model.layers.{i}" for i in range(4)]



@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_a_correct_moe_merge_of_experts_and_router_passes(arch, tmp_path):
    """Adapters on the experts and the router: a rounding may send a token to another expert,
    which moves that position only; the quantile over positions looks past it."""
    case = Moe(tmp_path, arch)
    merged, base, adapter = case.merged, case.base, case.adapter
    result = layer_check(merged, base, adapter)
    assert result.outcome is Outcome.PASSED, result.message
    doubled = scale_layer(merged, base, tmp_path / "doubled", 1, 2.0)
    result = layer_check(doubled, base, adapter)
    assert result.outcome is Outcome.FAILED, result.message
    assert result.message.startswith("layer model.layers.1 computes ")
