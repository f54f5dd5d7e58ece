"""The export checks on GGUFs llama.cpp's converter makes during the run, for every architecture
the checks know, Qwen2's byte-level BPE tokenizer, and K-quants made by llama-quantize.

The converter is not part of this repository: set ``MERGE_HARNESS_LLAMA_CPP`` to the
llama-cpp-python source distribution (``pip download --no-binary :all: --no-deps
llama-cpp-python==0.3.36``) or a folder holding llama.cpp's ``convert_hf_to_gguf.py``; without it
these tests are skipped. The K-quant test also needs llama-cpp-python installed (it is
llama-quantize's library).
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from harness.export.reader import open_export
from harness.run.result import Outcome
from harness.tiny import build_adapter, peft_merge
from tests.export_cases import TYPES, build_module, copy_to, outcomes, run_export

ENV = "MERGE_HARNESS_LLAMA_CPP"
build = build_module()
pytestmark = pytest.mark.slow

SMALL = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: name -> (transformers config class, config overrides, tokenizer, LoRA target modules)
CASES: dict[str, tuple[str, dict[str, Any], str, Any]] = {
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False), "spm",
                "all-linear"),
    "mixtral": ("MixtralConfig", dict(num_local_experts=2, num_experts_per_tok=1,
                                      sliding_window=None, tie_word_embeddings=False), "spm",
                ATTENTION),
    "gemma": ("GemmaConfig", dict(head_dim=8), "spm", "all-linear"),
    "phi3": ("Phi3Config", dict(pad_token_id=0, tie_word_embeddings=False), "spm",
             "all-linear"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), "qwen2", "all-linear"),
    "qwen3": ("Qwen3Config", dict(head_dim=8, tie_word_embeddings=True), "qwen2", "all-linear"),
    "qwen2moe": ("Qwen2MoeConfig", dict(num_experts=2, num_experts_per_tok=1,
                                        moe_intermediate_size=32,
                                        shared_expert_intermediate_size=32,
                                        tie_word_embeddings=False), "qwen2", ATTENTION),
}


@pytest.fixture(scope="session")
def converter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = os.environ.get(ENV)
    if not source:
        pytest.skip(f"set {ENV} to the llama-cpp-python sdist to run the converter tests")
    return Path(build.find_converter(Path(source), tmp_path_factory.mktemp("llama-cpp")))


def _base(folder: Path, config_class: str, converter: Path, tokenizer: str, **config: Any) -> Path:
    """A tiny bfloat16 model of ``config_class`` with a tokenizer the converter can read."""
    if tokenizer == "qwen2":
        folder.mkdir(parents=True)
        config["vocab_size"] = build.save_qwen2_tokenizer(folder, converter)
    else:
        config["vocab_size"] = 128
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, config_class)(bos_token_id=1, eos_token_id=2, **SMALL, **config)
    ).to(torch.bfloat16)
    model.save_pretrained(folder)
    if tokenizer == "spm":
        build.save_tokenizer(folder, build.train_tokenizer())
    return folder


@pytest.fixture(scope="session")
def case(converter, tmp_path_factory):
    """name -> (merged, base, converted q8_0 GGUF and the converter), built once per name."""
    built: dict[str, tuple[Path, Path, Path]] = {}

    def make(name: str) -> tuple[Path, Path, Path]:
        if name not in built:
            config_class, overrides, tokenizer, targets = CASES[name]
            root = tmp_path_factory.mktemp(name)
            base = _base(root / "base", config_class, converter, tokenizer, **overrides)
            adapter = build_adapter(base, root / "adapter", seed=1, r=4, lora_alpha=8,
                                    target_modules=targets)
            merged = peft_merge(base, adapter, root / "merged")
            build.copy_tokenizer(base, merged)
            gguf = build.convert(converter, merged, root / f"{name}-q8_0.gguf", "q8_0")
            built[name] = (merged, base, gguf)
        return built[name]

    return make


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_architecture_converted_passes(case, name):
    merged, base, gguf = case(name)
    results = run_export(gguf, merged=merged, base=base)
    assert all(r.outcome is Outcome.PASSED for r in results.values()), outcomes(results)


def test_the_conventions_are_undone(case):
    """Gemma's norms are stored +1, Mixtral's and Qwen2-MoE's experts stacked."""
    transforms = {}
    for name in ("gemma", "mixtral", "qwen2moe"):
        merged, base, gguf = case(name)
        values = run_export(gguf, merged=merged, base=base)["values"]
        transforms[name] = {t["tensor"]: t["transforms"] for t in values.metrics["tensors"]}
    assert transforms["gemma"]["blk.0.attn_norm.weight"] == ["norm stored +1"]
    assert transforms["mixtral"]["blk.0.ffn_gate_exps.weight"] == ["2 experts stacked"]
    assert transforms["mixtral"]["blk.0.attn_q.weight"] == ["rotary rows permuted"]
    assert transforms["qwen2moe"]["blk.1.ffn_down_exps.weight"] == ["2 experts stacked"]
    # Gemma ties its output head: the export has none, and nothing is reported missing.
    assert "output.weight" not in open_export(case("gemma")[2]).tensors
    assert run_export(case("gemma")[2], merged=case("gemma")[0])["model"].outcome is (
        Outcome.PASSED
    )


@pytest.mark.parametrize("outtype", TYPES)
def test_qwen2_with_its_bpe_tokenizer_in_every_type(case, converter, tmp_path, outtype):
    merged, base, _ = case("qwen2")
    gguf = build.convert(converter, merged, tmp_path / f"qwen2-{outtype}.gguf", outtype)
    export = open_export(gguf)
    assert export.fields["tokenizer.ggml.pre"] == "qwen2"
    results = run_export(gguf, merged=merged, base=base)
    assert all(r.outcome is Outcome.PASSED for r in results.values()), outcomes(results)
    assert "merges" in results["tokenizer"].message
    # the tied output head is accounted for, not missing
    assert "output.weight" not in export.tensors
    assert results["model"].metrics["omitted"] == {}


def test_a_qwen2_export_with_another_tokenizer_fails(case, converter, tmp_path):
    """Converted with the tokenizer of another Qwen2 variant (an end-of-turn token renamed)."""
    merged, base, _ = case("qwen2")
    other = tmp_path / "other"
    other.mkdir()
    for path in merged.iterdir():
        if path.name == "tokenizer.json":
            data = json.loads(path.read_text(encoding="utf-8"))
            for token in data["added_tokens"]:
                if token["content"] == "<|im_end|>":
                    token["content"] = "<|end|>"
            (other / path.name).write_text(json.dumps(data), encoding="utf-8")
        else:
            os.link(path, other / path.name)
    gguf = build.convert(converter, other, tmp_path / "other.gguf", "q8_0")
    results = run_export(gguf, merged=merged, base=base)
    assert results["tokenizer"].outcome is Outcome.FAILED
    assert results["tokenizer"].message == (
        "tokenizer differs: tokens: 1 of 151646 differ, first at 151645: merged '<|im_end|>',"
        " export '<|end|>'"
    )
    assert results["values"].outcome is Outcome.PASSED


# ---- K-quants, made by llama-quantize --------------------------------------------------------


def _llama_quantize(source: Path, target: Path, kind: str) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-quantize needs llama-cpp-python")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                            ctypes.byref(params))
    assert status == 0, f"llama_model_quantize returned {status}"
    return target


@pytest.fixture(scope="session")
def k_quant(converter, tmp_path_factory):
    """A 256-wide Llama merge, converted to f16 and quantized to Q4_K_M by llama-quantize."""
    root = tmp_path_factory.mktemp("kquant")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)
    base = root / "base"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    build.save_tokenizer(base, build.train_tokenizer())
    adapter = build_adapter(base, root / "adapter", seed=1, r=4, lora_alpha=8,
                            target_modules="all-linear")
    merged = peft_merge(base, adapter, root / "merged")
    build.copy_tokenizer(base, merged)
    f16 = build.convert(converter, merged, root / "f16.gguf", "f16")
    return merged, base, _llama_quantize(f16, root / "q4_k_m.gguf", "Q4_K_M")


def test_k_quants_are_bounded_and_pass(k_quant):
    merged, base, gguf = k_quant
    results = run_export(gguf, merged=merged, base=base)
    assert all(r.outcome is Outcome.PASSED for r in results.values()), outcomes(results)
    methods = {t["type"]: t["method"] for t in results["values"].metrics["tensors"]}
    assert methods["Q4_K"] == "bounded"
    assert methods["F32"] == "exact"
    # llama-quantize read float16 values: a reproducible type it chose must match via F16
    assert all(m in ("bounded", "exact", "exact from F16") for m in methods.values())


def test_a_damaged_k_quant_block_is_out_of_bounds(k_quant, tmp_path):
    merged, base, gguf = k_quant
    target = copy_to(gguf, tmp_path)
    export = open_export(target)
    name, info = next((n, t) for n, t in export.tensors.items() if t.type.name == "Q4_K")
    with target.open("r+b") as handle:
        handle.seek(info.start + 3 * info.type_size + 100)  # block 3, a byte of its quants
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x88]))
    result = run_export(target, merged=merged, base=base)["values"]
    assert result.outcome is Outcome.FAILED
    assert result.message.startswith(f"block 3 of tensor {name} differs: error ")
    assert "> bound" in result.message
