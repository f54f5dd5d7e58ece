"""The export family on GGUFs made by llama.cpp's converter (fixtures/gguf), good and faulty."""

from __future__ import annotations

import re
import shutil

import gguf
import numpy as np
import pytest

from harness.export.reader import open_export
from harness.run.result import Outcome
from harness.tiny import build_base
from tests.export_cases import (
    BASE,
    GGUF,
    MERGED,
    TYPES,
    copy_to,
    export_file,
    fault,
    gguf_tool,
    outcomes,
    run_export,
)

KINDS = ("model", "values", "provenance", "tokenizer", "chat_template", "parameters")


@pytest.mark.parametrize("outtype", TYPES)
def test_converter_output_passes_in_every_type(outtype):
    results = run_export(export_file(outtype))
    assert set(results) == set(KINDS)
    assert all(r.outcome is Outcome.PASSED for r in results.values()), outcomes(results)
    tensors = results["values"].metrics["tensors"]
    assert len(tensors) == 21 and all(t["differing"] == 0 for t in tensors)
    # Every tensor was re-encoded byte for byte (no tolerance was used).
    assert {t["method"] for t in tensors} == {"exact"}
    quantized = {t["type"] for t in tensors if "norm" not in t["tensor"]}
    assert quantized == {outtype.upper()}
    retention = results["provenance"].metrics["retention"]
    if outtype == "q8_0":
        assert 0.99 < retention["low"] <= 1.0 <= retention["high"] < 1.01
    else:  # the bfloat16 merge is exactly representable in f32, f16 and bf16
        per_tensor = results["provenance"].metrics["per_tensor"].values()
        assert all(i == {"estimate": 1.0, "low": 1.0, "high": 1.0} for i in per_tensor)
        assert retention["estimate"] == pytest.approx(1.0, abs=1e-9)


def test_the_rotary_permutation_is_undone():
    results = run_export(export_file("q8_0"))
    assert "rotary rows permuted" in results["model"].message
    transforms = {t["tensor"]: t["transforms"] for t in results["values"].metrics["tensors"]}
    assert transforms["blk.0.attn_q.weight"] == ["rotary rows permuted"]
    assert transforms["blk.1.attn_k.weight"] == ["rotary rows permuted"]
    assert transforms["blk.0.attn_v.weight"] == []


def test_a_split_gguf_is_read_from_its_first_part():
    first = GGUF / "llama-split-00001-of-00003.gguf"
    export = open_export(first)
    assert [p.name for p in export.parts] == [
        f"llama-split-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    ]
    results = run_export(first)
    assert all(r.outcome is Outcome.PASSED for r in results.values()), outcomes(results)
    later = run_export(GGUF / "llama-split-00002-of-00003.gguf")["model"]
    assert later.outcome is Outcome.FAILED and "pass the first" in later.message


def test_a_missing_split_part_is_named(tmp_path):
    for part in (1, 2):
        copy_to(GGUF / f"llama-split-0000{part}-of-00003.gguf", tmp_path)
    result = run_export(tmp_path / "llama-split-00001-of-00003.gguf")["model"]
    assert result.outcome is Outcome.FAILED
    assert "split part llama-split-00003-of-00003.gguf is missing" in result.message


def test_without_a_base_provenance_is_skipped():
    results = run_export(export_file("q8_0"), base=None)
    assert results["provenance"].outcome is Outcome.SKIPPED
    assert results["values"].outcome is Outcome.PASSED


# ---- faults, made as users make them ---------------------------------------------------------


def _failed_only(results, *kinds):
    failed = {k for k, r in results.items() if r.outcome is Outcome.FAILED}
    assert failed == set(kinds), outcomes(results)


def test_converted_from_the_base():
    results = run_export(fault("base"))
    _failed_only(results, "values", "provenance")
    assert results["provenance"].message.startswith("converted from the base:")
    assert re.match(r"block \d+ of tensor blk\.\d\.\w+\.weight differs", results["values"].message)
    assert results["provenance"].metrics["retention"]["high"] < 0.01


def test_converted_from_a_model_merged_twice():
    results = run_export(fault("twice"))
    _failed_only(results, "values", "provenance")
    assert results["provenance"].message.startswith("merged twice:")
    assert 1.99 < results["provenance"].metrics["retention"]["estimate"] < 2.01


def test_converted_from_a_partial_merge_names_the_tensors_left_at_the_base():
    results = run_export(fault("partial"))
    _failed_only(results, "values", "provenance")
    message = results["provenance"].message
    assert message.startswith("partly merged: 7 changed tensor(s) hold the base")
    assert "blk.1." in message and "blk.0." not in message
    assert "blk.1." in results["values"].message


def test_another_tokenizer():
    results = run_export(fault("other-tokenizer"))
    _failed_only(results, "tokenizer")
    assert results["tokenizer"].message.startswith("tokenizer differs: tokens: ")


def test_changed_rope_theta():
    results = run_export(fault("rope-theta"))
    _failed_only(results, "parameters")
    assert results["parameters"].message.startswith("rope_theta: merged 10000, export 500000")


def test_changed_context_length_with_gguf_set_metadata(tmp_path):
    target = copy_to(export_file("q8_0"), tmp_path)
    gguf_tool("gguf_set_metadata", str(target), "llama.context_length", "4096", "--force")
    results = run_export(target)
    _failed_only(results, "parameters")
    assert results["parameters"].message.startswith(
        "max_position_embeddings: merged 128, export 4096"
    )


def test_another_chat_template_with_gguf_new_metadata(tmp_path):
    target = tmp_path / "retemplated.gguf"
    gguf_tool("gguf_new_metadata", str(export_file("q8_0")), str(target),
              "--chat-template", "{{ messages[0]['content'] }}", "--force")
    results = run_export(target)
    _failed_only(results, "chat_template")
    assert results["chat_template"].message.startswith("chat template differs: default: merged")


def test_a_chat_template_missing_from_the_export(tmp_path):
    target = tmp_path / "untemplated.gguf"
    gguf_tool("gguf_new_metadata", str(export_file("f16")), str(target),
              "--remove-metadata", "tokenizer.chat_template", "--force")
    result = run_export(target)["chat_template"]
    assert result.outcome is Outcome.FAILED
    assert "the merged folder has one" in result.message and "the export none" in result.message


@pytest.mark.parametrize(("outtype", "tensor", "block"), [
    ("q8_0", "blk.1.ffn_down.weight", 5),
    ("f16", "blk.0.attn_q.weight", 700),
    ("bf16", "output.weight", 4095),
])
def test_one_block_altered_after_conversion(tmp_path, outtype, tensor, block):
    target = copy_to(export_file(outtype), tmp_path)
    info = open_export(target).tensors[tensor]
    size = gguf.GGML_QUANT_SIZES[info.type][1]
    with target.open("r+b") as handle:
        handle.seek(info.start + block * size + size - 1)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x40]))
    results = run_export(target)
    _failed_only(results, "values")
    message = results["values"].message
    assert message.startswith(f"block {block} of tensor {tensor} differs"), message
    assert "1 of" in message  # exactly one block differs
    # the provenance of the whole export is still the merged model's
    assert results["provenance"].outcome is Outcome.PASSED


def test_the_altered_block_is_located_in_the_merged_tensor(tmp_path):
    """Row 1 of the exported (permuted) Q projection is row 4 of the merged one (head 0)."""
    target = copy_to(export_file("f32"), tmp_path)
    info = open_export(target).tensors["blk.0.attn_q.weight"]
    with target.open("r+b") as handle:
        handle.seek(info.start + 32 * 4)  # row 1, column 0 of a (32, 32) float32 tensor
        handle.write(np.float32(123.0).tobytes())
    message = run_export(target)["values"].message
    assert "block 32 of tensor blk.0.attn_q.weight differs" in message
    assert "model.layers.0.self_attn.q_proj.weight row 4, column 0" in message


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file(tmp_path, keep):
    source = export_file("q8_0").read_bytes()
    target = tmp_path / "cut.gguf"
    target.write_bytes(source[: int(len(source) * keep)])
    results = run_export(target)
    assert all(r.outcome is Outcome.FAILED for r in results.values()), outcomes(results)
    assert "truncated" in results["model"].message
    assert all(r.message == results["model"].message for r in results.values())


# ---- another model ----------------------------------------------------------------------------


def test_a_gguf_of_another_architecture_is_refused(tiny_merge_factory):
    qwen = tiny_merge_factory(arch="qwen2", dtype="BF16")
    results = run_export(export_file("q8_0"), merged=qwen.merged, base=qwen.base)
    message = results["model"].message
    assert results["model"].outcome is Outcome.FAILED
    assert message == (
        "not an export of this model: the GGUF holds a 'llama' model, the merged model is"
        " Qwen2ForCausalLM (converted as 'qwen2')"
    )
    assert all(r.message == message for k, r in results.items() if k in ("values", "provenance"))


def test_a_gguf_of_another_size_is_refused(tmp_path):
    wider = build_base(tmp_path / "wide", "llama", "BF16", hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=32, vocab_size=128)
    result = run_export(export_file("q8_0"), merged=wider, base=None)["model"]
    assert result.outcome is Outcome.FAILED
    assert result.message == (
        "not an export of this model: llama.embedding_length is 32 in the GGUF, the merged"
        " model's hidden_size is 64"
    )


def test_a_gguf_of_another_model_with_the_same_dimensions_is_refused():
    """fixtures/tiny is a Llama of the same width and depth but another MLP size and vocab."""
    other = GGUF.parent / "tiny" / "merged"
    result = run_export(export_file("q8_0"), merged=other, base=None)["model"]
    assert result.outcome is Outcome.FAILED
    assert result.message.startswith("not an export of this model: ")
    assert "tensor shape(s) differ" in result.message


def test_nothing_is_written_next_to_the_inputs(tmp_path):
    folder = tmp_path / "inputs"
    shutil.copytree(GGUF / "llama", folder)
    export = copy_to(export_file("q8_0"), folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    run_export(export, merged=folder / "merged", base=folder / "base")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert MERGED.is_dir() and BASE.is_dir()


# ---- the plugin -------------------------------------------------------------------------------


def test_the_plugin_runs_one_item_per_export_and_check(pytester):
    result = pytester.runpytest(
        "--merged-model", str(MERGED), "--base-model", str(BASE),
        "--export", str(export_file("q8_0")), "--export", str(export_file("f16")),
        "--merge-checks", "export", "-p", "no:randomly", "-v",
    )
    result.assert_outcomes(passed=12)
    text = result.stdout.str()
    for kind in KINDS:
        assert f"merge::export::{kind}[llama-q8_0.gguf] PASSED" in text
        assert f"merge::export::{kind}[llama-f16.gguf] PASSED" in text


def test_a_missing_export_is_a_usage_error(pytester, tmp_path):
    result = pytester.runpytest("--merged-model", str(MERGED), "--export",
                                str(tmp_path / "nope.gguf"))
    assert result.ret == 4
    result.stderr.fnmatch_lines([f"*--export {tmp_path / 'nope.gguf'}: no such file*"])


def test_an_export_alone_needs_a_merged_model(pytester):
    result = pytester.runpytest("--export", str(export_file("q8_0")))
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*needs --merged-model*"])
