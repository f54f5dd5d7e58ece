"""Canonical digests: independent of sharding, order and metadata; sensitive to every element."""

from __future__ import annotations

from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from harness.cli import main as cli_main
from harness.io.checkpoint import Checkpoint
from harness.stream.hashing import hash_checkpoint, tensor_digest
from harness.stream.scan import scan_checkpoint


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, per_shard: int) -> None:
    """Write ``tensors`` as shards of ``per_shard`` tensors each, with an index."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for number, group in enumerate(groups, 1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, folder / shard, metadata={"shard": str(number)})
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def _tensors(seed: int, count: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"layer.{i}.weight": torch.randn(3 + i % 4, 5, generator=generator).to(dtype)
        for i in range(count)
    }


@given(
    seed=st.integers(0, 2**16),
    count=st.integers(1, 7),
    per_shard=st.integers(1, 7),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_digest_is_independent_of_shard_layout(tmp_path_factory, seed, count, per_shard, dtype):
    tensors = _tensors(seed, count, dtype)
    root = tmp_path_factory.mktemp("shards")
    single = root / "single"
    single.mkdir()
    save_file(dict(reversed(list(tensors.items()))), single / "model.safetensors")
    _save_sharded(tensors, root / "sharded", per_shard)
    one = hash_checkpoint(Checkpoint.open(single))
    two = hash_checkpoint(Checkpoint.open(root / "sharded"))
    assert one.digest == two.digest
    assert one.tensors == two.tensors
    assert scan_checkpoint(Checkpoint.open(root / "sharded")).manifest.digest == one.digest


@given(
    seed=st.integers(0, 2**16),
    which=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_digest_changes_when_one_element_changes(tmp_path_factory, seed, which, dtype):
    tensors = _tensors(seed, 3, dtype)
    root = tmp_path_factory.mktemp("one")
    (root / "a").mkdir()
    (root / "b").mkdir()
    save_file(tensors, root / "a" / "model.safetensors")
    name = sorted(tensors)[which % len(tensors)]
    flat = tensors[name].reshape(-1).clone()
    index = which % flat.numel()
    # Flip the lowest bit of one element: the smallest possible change of its value.
    bits = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32)
    bits[index] ^= 1
    tensors[name] = flat.reshape(tensors[name].shape)
    save_file(tensors, root / "b" / "model.safetensors")
    a = hash_checkpoint(Checkpoint.open(root / "a"))
    b = hash_checkpoint(Checkpoint.open(root / "b"))
    assert a.digest != b.digest
    assert a.changed_tensors(b) == [name]


def test_digest_ignores_metadata_but_not_name_dtype_or_shape(tmp_path):
    data = torch.arange(6, dtype=torch.float32)
    assert tensor_digest("x", "F32", (6,), data.numpy().tobytes()) != tensor_digest(
        "y", "F32", (6,), data.numpy().tobytes()
    )
    assert tensor_digest("x", "F32", (6,), b"\0" * 24) != tensor_digest(
        "x", "I32", (6,), b"\0" * 24
    )
    assert tensor_digest("x", "F32", (2, 3), b"\0" * 24) != tensor_digest(
        "x", "F32", (3, 2), b"\0" * 24
    )
    for meta, folder in (({"format": "pt"}, "a"), ({"anything": "else"}, "b")):
        (tmp_path / folder).mkdir()
        save_file({"x": data}, tmp_path / folder / "model.safetensors", metadata=meta)
    a = hash_checkpoint(Checkpoint.open(tmp_path / "a"))
    b = hash_checkpoint(Checkpoint.open(tmp_path / "b"))
    assert a.digest == b.digest
    assert a.files != b.files  # the plain file hashes do see the metadata


def test_sharded_tiny_merge_has_the_same_digest_as_single_file(tiny_llama_sharded, tmp_path):
    from safetensors.torch import load_file

    merged = Checkpoint.open(tiny_llama_sharded.merged)
    assert len(merged.files) > 1
    state = {}
    for sfile in merged.files:
        state.update(load_file(sfile.path))
    (tmp_path / "single").mkdir()
    save_file(state, tmp_path / "single" / "model.safetensors")
    assert (
        hash_checkpoint(merged).digest
        == hash_checkpoint(Checkpoint.open(tmp_path / "single")).digest
    )


def test_cli_hash_prints_digest_and_json(tiny_llama, capsys):
    assert cli_main(["hash", str(tiny_llama.merged)]) == 0
    digest = capsys.readouterr().out.strip().split()[0]
    assert digest == hash_checkpoint(Checkpoint.open(tiny_llama.merged)).digest
    assert cli_main(["hash", "--json", str(tiny_llama.merged)]) == 0
    import json

    manifest = json.loads(capsys.readouterr().out)
    assert manifest["digest"] == digest
    assert "model.safetensors" in manifest["files"]
    assert len(manifest["tensors"]) == len(Checkpoint.open(tiny_llama.merged).tensors)
