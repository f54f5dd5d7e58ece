"""The weight oracle on correct merges (peft's and ours), its streaming pass and its items."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from support.checkpoints import read_tensors, write_faulty
from support.oracle import lora_deltas, oracle, rounded, weight_results

from harness.checks import passes
from harness.io.adapter import Adapter
from harness.io.checkpoint import Checkpoint
from harness.oracle.stream import run_oracle
from harness.run.context import Context
from harness.run.result import Outcome
from harness.run.settings import Settings
from harness.stream.scan import scan_checkpoint

CORRECT = [
    ("llama", "F32", None, {}),
    ("llama", "BF16", None, {}),
    ("llama", "F16", None, {}),
    ("llama", "BF16", "20KB", {}),
    ("llama", "BF16", None, {"use_rslora": True, "r": 8, "lora_alpha": 16}),
    ("llama", "BF16", None, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    ("gpt2", "BF16", None, {"target_modules": ["c_attn", "c_proj", "c_fc"],
                            "fan_in_fan_out": True}),
    ("qwen2", "BF16", None, {}),
    ("llama", "BF16", None, {"use_dora": True}),
    ("llama", "F32", None, {"use_dora": True, "target_modules": ["q_proj", "embed_tokens"]}),
    ("llama", "BF16", None, {"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}),
    ("llama", "BF16", None, {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}),
    ("qwen2", "BF16", None, {"target_modules": ["q_proj"], "trainable_token_indices": [2, 4]}),
]
IDS = ["llama-f32", "llama-bf16", "llama-f16", "sharded", "rslora", "patterns", "gpt2-conv1d",
       "qwen2-tied", "dora", "dora-embedding-f32", "mts-lm_head", "embedding", "tokens"]


@pytest.mark.parametrize("merger", ["peft", "ours"])
@pytest.mark.parametrize(("arch", "dtype", "shard", "lora"), CORRECT, ids=IDS)
def test_correct_merges_pass(workshop, arch, dtype, shard, lora, merger):
    base = workshop.base(arch, dtype, shard)
    adapter = workshop.adapter(base, **lora)
    merged = workshop.peft(base, adapter) if merger == "peft" else workshop.ours(base, adapter)
    results = weight_results(merged, base, adapter)
    assert {n: r.outcome for n, r in results.items() if r.outcome is not Outcome.SKIPPED} == {
        n: Outcome.PASSED for n, r in results.items() if r.outcome is not Outcome.SKIPPED}, {
        n: r.message for n, r in results.items()}
    # The derivation says one round-to-nearest suffices: k = 1/2 must pass too.
    assert all(t.ok for t in oracle(merged, base, adapter, k=0.5).tensors)


def test_without_rounding_allowance_a_correct_bf16_merge_fails(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    result = oracle(workshop.ours(base, adapter), base, adapter, k=0.0)
    assert any(not t.ok for t in result.tensors)


def test_one_pass_reads_each_tensor_once_and_yields_both_scans(workshop):
    base = workshop.base("llama", "BF16", "20KB")
    adapter = workshop.adapter(base)
    merged = workshop.ours(base, adapter)
    m, b = Checkpoint.open(merged), Checkpoint.open(base)
    result, merged_scan, base_scan = run_oracle(m, b, [Adapter.open(adapter)])
    assert result.bytes_read == m.data_bytes + b.data_bytes
    assert merged_scan.manifest.digest == scan_checkpoint(m).manifest.digest
    assert base_scan.manifest.tensors == scan_checkpoint(b).manifest.tensors
    assert merged_scan.nonfinite == {}


def test_the_context_runs_the_oracle_once_and_seeds_the_scans(workshop, monkeypatch):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    ctx = Context(Settings(merged=workshop.ours(base, adapter), base=base, adapter=adapter))

    def no_second_read(checkpoint):
        raise AssertionError("scanned again")

    monkeypatch.setattr(passes, "scan_checkpoint", no_second_read)
    assert passes.merged_scan(ctx).manifest.digest
    assert passes.base_scan(ctx).manifest.digest
    assert passes.oracle(ctx) is passes.oracle(ctx)


def test_without_the_weights_family_the_scan_reads_on_its_own(workshop):
    """Structure and hash alone do not pay for the oracle: a plain scan gives the digests."""
    from harness.run.result import Family

    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    settings = Settings(merged=workshop.ours(base, adapter), base=base, adapter=adapter,
                        families=frozenset({Family.STRUCTURE, Family.HASH}))
    ctx = Context(settings)
    assert passes.merged_scan(ctx).manifest.digest
    assert not ctx.known(passes.ORACLE)


def test_layer_table(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj", "v_proj"])
    merged = workshop.ours(base, adapter)
    w = read_tensors(base)
    deltas = lora_deltas(adapter, {n: t.shape for n, t in w.items()})
    q0 = "model.layers.0.self_attn.q_proj.weight"
    doubled = write_faulty(merged, workshop.folder("table"), {q0: rounded(w[q0], deltas[q0] * 2)})
    result = weight_results(doubled, base, adapter)["targeted_match_reference"]
    layers = {row["tensor"]: row for row in result.layers}
    assert set(layers) == {n for n in deltas}
    assert layers[q0]["ratio"] == pytest.approx(2.0, rel=0.01)
    assert layers[q0]["ok"] is False
    other = layers["model.layers.1.self_attn.v_proj.weight"]
    assert other["ratio"] == pytest.approx(1.0, rel=0.01) and other["ok"]
    assert other["expected_norm"] == pytest.approx(float(deltas[other["tensor"]].norm()), rel=0.01)
    for key in ("tensor", "role", "edits", "expected_norm", "found_norm", "ratio",
                "relative_error", "max_ulp", "bound_use", "ok"):
        assert key in other
    json.dumps(result.metrics)
    assert any(line.startswith("bound: |M-R| <= k*ulp(|R|+S) + S") for line in result.details)
    assert any(line.startswith(q0 + " | ") for line in result.details)


def test_items_skip_without_adapter_or_base(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    merged = workshop.ours(base, adapter)
    for options in (Settings(merged=merged, base=base), Settings(merged=merged, adapter=adapter)):
        from harness.checks.weights import checks
        from harness.run.runner import run_check

        ctx = Context(options)
        assert {run_check(c, ctx).outcome for c in checks(options)} == {Outcome.SKIPPED}


def test_an_unsupported_adapter_never_passes(workshop, tmp_path):
    base = workshop.base("llama", "BF16")
    adapter = tmp_path / "adapter"
    shutil.copytree(workshop.adapter(base), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "VERA"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    results = weight_results(workshop.ours(base, workshop.adapter(base)), base, adapter)
    assert results["adapter_supported"].message == (
        "adapter type VERA is not verifiable by merge-harness (verifiable: IA3, LOHA, LOKR,"
        " LORA, TRAINABLE_TOKENS)")
    assert {r.outcome for r in results.values()} == {Outcome.FAILED}


def test_missing_or_reshaped_targets_never_pass(workshop, tmp_path):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj", "v_proj"])
    merged = tmp_path / "merged"
    shutil.copytree(workshop.ours(base, adapter), merged)
    tensors = read_tensors(merged)
    q0, v0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    del tensors[q0]
    tensors[v0] = tensors[v0][:8].contiguous()
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
    failing = {t.name: t.diagnosis for t in oracle(merged, base, adapter).tensors if not t.ok}
    assert failing == {
        q0: "the tensor is missing from the merged checkpoint",
        v0: "shape [8, 32] differs from the base's [16, 32]",
    }


def test_any_architecture_without_a_model_class(tmp_path):
    """Made-up tensor names, no config model_type, an adapter written by hand."""
    from harness.merger import merge_checkpoint

    generator = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    weights = {
        "encoder.blocks.0.mixer.qkv.weight": torch.randn(48, 16, generator=generator),
        "encoder.blocks.0.mixer.out.weight": torch.randn(16, 16, generator=generator),
        "encoder.blocks.0.norm.scale": torch.ones(16),
    }
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()},
              base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.encoder.blocks.0.mixer.qkv"
    save_file({f"{prefix}.lora_A.weight": torch.randn(2, 16, generator=generator),
               f"{prefix}.lora_B.weight": torch.randn(48, 2, generator=generator)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["qkv"]}))
    merged = merge_checkpoint(base, adapter, tmp_path / "merged", progress=False)
    result = oracle(merged, base, adapter)
    assert [(t.name, t.role, t.ok) for t in result.tensors] == [
        ("encoder.blocks.0.mixer.out.weight", "untouched", True),
        ("encoder.blocks.0.mixer.qkv.weight", "targeted", True),
        ("encoder.blocks.0.norm.scale", "untouched", True),
    ]
    assert not all(t.ok for t in oracle(base, base, adapter).tensors)


# ---- through pytest --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj", "v_proj"])
    merged = workshop.ours(base, adapter)
    w = read_tensors(base)
    deltas = lora_deltas(adapter, {n: t.shape for n, t in w.items()})
    q0 = "model.layers.0.self_attn.q_proj.weight"
    faulty = write_faulty(merged, workshop.folder("e2e-faulty"),
                          {q0: rounded(w[q0], -deltas[q0])})
    return base, adapter, merged, faulty


def test_pytest_exits_0_for_a_good_merge_and_1_with_the_diagnosis(pytester, e2e):
    base, adapter, merged, faulty = e2e
    common = ["-p", "no:randomly", "--base-model", str(base), "--adapter", str(adapter),
              "--merge-checks", "structure,weights,hash"]
    good = pytester.runpytest("--merged-model", str(merged), *common)
    assert good.ret == 0, good.stdout.str()
    good.stdout.fnmatch_lines(["*PASS merge::weights::targeted_match_reference*"])
    bad = pytester.runpytest("--merged-model", str(faulty), *common)
    assert bad.ret == 1
    bad.stdout.fnmatch_lines([
        "*model.layers.0.self_attn.q_proj.weight: * elements outside the bound; worst element*"
        "diagnosis: sign flipped (delta subtracted) in model.layers.0.self_attn.q_proj*",
    ])


def test_pytest_merges_itself_without_merged_model(pytester, e2e):
    base, adapter, _, _ = e2e
    result = pytester.runpytest(
        "-p", "no:randomly", "--base-model", str(base), "--adapter", str(adapter),
        "--merge-checks", "weights")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*merged with the streaming merger*", "*4 passed, 1 skipped*"])
