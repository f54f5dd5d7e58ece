"""The delta registry: key layout, config validation, peft semantics of every adapter type."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from support.checkpoints import read_tensors
from support.oracle import oracle

from harness.deltas import REGISTRY, Target, plan_adapter, plan_adapters
from harness.deltas.apply import reference_tensor
from harness.deltas.lora import fan_in_fan_out
from harness.deltas.lowrank import LoraScale
from harness.errors import AdapterError, UnsupportedAdapterError
from harness.io.adapter import Adapter, parse_layout, validate_config
from harness.io.checkpoint import Checkpoint
from harness.io.patterns import pattern_key
from harness.io.safetensors import TensorInfo
from harness.ulp import compute_dtype


def _info(name, shape):
    from pathlib import Path

    return TensorInfo(name, "F32", tuple(shape), Path("x"), 0, 0)


def test_registry_names_the_types_peft_merges():
    assert set(REGISTRY) == {"LORA", "IA3", "LOHA", "LOKR", "TRAINABLE_TOKENS"}


def test_layout_maps_saved_keys_to_modules():
    keys = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.base_layer.weight",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.lm_head.modules_to_save.default.weight",
        "model.layers.1.mlp.up_proj.lora_A.default.weight",  # unprefixed, adapter name kept
    ]
    layout = parse_layout({k: _info(k, (1,)) for k in keys})
    q = layout.modules["model.layers.0.self_attn.q_proj"]
    assert set(q) == {"lora_A", "lora_B", "lora_B.bias", "lora_magnitude_vector"}
    assert set(layout.modules["model.embed_tokens"]) == {"lora_embedding_A",
                                                         "trainable_tokens_delta"}
    assert set(layout.modules["model.layers.1.mlp.up_proj"]) == {"lora_A"}
    assert layout.copies == {
        "model.embed_tokens.weight": keys[5],
        "lm_head.weight": keys[7],
    }
    assert layout.base_layer_copies == {"model.embed_tokens.weight"}


@given(
    module=st.lists(st.sampled_from(["model", "layers", "0", "1", "q_proj", "self_attn", "mlp",
                                     "k_proj", "down_proj"]), min_size=1, max_size=5),
    keys=st.lists(st.sampled_from(["q_proj", "layers.0.self_attn.q_proj", "proj", r"\d+.mlp.*",
                                   "model.layers.1.mlp.down_proj", "layers.*proj", "0"]),
                  max_size=4, unique=True),
)
def test_pattern_matching_is_peft_get_pattern_key(module, keys):
    name = ".".join(module)
    ours = pattern_key(dict.fromkeys(keys, 1), name)
    theirs = get_pattern_key(keys, name)
    assert (ours if ours is not None else name) == theirs


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def llama(workshop):
    base = workshop.base("llama", "F32")
    return base, workshop.adapter(base, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    ("changes", "cause"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"lora_alpha": -8}, "lora_alpha must be >= 0"),
        ({"lora_alpha": "big"}, "lora_alpha must be a number"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer"),
        ({"alpha_pattern": {"(": 4}}, "is not a regex"),
        ({"r": 8}, "lora_A has rank 4 but the config gives r=8"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern['q_proj']=2"),
        ({"use_bdlora": {"nblocks": 2}}, "adapter type LORA with block-diagonal LoRA"),
        ({"peft_type": "VERA"}, "adapter type VERA is not verifiable by merge-harness"),
    ],
)
def test_bad_configs_have_one_line_causes(tmp_path, llama, changes, cause):
    base, adapter = llama
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    _edit_config(folder, **changes)
    checkpoint = Checkpoint.open(base)
    with pytest.raises((AdapterError, UnsupportedAdapterError)) as info:
        plan_adapter(Adapter.open(folder), 0, Target(checkpoint.tensors, checkpoint.config or {}))
    assert cause in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_type_is_unsupported_not_invalid(tmp_path, llama):
    base, adapter = llama
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    _edit_config(folder, peft_type="BOFT")
    checkpoint = Checkpoint.open(base)
    with pytest.raises(UnsupportedAdapterError, match="adapter type BOFT is not verifiable"):
        plan_adapter(Adapter.open(folder), 0, Target(checkpoint.tensors, checkpoint.config or {}))


def test_modules_that_match_nothing_are_named(tmp_path, llama):
    base, adapter = llama
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace("q_proj", "query_key_value"): v for k, v in tensors.items()}
    save_file(renamed, folder / "adapter_model.safetensors")
    checkpoint = Checkpoint.open(base)
    with pytest.raises(AdapterError, match="query_key_value' matches no tensor of the base"):
        plan_adapter(Adapter.open(folder), 0, Target(checkpoint.tensors, checkpoint.config or {}))


def test_an_adapter_without_weights_is_refused(tmp_path, llama):
    _, adapter = llama
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    save_file({}, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no adapter weights"):
        validate_config(Adapter.open(folder))


def test_lora_bias_on_a_layer_without_bias_is_refused(workshop):
    # peft warns and cannot merge it either
    llama = workshop.base("llama", "F32")
    qwen = workshop.base("qwen2", "F32")
    adapter = workshop.adapter(qwen, target_modules=["q_proj"], lora_bias=True)
    checkpoint = Checkpoint.open(llama)
    with pytest.raises(AdapterError, match="lora_bias=True but the base has no"):
        plan_adapter(Adapter.open(adapter), 0, Target(checkpoint.tensors, checkpoint.config or {}))


def test_scale_rules():
    plain = LoraScale({"r": 16, "lora_alpha": 32}, "model.layers.0.q_proj")
    assert plain.value == 2.0
    rs = LoraScale({"r": 16, "lora_alpha": 32, "use_rslora": True}, "model.layers.0.q_proj")
    assert rs.value == 8.0
    pattern = LoraScale({"r": 16, "lora_alpha": 32, "rank_pattern": {"q_proj": 4},
                         "alpha_pattern": {"layers.0.q_proj": 2}}, "model.layers.0.q_proj")
    assert (pattern.r, pattern.alpha, pattern.value) == (4, 2.0, 0.5)
    factors = {label: factor for label, factor in pattern.alternatives()}

    def factor_of(phrase):
        [factor] = [f for label, f in factors.items() if phrase in label]
        return factor

    assert factor_of("rank_pattern ignored (r=16 used)") == pytest.approx((2 / 16) / 0.5)
    assert factor_of("alpha_pattern ignored (alpha=32 used)") == pytest.approx((32 / 4) / 0.5)
    # causes with the same factor are named together: 1/r = 1/4 is also the ignored rank_pattern
    assert "rank_pattern ignored (r=16 used) or scale off by 1/r" in factors
    assert len({round(f, 9) for f in factors.values()}) == len(factors)


def test_conv1d_orientation_comes_from_shapes_and_architecture():
    gpt2 = Target({}, {"model_type": "gpt2"})
    llama = Target({}, {"model_type": "llama"})
    # non-square: the stored shape decides
    assert fan_in_fan_out(gpt2, "transformer.h.0.attn.c_attn", (32, 96), 96, 32)
    assert not fan_in_fan_out(llama, "model.layers.0.mlp.up_proj", (64, 32), 64, 32)
    # square: GPT-2's projections are Conv1D, Llama's are Linear, GPT-2's head is Linear
    assert fan_in_fan_out(gpt2, "transformer.h.0.attn.c_proj", (32, 32), 32, 32)
    assert not fan_in_fan_out(llama, "model.layers.0.self_attn.q_proj", (32, 32), 32, 32)
    assert not fan_in_fan_out(gpt2, "lm_head", (32, 32), 32, 32)
    with pytest.raises(AdapterError, match="the delta is 16x32 but the base weight is 32x32"):
        fan_in_fan_out(llama, "model.layers.0.self_attn.q_proj", (32, 32), 16, 32)


def test_tied_heads_and_prefixes_resolve_to_stored_tensors():
    stored = {n: _info(n, (4, 4)) for n in ("model.embed_tokens.weight", "h.0.attn.c_attn.weight")}
    tied = Target(stored, {"tie_word_embeddings": True})
    assert tied.tie_source == "model.embed_tokens.weight"
    assert tied.resolve("lm_head.weight", "lm_head") == "model.embed_tokens.weight"
    assert tied.resolve("transformer.h.0.attn.c_attn.weight", "x") == "h.0.attn.c_attn.weight"
    untied = Target(stored, {"tie_word_embeddings": False})
    assert untied.tie_source is None
    with pytest.raises(AdapterError, match="matches no tensor"):
        untied.resolve("lm_head.weight", "lm_head")


def _assert_reference_is_peft(base, adapter, merged, exact):
    """Every tensor's reference agrees with peft's fp32 merge to fp32 rounding."""
    checkpoint = Checkpoint.open(base)
    plan = plan_adapters([Adapter.open(adapter)], Target(checkpoint.tensors,
                                                         checkpoint.config or {}))
    peft_tensors = read_tensors(merged)
    assert plan.edits
    for name, edits in plan.edits.items():
        w = checkpoint.tensor(edits[0].base).to(compute_dtype("F32"))
        reference, _ = reference_tensor(w, edits, "F32", 1.0)
        merged_tensor = peft_tensors[name].double()
        scale = float(reference.abs().max())
        assert torch.allclose(reference, merged_tensor, rtol=0, atol=exact * scale), name


@pytest.mark.parametrize(
    ("arch", "lora"),
    [
        ("llama", {}),
        ("llama", {"use_rslora": True, "r": 8, "lora_alpha": 4}),
        ("llama", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"layers.1.mlp.up_proj": 3}}),
        ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
        ("llama", {"target_modules": ["embed_tokens", "lm_head"]}),
        ("llama", {"use_dora": True, "target_modules": ["q_proj", "down_proj", "embed_tokens"]}),
        ("qwen2", {"target_modules": ["q_proj", "k_proj"], "lora_bias": True}),
        ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
        ("llama", {"target_modules": ["q_proj"], "trainable_token_indices": [3, 7, 11]}),
    ],
    ids=["lora", "rslora", "patterns", "conv1d", "embedding", "dora", "bias", "mts", "tokens"],
)
def test_lora_references_equal_peft_merges(workshop, arch, lora):
    base = workshop.base(arch, "F32")
    adapter = workshop.adapter(base, **lora)
    _assert_reference_is_peft(base, adapter, workshop.peft(base, adapter), exact=1e-5)


@pytest.mark.parametrize(
    ("peft_type", "config"),
    [
        ("IA3", {"target_modules": ["q_proj", "v_proj", "down_proj"],
                 "feedforward_modules": ["down_proj"]}),
        ("LOHA", {"target_modules": ["q_proj", "up_proj"], "r": 4, "alpha": 8}),
        ("LOKR", {"target_modules": ["q_proj", "up_proj"], "r": 4, "alpha": 8}),
        ("LOKR", {"target_modules": ["q_proj", "up_proj"], "r": 2, "alpha": 4,
                  "decompose_both": True, "decompose_factor": 4}),
    ],
    ids=["ia3", "loha", "lokr", "lokr-decomposed"],
)
def test_other_types_reference_and_merge_equal_peft(workshop, peft_type, config):
    base = workshop.base("llama", "F32")
    adapter = workshop.other_adapter(base, peft_type, **config)
    merged = workshop.peft(base, adapter)
    _assert_reference_is_peft(base, adapter, merged, exact=1e-5)
    ours = workshop.ours(base, adapter)
    assert read_tensors(ours).keys() == read_tensors(merged).keys()
    for name, tensor in read_tensors(merged).items():
        assert torch.equal(read_tensors(ours)[name], tensor), name
    assert all(t.ok for t in oracle(merged, base, adapter).tensors)
