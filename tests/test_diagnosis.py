"""Each fault injected into a correct merge fails with the right diagnosis; none on correct ones.

Faults are made with plain torch arithmetic on the adapter's raw tensors (``support.oracle``), the
way a faulty merge script would, or with peft itself (a tied embedding kept tied).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from support.checkpoints import read_tensors, write_faulty
from support.oracle import lora_deltas, oracle, rounded, weight_results

from harness.oracle.diagnosis import NO_FIT
from harness.run.result import Outcome


@pytest.fixture(scope="module")
def llama(workshop):
    """A bf16 Llama, an all-linear adapter, our correct merge and the raw deltas."""
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    merged = workshop.ours(base, adapter)
    tensors = read_tensors(merged)
    return base, adapter, merged, read_tensors(base), lora_deltas(
        adapter, {n: t.shape for n, t in tensors.items()})


Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


def diagnosis_of(result, name):
    [found] = [t for t in result.tensors if t.name == name]
    assert not found.ok, f"{name} passed"
    return found.diagnosis


def inject(workshop, merged, name, replace):
    return write_faulty(merged, workshop.folder(name), replace)


@pytest.mark.parametrize(
    ("fault", "factor", "expected"),
    [
        ("applied twice", None, "delta applied twice"),
        ("scale x2", 2.0, "delta applied twice (or scale doubled)"),
        ("halved", 0.5, "scale halved"),
        ("sign", -1.0, "sign flipped"),
        ("scale x3", 3.0, "scale off by x3 in model.layers.0.self_attn.q_proj"),
        ("not applied", 0.0, "adapter not applied"),
    ],
)
def test_scale_faults(workshop, llama, fault, factor, expected):
    base, adapter, merged, w, deltas = llama
    if factor is None:
        faulty = rounded(w[Q0], deltas[Q0], deltas[Q0])
    else:
        faulty = rounded(w[Q0], deltas[Q0] * factor) if factor else w[Q0]
    out = inject(workshop, merged, f"scale-{fault}", {Q0: faulty})
    result = oracle(out, base, adapter)
    assert expected in diagnosis_of(result, Q0)
    assert [t.name for t in result.tensors if not t.ok] == [Q0]


def test_every_check_names_its_fault_in_one_line(workshop, llama):
    base, adapter, merged, w, deltas = llama
    out = inject(workshop, merged, "two-faults", {
        Q0: rounded(w[Q0], deltas[Q0] * 2),
        "model.layers.0.self_attn.o_proj.weight": w["model.layers.0.self_attn.o_proj.weight"],
        "model.norm.weight": w["model.norm.weight"] + 0.25,
    })
    results = weight_results(out, base, adapter)
    targeted = results["targeted_match_reference"]
    assert targeted.outcome is Outcome.FAILED
    line = targeted.message
    assert "\n" not in line
    for part in ("worst element [", "merged ", "reference ", "base ", "ULP", "diagnosis:",
                 "and 1 more tensor"):
        assert part in line, part
    assert results["adapter_applied"].outcome is Outcome.FAILED
    assert "o_proj.weight" in results["adapter_applied"].message
    assert "adapter not applied" in results["adapter_applied"].message
    untouched = results["untouched_identical"]
    assert untouched.outcome is Outcome.FAILED
    assert "model.norm.weight" in untouched.message
    assert "non-target tensor modified: 32 elements differ" in untouched.message
    assert results["adapter_supported"].outcome is Outcome.PASSED
    assert results["modules_to_save"].outcome is Outcome.SKIPPED


def test_delta_from_another_layer(workshop, llama):
    base, adapter, merged, w, deltas = llama
    out = inject(workshop, merged, "wrong-layer", {Q0: rounded(w[Q0], deltas[Q1])})
    assert "delta of model.layers.1.self_attn.q_proj applied here" in diagnosis_of(
        oracle(out, base, adapter), Q0)


def test_delta_on_a_non_target_tensor(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj", "v_proj"])
    merged = workshop.ours(base, adapter)
    w = read_tensors(base)
    deltas = lora_deltas(adapter, {n: t.shape for n, t in w.items()})
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    out = inject(workshop, merged, "non-target", {o_proj: rounded(w[o_proj], deltas[Q0])})
    assert "received the delta of model.layers.0.self_attn.q_proj" in diagnosis_of(
        oracle(out, base, adapter), o_proj)


def test_a_different_adapter(workshop, llama):
    base, adapter, _, _, _ = llama
    other = workshop.adapter(base, seed=7)
    result = oracle(workshop.ours(base, other), base, adapter)
    assert all("a different adapter" in t.diagnosis for t in result.tensors if not t.ok)
    assert len([t for t in result.tensors if not t.ok]) == 14


def test_transposed_conv1d_delta(workshop):
    base = workshop.base("gpt2", "BF16")
    adapter = workshop.adapter(base, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    merged = workshop.ours(base, adapter)
    w = read_tensors(base)
    deltas = lora_deltas(adapter, {n: t.shape for n, t in w.items()})
    square = "transformer.h.0.attn.c_proj.weight"
    wide = "transformer.h.0.attn.c_attn.weight"
    wrong_wide = deltas[wide].T.contiguous().reshape(w[wide].shape)
    out = inject(workshop, merged, "transposed", {
        square: rounded(w[square], deltas[square].T),
        wide: rounded(w[wide], wrong_wide),
    })
    result = oracle(out, base, adapter)
    assert "delta not transposed (fan_in_fan_out ignored)" in diagnosis_of(result, square)
    assert "delta reshaped, not transposed" in diagnosis_of(result, wide)


def test_rslora_and_pattern_faults(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
                               use_rslora=True, alpha_pattern={"v_proj": 48})
    merged = workshop.ours(base, adapter)
    w = read_tensors(base)
    deltas = lora_deltas(adapter, {n: t.shape for n, t in w.items()})
    v0 = "model.layers.0.self_attn.v_proj.weight"
    out = inject(workshop, merged, "rslora-pattern", {
        Q0: rounded(w[Q0], deltas[Q0] * (math.sqrt(8) / 8)),  # alpha/r instead of alpha/sqrt(r)
        v0: rounded(w[v0], deltas[v0] / 3),  # alpha 16 instead of the pattern's 48
    })
    result = oracle(out, base, adapter)
    assert "rsLoRA ignored" in diagnosis_of(result, Q0)
    assert "alpha_pattern ignored (alpha=16 used)" in diagnosis_of(result, v0)


def test_dora_magnitude_ignored(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj"], use_dora=True)
    merged = workshop.ours(base, adapter)
    w = read_tensors(base)
    raw = load_file(adapter / "adapter_model.safetensors")
    plain = {k: v for k, v in raw.items() if "magnitude" not in k}
    deltas = lora_deltas(adapter, {n: t.shape for n, t in w.items()})
    out = inject(workshop, merged, "dora", {Q0: rounded(w[Q0], deltas[Q0])})
    assert plain  # the adapter has LoRA factors besides the magnitudes
    assert "DoRA magnitude ignored" in diagnosis_of(oracle(out, base, adapter), Q0)


def test_modules_to_save_not_written(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj"], modules_to_save=["lm_head"])
    merged = workshop.ours(base, adapter)
    out = inject(workshop, merged, "mts", {"lm_head.weight": read_tensors(base)["lm_head.weight"]})
    results = weight_results(out, base, adapter)
    copies = results["modules_to_save"]
    assert copies.outcome is Outcome.FAILED
    assert "modules_to_save copy of lm_head.weight not written" in copies.message
    assert results["targeted_match_reference"].outcome is Outcome.PASSED


def test_peft_keeps_a_tied_embedding_tied(workshop):
    # peft's merge_and_unload writes the embedding delta into the shared tensor, so the output
    # head changes although the unmerged adapter model leaves it alone (peft#2777).
    base = workshop.base("qwen2", "BF16")
    adapter = workshop.adapter(base, target_modules=["embed_tokens", "q_proj"])
    results = weight_results(workshop.peft(base, adapter), base, adapter)
    untouched = results["untouched_identical"]
    assert untouched.outcome is Outcome.FAILED
    assert untouched.message.startswith("lm_head.weight (tied to model.embed_tokens.weight)")
    assert "tied embeddings" in untouched.message and "tie_word_embeddings=false" in (
        untouched.message)
    assert results["targeted_match_reference"].outcome is Outcome.PASSED


def test_tied_head_lora_lands_in_the_embedding(workshop):
    base = workshop.base("qwen2", "BF16")
    adapter = workshop.adapter(base, target_modules=["lm_head"])
    result = oracle(workshop.peft(base, adapter), base, adapter)
    assert "tied embeddings" in diagnosis_of(result, "model.embed_tokens.weight")
    assert all(t.ok for t in oracle(workshop.ours(base, adapter), base, adapter).tensors)


def test_a_no_op_merge_of_a_tiny_delta_is_caught(workshop):
    # Weights near 1 have a bf16 ULP of 2^-7; a delta below 2^-7 passes the 1-ULP tolerance
    # even when it was never added, so only the change requirement can catch the no-op.
    base = workshop.folder("tiny-delta-base")
    shutil.copytree(workshop.base("llama", "BF16"), base)
    tensors = load_file(base / "model.safetensors")
    tensors[Q0] = (tensors[Q0].float() * 0.5 + 1.25).to(torch.bfloat16)  # in [1, 2)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = workshop.folder("tiny-delta-adapter")
    shutil.copytree(workshop.adapter(workshop.base("llama", "BF16"),
                                     target_modules=["q_proj"]), adapter)
    raw = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    delta = lora_deltas(adapter, {Q0: (32, 32), Q1: (32, 32)})[Q0]
    raw[key] = raw[key] * (0.9 * 2**-7 / float(delta.abs().max()))
    save_file(raw, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    merged = workshop.ours(base, adapter)
    good = weight_results(merged, base, adapter)
    assert {r.outcome for r in good.values()} <= {Outcome.PASSED, Outcome.SKIPPED}
    noop = inject(workshop, merged, "noop", {Q0: tensors[Q0]})
    results = weight_results(noop, base, adapter)
    assert results["targeted_match_reference"].outcome is Outcome.PASSED
    applied = results["adapter_applied"]
    assert applied.outcome is Outcome.FAILED
    assert "adapter not applied" in applied.message


# ---- property: both directions ----------------------------------------------------------

ARCHS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
FAULTS = ["none", "none", "not_applied", "scale", "transposed", "wrong_layer", "other_adapter"]
SCALES = {-1.0: "sign flipped", 2.0: "applied twice", 0.5: "scale halved", 3.0: "scale off by x3"}


@st.composite
def merge_cases(draw):
    arch = draw(st.sampled_from(sorted(ARCHS)))
    dtype = draw(st.sampled_from(["BF16", "F32", "F16"]))
    targets = draw(st.lists(st.sampled_from(ARCHS[arch]), min_size=1, max_size=3, unique=True))
    lora = {
        "target_modules": sorted(targets),
        "r": draw(st.sampled_from([1, 2, 4, 8])),
        "lora_alpha": draw(st.sampled_from([1, 4, 8, 16, 32])),
        "use_rslora": draw(st.booleans()),
    }
    if arch == "gpt2":
        lora["fan_in_fan_out"] = True
    return arch, dtype, lora, draw(st.sampled_from(FAULTS)), draw(st.integers(0, 2**16))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=merge_cases(), scale=st.sampled_from(sorted(SCALES)), pick=st.randoms())
def test_property_no_false_alarm_and_every_fault_caught(workshop, case, scale, pick):
    arch, dtype, lora, fault, seed = case
    base = workshop.base(arch, dtype)
    adapter = workshop.adapter(base, seed=seed % 5 + 1, **lora)
    merged = workshop.ours(base, adapter)
    w = read_tensors(base)
    deltas = lora_deltas(adapter, {n: t.shape for n, t in w.items()})
    name = pick.choice(sorted(deltas))
    replace: dict[str, torch.Tensor] = {}
    expected = None
    if fault == "not_applied":
        replace, expected = {name: w[name]}, "not applied"
    elif fault == "scale":
        replace, expected = {name: rounded(w[name], deltas[name] * scale)}, SCALES[scale]
    elif fault == "transposed" and deltas[name].shape[0] == deltas[name].shape[1]:
        replace, expected = {name: rounded(w[name], deltas[name].T)}, "transposed"
    elif fault == "wrong_layer":
        others = [n for n in sorted(deltas) if n != name and deltas[n].shape == deltas[name].shape
                  and not torch.allclose(deltas[n], deltas[name])]
        if others:
            other = pick.choice(others)
            module = other.removesuffix(".weight")
            replace, expected = {name: rounded(w[name], deltas[other])}, f"delta of {module}"
    elif fault == "other_adapter" and min(deltas[name].shape) > 2 * lora["r"] + 1:
        generator = torch.Generator().manual_seed(seed)
        b = torch.randn(deltas[name].shape[0], lora["r"], generator=generator)
        a = torch.randn(lora["r"], deltas[name].shape[1], generator=generator)
        other_delta = (b @ a) * float(deltas[name].abs().mean() / (b @ a).abs().mean())
        replace, expected = {name: rounded(w[name], other_delta)}, "a different adapter"
    if expected is None:
        result = oracle(merged, base, adapter)
        assert all(t.ok for t in result.tensors), [t.name for t in result.tensors if not t.ok]
        return
    out = write_faulty(merged, workshop.folder("property"), replace)
    result = oracle(out, base, adapter)
    failing = {t.name: t.diagnosis for t in result.tensors if not t.ok}
    assert name in failing, f"{fault} in {name} not caught"
    assert expected in failing[name], (fault, scale, failing[name])
    assert set(failing) == {name}


def test_no_known_fault_is_said_plainly(workshop, llama):
    base, adapter, merged, w, _ = llama
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(w[Q0].shape, generator=generator) * 0.05  # full rank, not a delta
    out = inject(workshop, merged, "noise", {Q0: rounded(w[Q0], noise)})
    assert diagnosis_of(oracle(out, base, adapter), Q0) == NO_FIT


def test_config_of_faulty_checkpoints_is_untouched(workshop, llama):
    _, _, merged, _, _ = llama
    out = inject(workshop, merged, "config", {})
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (merged / "config.json").read_text())
