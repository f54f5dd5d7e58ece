"""Behaviour checks beyond decoder-only LMs: encoder-decoders and the text path of VLMs.

T5, BART and SwitchTransformers (an encoder-decoder MoE) are built from tiny configs, given real
peft LoRA adapters (``SEQ_2_SEQ_LM``) and merged by peft; a Llava (``*ForConditionalGeneration``
with a vision tower) gets a LoRA on its language model and is checked on its text path. Each
correct merge passes ``loads``, ``equivalence`` and ``generation``; a sign-flipped merge fails.
A model class with no forward pass on token ids alone is skipped with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from support.faults import inject

from harness.case import MergeCase
from harness.checks import behaviour
from harness.io.models import quiet
from harness.run.result import CheckResult, Outcome
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.tiny import build_adapter, copy_sidecars, peft_merge

CHECKS = {c.name: c for c in behaviour.checks(Settings())}


def _tiny_configs() -> dict[str, tuple[str, dict]]:
    return {
        "t5": (
            "T5Config",
            dict(
                vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1,
            ),
        ),
        "bart": (
            "BartConfig",
            dict(
                vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, max_position_embeddings=64,
            ),
        ),
        "switch": (
            "SwitchTransformersConfig",
            dict(
                vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=4,
                num_experts=4, expert_capacity=64, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1,
            ),
        ),
    }


#: LoRA targets per seq2seq model.
TARGETS = {"t5": ["q", "v", "wi", "wo"], "bart": ["q_proj", "v_proj", "fc1"], "switch": ["q", "v"]}


@pytest.fixture(scope="module")
def seq2seq_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MergeCase]:
    import transformers

    root = tmp_path_factory.mktemp("seq2seq")
    cases = {}
    for name, (config_class, kwargs) in _tiny_configs().items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**kwargs)
        base = root / name / "base"
        with quiet():
            transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(base)
        adapter = build_adapter(
            base, root / name / "adapter", scale=0.05, task_type="SEQ_2_SEQ_LM",
            target_modules=TARGETS[name],
        )
        merged = peft_merge(base, adapter, root / name / "merged")
        cases[name] = MergeCase(merged, base, adapter)
    return cases


@pytest.fixture(scope="module")
def llava_case(tmp_path_factory: pytest.TempPathFactory) -> MergeCase:
    """A tiny Llava with a LoRA on its language model's attention, merged by peft."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("llava")
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            image_size=28, patch_size=14,
        ),
        text_config=transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=130, max_position_embeddings=128,
        ),
        image_token_index=129,
    )
    torch.manual_seed(0)
    cls = transformers.LlavaForConditionalGeneration
    with quiet():
        cls(config).save_pretrained(root / "base")
        model = get_peft_model(
            cls.from_pretrained(root / "base"),
            LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                       task_type="CAUSAL_LM"),
        )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    with quiet():
        model.save_pretrained(root / "adapter")
        merged = PeftModel.from_pretrained(cls.from_pretrained(root / "base"), root / "adapter")
        merged.merge_and_unload().save_pretrained(root / "merged")
    copy_sidecars(root / "base", root / "merged")
    return MergeCase(root / "merged", root / "base", root / "adapter")


def run(name: str, case: MergeCase, **options: object) -> CheckResult:
    fresh = MergeCase(case.merged, case.base, case.adapter, None, Settings(**options))
    try:
        return run_check(CHECKS[name], fresh.context())
    finally:
        fresh.release()


def explain(result: CheckResult) -> str:
    return "\n".join([result.message, *result.details, str(result.metrics.get("traceback", ""))])


@pytest.mark.parametrize("name", ["t5", "bart", "switch"])
def test_seq2seq_correct_merge_passes_and_a_fault_fails(name, seq2seq_cases, tmp_path):
    case = seq2seq_cases[name]
    assert json.loads((case.adapter / "adapter_config.json").read_text())["task_type"] == (
        "SEQ_2_SEQ_LM"
    )
    for check in ("loads", "equivalence", "layers", "generation"):
        result = run(check, case, examples=6)
        assert result.outcome is Outcome.PASSED, f"{check}: {explain(result)}"
    assert "ForConditionalGeneration" in run("loads", case).message
    # both stacks judged layer by layer: the decoder's layers given R's encoder states too
    rows = "\n".join(run("layers", case).details)
    stacks = {"t5": ("encoder.block.0", "decoder.block.0"),
              "switch": ("encoder.block.0", "decoder.block.0"),
              "bart": ("encoder.layers.0", "decoder.layers.0")}[name]
    assert all(f"model.{s}:" in rows or f"{s}:" in rows for s in stacks), rows
    faulty = MergeCase(inject(case.merged, case.base, "sign", tmp_path / "sign"), case.base,
                       case.adapter)
    result = run("equivalence", faulty, examples=6)
    assert result.outcome is Outcome.FAILED, explain(result)
    assert "minimal failing input" in result.details[0]
    assert run("layers", faulty).outcome is Outcome.FAILED


def test_vision_language_text_path_passes_and_a_fault_fails(llava_case, tmp_path):
    for check in ("loads", "equivalence", "layers", "generation"):
        result = run(check, llava_case, examples=6)
        assert result.outcome is Outcome.PASSED, f"{check}: {explain(result)}"
        assert result.metrics.get("setup", {}).get("task", "CAUSAL_LM") == "CAUSAL_LM"
    # the text path's layers only: the vision tower never runs on token ids
    assert run("layers", llava_case).metrics["layers"] == 2
    assert "LlavaForConditionalGeneration" in run("loads", llava_case).message
    faulty = MergeCase(inject(llava_case.merged, llava_case.base, "sign", tmp_path / "sign"),
                       llava_case.base, llava_case.adapter)
    assert run("equivalence", faulty, examples=6).outcome is Outcome.FAILED


def test_probes_avoid_image_placeholders(llava_case):
    space = llava_case.probe_space()
    assert space.vocab_size == 129  # ids below the image token (129) of a 130-token vocabulary


def test_a_class_without_a_text_path_is_skipped(tmp_path):
    """Whisper generates text, but from audio features: no forward pass on token ids alone."""
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    with quiet():
        transformers.WhisperForConditionalGeneration(config).save_pretrained(tmp_path / "whisper")
    result = run("loads", MergeCase(tmp_path / "whisper"))
    assert result.outcome is Outcome.SKIPPED, explain(result)
    assert "WhisperForConditionalGeneration has no forward pass on token ids alone" in (
        result.message
    )
    assert "input_features" in result.message and "\n" not in result.message
