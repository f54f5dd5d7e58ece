"""Faults the diagnosis names from what the adapter type and the module can do.

A fused projection whose delta reached one part only (Phi-3 ``qkv_proj``, the ``q`` rows), LoHa
and LoKr scale faults (offered the faults of their own products, never rsLoRA), and an (IA)^3
vector multiplied in twice. Each fault is made with plain torch on a correct merge's tensors, as
a faulty merge script would make it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support.checkpoints import read_tensors, write_faulty
from support.oracle import oracle, rounded

Q0 = "model.layers.0.self_attn.q_proj.weight"


def _diagnosis(result, name):
    failing = {t.name: t.diagnosis for t in result.tensors if not t.ok}
    assert list(failing) == [name], failing
    return failing[name]


def test_a_fused_qkv_delta_applied_to_the_q_rows_only_is_named(workshop):
    base = workshop.base("phi3", "BF16")
    adapter = workshop.adapter(base, target_modules=["qkv_proj"])
    merged = workshop.peft(base, adapter)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    w, m = read_tensors(base)[name], read_tensors(merged)[name]
    partial = w.clone()
    partial[:32] = m[:32]  # q: 4 heads x 8; k and v: 2 key/value heads x 8 each
    out = write_faulty(merged, workshop.folder("qkv-q-only"), {name: partial})
    found = _diagnosis(oracle(out, base, adapter), name)
    assert found == (
        "delta applied to the q part(s) only of the fused qkv_proj in"
        " model.layers.0.self_attn.qkv_proj: rows 0:32 carry it, rows 32:64 (k, v) hold the"
        " base values"
    )


def test_a_fused_gate_up_delta_applied_to_one_half_is_named(workshop):
    base = workshop.base("phi3", "BF16")
    adapter = workshop.adapter(base, target_modules=["gate_up_proj"])
    merged = workshop.peft(base, adapter)
    name = "model.layers.1.mlp.gate_up_proj.weight"
    w, m = read_tensors(base)[name], read_tensors(merged)[name]
    partial = m.clone()
    partial[64:] = w[64:]
    out = write_faulty(merged, workshop.folder("gate-up-half"), {name: partial})
    assert "delta applied to the gate part(s) only of the fused gate_up_proj" in _diagnosis(
        oracle(out, base, adapter), name)


@pytest.mark.parametrize(("peft_type", "product"), [("LOHA", "Hadamard"), ("LOKR", "Kronecker")])
def test_lycoris_scale_faults_come_from_what_the_type_can_do(workshop, peft_type, product):
    base = workshop.base("llama", "BF16")
    # alpha/r = 3: a doubled delta and s^2 = 3 s are told apart, and sqrt(r) = 2 is no label
    adapter = workshop.other_adapter(base, peft_type, target_modules=["q_proj"], r=4, alpha=12)
    merged = workshop.ours(base, adapter)
    w, m = read_tensors(base)[Q0], read_tensors(merged)[Q0]
    delta = m.float() - w.float()
    for factor, expected in ((3.0, f"scale applied to both {product} factors (s^2)"),
                             (2.0, "delta applied twice")):
        out = write_faulty(merged, workshop.folder(f"{peft_type}-{factor}"),
                           {Q0: rounded(w, delta * factor)})
        found = _diagnosis(oracle(out, base, adapter), Q0)
        assert expected in found
        assert "rsLoRA" not in found


def test_an_ia3_vector_applied_twice_is_named(workshop):
    base = workshop.base("llama", "BF16")
    adapter = workshop.other_adapter(base, "IA3", target_modules=["q_proj", "down_proj"],
                                     feedforward_modules=["down_proj"])
    merged = workshop.ours(base, adapter)
    raw = load_file(adapter / "adapter_model.safetensors")
    vector = raw["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"].float()  # (out, 1)
    m = read_tensors(merged)[Q0]
    out = write_faulty(merged, workshop.folder("ia3-twice"),
                       {Q0: (m.float() * vector).to(torch.bfloat16)})
    assert _diagnosis(oracle(out, base, adapter), Q0) == (
        "IA3 vector applied twice in model.layers.0.self_attn.q_proj (W * l * l)")
