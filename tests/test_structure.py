"""Structure and hash checks end to end: good merges pass, each structural fault fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.checkpoints import copy_checkpoint, edit_config, rewrite

FAMILIES = "--merge-checks=structure,hash"


def run(
    pytester: pytest.Pytester, merged: Path, base: Path | None, *extra: str
) -> pytest.RunResult:
    args = ["--merged-model", str(merged), *extra]
    if base is not None:
        args += ["--base-model", str(base)]
    return pytester.runpytest(FAMILIES, "-p", "no:randomly", *args)


def assert_clean(result: pytest.RunResult) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text
    assert "Traceback" not in text


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_bf16", "tiny_llama_sharded"])
def test_correct_merge_passes(pytester, request, fixture):
    tiny = request.getfixturevalue(fixture)
    result = run(pytester, tiny.merged, tiny.base)
    assert_clean(result)
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["*size_invariant*same size as the base*"])


def test_merged_alone_skips_base_comparisons(pytester, tiny_llama):
    # A partial gate of structure and hash: the merged-alone checks verify something, but the
    # hash family, chosen explicitly, can verify nothing without the base: the gate says so.
    report = pytester.path / "report.json"
    result = run(pytester, tiny_llama.merged, None, f"--merge-report={report}")
    assert_clean(result)
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 5 and outcomes["skipped"] == 7
    assert result.ret == 1
    result.stdout.fnmatch_lines(["partial gate: 7 check(s) not verified:", "partial gate: FAILED*"])
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["verdict"]["reasons"] == ["hash: verified nothing (every check skipped)"]
    # Structure alone is a partial gate that passes, listing what it could not verify.
    alone = pytester.runpytest("--merge-checks=structure", "--merged-model", str(tiny_llama.merged))
    assert alone.ret == 0
    alone.stdout.fnmatch_lines(["partial gate: 6 check(s) not verified:", "partial gate: PASSED"])


def _fault(pytester: pytest.Pytester, tiny, tmp_path: Path, damage) -> pytest.RunResult:
    merged = copy_checkpoint(tiny.merged, tmp_path / "merged")
    damage(merged)
    result = run(pytester, merged, tiny.base)
    assert_clean(result)
    assert result.ret == 1
    return result


def test_merged_identical_to_base_fails(pytester, tiny_llama, tmp_path):
    def damage(merged: Path) -> None:
        shutil.copy(tiny_llama.base / "model.safetensors", merged / "model.safetensors")

    result = _fault(pytester, tiny_llama, tmp_path, damage)
    result.stdout.fnmatch_lines(["*differs_from_base*merged weights are identical to the base*"])


def test_missing_tensor_fails(pytester, tiny_llama, tmp_path):
    result = _fault(
        pytester,
        tiny_llama,
        tmp_path,
        lambda m: rewrite(m, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
    )
    result.stdout.fnmatch_lines(
        ["*1 tensor(s) missing from the merge: 'model.layers.1.mlp.up_proj.weight'*"]
    )
    result.stdout.fnmatch_lines(["*parameter_count*differs from the base*"])


def test_extra_lora_tensor_fails(pytester, tiny_llama, tmp_path):
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)

    result = _fault(pytester, tiny_llama, tmp_path, lambda m: rewrite(m, add))
    result.stdout.fnmatch_lines(["*no_adapter_leftovers*1 adapter leftover tensor(s)*lora_A*"])
    result.stdout.fnmatch_lines(["*extra tensor(s) not in the base*"])


def test_nan_fails(pytester, tiny_llama, tmp_path):
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.v_proj.weight"][3, 5] = float("nan")

    result = _fault(pytester, tiny_llama, tmp_path, lambda m: rewrite(m, poison))
    result.stdout.fnmatch_lines(
        [
            "*all_finite*1 tensor(s) hold NaN/Inf; first 'model.layers.0.self_attn.v_proj.weight'"
            ": 1 NaN, 0 Inf, element 101 = nan*"
        ]
    )


def test_dtype_upcast_fails(pytester, tiny_llama_bf16, tmp_path):
    def upcast(tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            tensors[name] = tensors[name].float()

    merged = copy_checkpoint(tiny_llama_bf16.merged, tmp_path / "merged")
    rewrite(merged, upcast)
    edit_config(merged, dtype="float32")
    result = run(pytester, merged, tiny_llama_bf16.base)
    assert_clean(result)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*same_dtypes*changed dtype*base BF16, merged F32*"])
    result.stdout.fnmatch_lines(["*size_invariant*(2.00x): a merge must not change the size*"])


def test_truncated_shard_fails(pytester, tiny_llama_sharded, tmp_path):
    merged = copy_checkpoint(tiny_llama_sharded.merged, tmp_path / "merged")
    shard = sorted(merged.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    result = run(pytester, merged, tiny_llama_sharded.base)
    assert_clean(result)
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"*loads*{shard.name}: truncated*"])
    assert "passed" not in result.parseoutcomes() or result.parseoutcomes()["passed"] == 0


def test_pickle_only_checkpoint_is_refused(pytester, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(tiny_llama.merged / "config.json", merged / "config.json")
    torch.save(load_file(tiny_llama.merged / "model.safetensors"), merged / "pytorch_model.bin")
    result = run(pytester, merged, tiny_llama.base)
    assert_clean(result)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*loads*only pickle checkpoint(s) (pytorch_model.bin); refusing*"])
    opted = run(pytester, merged, tiny_llama.base, "--merge-allow-pickle")
    assert_clean(opted)
    assert opted.ret == 0, opted.stdout.str()


def test_retied_config_fails(pytester, tiny_llama, tmp_path):
    result = _fault(
        pytester, tiny_llama, tmp_path, lambda m: edit_config(m, tie_word_embeddings=True)
    )
    result.stdout.fnmatch_lines(
        ["*tied_embeddings*config ties embeddings but 'lm_head.weight' differs*"]
    )


def test_config_change_outside_allowlist_fails(pytester, tiny_llama, tmp_path):
    result = _fault(pytester, tiny_llama, tmp_path, lambda m: edit_config(m, hidden_act="gelu"))
    result.stdout.fnmatch_lines(["*config_allowlist*'hidden_act': base 'silu', merged 'gelu'*"])


def test_stale_shard_fails(pytester, tiny_llama_sharded, tmp_path):
    merged = copy_checkpoint(tiny_llama_sharded.merged, tmp_path / "merged")
    shutil.copy(
        sorted(merged.glob("*.safetensors"))[0], merged / "model-00009-of-00009.safetensors"
    )
    result = run(pytester, merged, tiny_llama_sharded.base)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        ["FAIL *loads*model-00009-of-00009.safetensors present but not in the index*"]
    )
