"""A vocabulary grown before training, checked against the original base.

The user's flow: add tokens, ``resize_token_embeddings``, train with ``modules_to_save`` or
trainable tokens on the embedding and head, merge with peft and save. The resized base is never
saved, so the harness gets the original base: the grown rows are accepted when the adapter
holds their values, checked exactly, and an unexplained shape change still fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.checks.structure import checks as structure_checks
from harness.checks.weights import checks as weight_checks
from harness.errors import MergeError
from harness.merger import merge_checkpoint
from harness.run.context import Context
from harness.run.result import CheckResult, Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.tiny import build_base

VOCAB, GROWN = 128, 133
NEW = list(range(VOCAB, GROWN))
EMBED = "model.embed_tokens.weight"


def resized_merge(root: Path, arch: str, save_embedding_layers: str | bool = "auto",
                  **lora) -> tuple[Path, Path, Path]:
    """Base, adapter trained on the resized model, and peft's merge of the resized model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = build_base(root / "base", arch, "BF16")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(GROWN)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **lora))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    peft_model.save_pretrained(root / "adapter", save_embedding_layers=save_embedding_layers)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model.resize_token_embeddings(GROWN)
    merged = PeftModel.from_pretrained(model, root / "adapter").merge_and_unload()
    merged.save_pretrained(root / "merged")
    return base, root / "adapter", root / "merged"


def results(merged: Path, base: Path, adapter: Path) -> dict[str, CheckResult]:
    settings = Settings(merged=merged, base=base, adapter=adapter)
    ctx = Context(settings)
    return {c.name: run_check(c, ctx)
            for c in structure_checks(settings) + weight_checks(settings)}


def failed(found: dict[str, CheckResult]) -> dict[str, str]:
    return {n: r.message for n, r in found.items() if r.outcome is Outcome.FAILED}


FLOWS = {
    "modules_to_save": ("llama", {"target_modules": ["q_proj"],
                                  "modules_to_save": ["embed_tokens", "lm_head"]}),
    "trainable_tokens": ("llama", {"target_modules": ["q_proj"], "trainable_token_indices": {
        "embed_tokens": NEW, "lm_head": NEW}}),
    "trainable_tokens_tied": ("qwen2", {"target_modules": ["q_proj"],
                                        "trainable_token_indices": NEW}),
}


@pytest.fixture(scope="module", params=sorted(FLOWS))
def flow(request, tmp_path_factory):
    arch, lora = FLOWS[request.param]
    return resized_merge(tmp_path_factory.mktemp(request.param), arch, **lora)


def test_a_grown_vocabulary_the_adapter_explains_passes(flow):
    base, adapter, merged = flow
    assert load_file(merged / "model.safetensors")[EMBED].shape[0] == GROWN
    found = results(merged, base, adapter)
    assert failed(found) == {}
    assert f"{VOCAB} -> {GROWN} rows" in found["same_shapes"].message
    assert "rows the adapter explains" in found["parameter_count"].message
    assert "rows the adapter explains" in found["size_invariant"].message


def test_tokens_without_saved_embedding_layers_pass_when_they_cover_the_new_rows(tmp_path):
    base, adapter, merged = resized_merge(
        tmp_path, "qwen2", save_embedding_layers=False, target_modules=["q_proj"],
        trainable_token_indices=NEW)
    found = results(merged, base, adapter)
    assert failed(found) == {}
    assert f"trainable tokens {VOCAB}..{GROWN - 1}" in found["same_shapes"].message


def test_new_rows_the_adapter_does_not_hold_fail(tmp_path):
    # three of the five new tokens trained, the embedding layers not saved: rows 131, 132 keep
    # values from resize_token_embeddings that nothing the user gives can reproduce
    base, adapter, merged = resized_merge(
        tmp_path, "qwen2", save_embedding_layers=False, target_modules=["q_proj"],
        trainable_token_indices=NEW[:3])
    found = failed(results(merged, base, adapter))
    for name in ("same_shapes", "parameter_count", "size_invariant"):
        assert name in found
    assert "the adapter holds no value for rows 131..132 (2 of the 5 new)" in found["same_shapes"]
    assert "131..132" in found["modules_to_save"]


def test_a_resized_head_the_adapter_does_not_hold_fails(tmp_path):
    # LoRA on the resized embedding: peft saves the embedding, not the resized head
    base, adapter, merged = resized_merge(tmp_path, "llama", target_modules=["q_proj",
                                                                             "embed_tokens"])
    found = results(merged, base, adapter)
    assert "'lm_head.weight': base [128, 32], merged [133, 32]" in failed(found)["same_shapes"]
    assert found["targeted_match_reference"].outcome is Outcome.PASSED  # the embedding is fine


@pytest.mark.parametrize("row", [5, VOCAB + 2], ids=["old row", "new row"])
def test_a_wrong_row_fails(flow, tmp_path, row):
    base, adapter, merged = flow
    out = tmp_path / "faulty"
    shutil.copytree(merged, out)
    tensors = load_file(out / "model.safetensors")
    tensors[EMBED][row] += 0.5
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    found = failed(results(out, base, adapter))
    assert "modules_to_save" in found or "targeted_match_reference" in found
    assert EMBED in " ".join(found.values())


def test_the_streaming_merger_refuses_to_resize(flow, tmp_path):
    base, adapter, _ = flow
    with pytest.raises(MergeError, match="trained on a resized vocabulary"):
        merge_checkpoint(base, adapter, tmp_path / "ours", progress=False)


def test_the_behaviour_comparisons_skip_with_the_reason(flow):
    """The unmerged adapter model needs the resized base, which the user never has: a skip."""
    from harness.behaviour.models import release_models
    from harness.checks.behaviour import checks as behaviour_checks

    base, adapter, merged = flow
    settings = Settings(merged=merged, base=base, adapter=adapter, examples=2)
    ctx = Context(settings)
    try:
        found = {c.name: run_check(c, ctx) for c in behaviour_checks(settings)
                 if c.name in ("loads", "equivalence", "layers", "generation")}
    finally:
        release_models(ctx)
    assert found["loads"].outcome is Outcome.PASSED, found["loads"].message
    for name in ("equivalence", "layers", "generation"):
        result = found[name]
        assert result.outcome is Outcome.SKIPPED, (name, result.message)
        assert result.message.startswith("the merge grew the vocabulary (")
        assert "model.embed_tokens.weight 128 -> 133 rows" in result.message
        assert not result.needs
