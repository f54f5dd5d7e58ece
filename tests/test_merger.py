"""The streaming merger: bit for bit peft's merge, the base's shard plan, atomic and read-only."""

from __future__ import annotations

import json

import pytest
import torch
from support.checkpoints import read_tensors
from support.oracle import oracle

from harness.errors import HarnessError
from harness.io.checkpoint import INDEX_FILE, Checkpoint
from harness.merger import MergeError, merge_checkpoint, parse_size
from harness.stream.hashing import hash_folder
from harness.tiny import peft_merge

CASES = [
    ("llama", "F32", {}),
    ("llama", "BF16", {}),
    ("llama", "F16", {"target_modules": ["q_proj", "o_proj"]}),
    ("gpt2", "BF16", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    ("llama", "BF16", {"use_rslora": True, "r": 8, "lora_alpha": 16}),
    ("llama", "BF16", {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 8},
                       "alpha_pattern": {"v_proj": 3}}),
    ("llama", "BF16", {"use_dora": True}),
    ("gpt2", "F32", {"use_dora": True, "target_modules": ["c_attn", "c_proj"],
                     "fan_in_fan_out": True}),
    ("llama", "BF16", {"modules_to_save": ["lm_head"], "target_modules": ["q_proj", "v_proj"]}),
    ("qwen2", "BF16", {}),
    ("qwen2", "BF16", {"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}),
    ("qwen2", "BF16", {"target_modules": ["q_proj", "k_proj"], "lora_bias": True}),
    ("llama", "BF16", {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}),
    ("llama", "BF16", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 9]}),
]
IDS = ["llama-f32", "llama-bf16", "llama-f16", "gpt2-conv1d", "rslora", "patterns", "dora",
       "dora-conv1d-f32", "mts-lm_head", "qwen2-tied", "qwen2-tied-mts", "lora-bias",
       "embedding", "trainable-tokens"]


def assert_same_merge(ours, theirs):
    """Same tensors, bit for bit, and the same tying in config.json."""
    mine, peft = read_tensors(ours), read_tensors(theirs)
    assert mine.keys() == peft.keys()
    for name in peft:
        assert mine[name].dtype == peft[name].dtype, name
        assert torch.equal(mine[name].view(torch.uint8), peft[name].view(torch.uint8)), name
    tie = [json.loads((f / "config.json").read_text()).get("tie_word_embeddings")
           for f in (ours, theirs)]
    assert tie[0] == tie[1]


@pytest.mark.parametrize(("arch", "dtype", "lora"), CASES, ids=IDS)
def test_merger_equals_peft_bit_for_bit(workshop, arch, dtype, lora):
    base = workshop.base(arch, dtype)
    adapter = workshop.adapter(base, **lora)
    before = hash_folder(base), hash_folder(adapter)
    ours = workshop.ours(base, adapter)
    assert_same_merge(ours, workshop.peft(base, adapter))
    assert (hash_folder(base), hash_folder(adapter)) == before  # inputs never written
    assert all(t.ok for t in oracle(ours, base, adapter).tensors)


def test_sharded_base_keeps_its_shard_plan(workshop):
    base = workshop.base("llama", "BF16", shard="20KB")
    adapter = workshop.adapter(base)
    ours = workshop.ours(base, adapter)
    base_index = json.loads((base / INDEX_FILE).read_text())
    our_index = json.loads((ours / INDEX_FILE).read_text())
    assert our_index["weight_map"] == base_index["weight_map"]
    assert our_index["metadata"]["total_size"] == Checkpoint.open(base).data_bytes
    assert sorted(p.name for p in ours.glob("*.safetensors")) == sorted(
        p.name for p in base.glob("*.safetensors"))
    theirs = workshop.folder("peft-sharded")
    peft_merge(base, adapter, theirs, max_shard_size="20KB")
    assert_same_merge(ours, theirs)


@pytest.mark.parametrize(("size", "files"), [("20KB", 3), (10**9, 1)])
def test_max_shard_size_reshards(workshop, size, files):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    out = merge_checkpoint(base, adapter, workshop.folder(f"reshard-{size}"),
                           max_shard_size=size, progress=False)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == files
    assert (out / INDEX_FILE).exists() == (files > 1)
    limit = parse_size(size)
    for shard in shards:
        checkpoint_bytes = sum(t.nbytes for t in Checkpoint.open(out).tensors.values()
                               if t.file == shard)
        assert checkpoint_bytes <= limit or len(Checkpoint.open(out).files) == 1
    assert_same_merge(out, workshop.ours(base, adapter))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("lots", "-5GB", 0):
        with pytest.raises(MergeError):
            parse_size(bad)


def test_tied_embedding_lora_is_untied(workshop):
    # The unmerged adapter changes the input embedding only; a tied merge would change the head.
    base = workshop.base("qwen2", "BF16")
    adapter = workshop.adapter(base, target_modules=["embed_tokens", "q_proj"])
    ours = workshop.ours(base, adapter)
    config = json.loads((ours / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tensors, base_tensors = read_tensors(ours), read_tensors(base)
    assert torch.equal(tensors["lm_head.weight"], base_tensors["model.embed_tokens.weight"])
    assert not torch.equal(tensors["model.embed_tokens.weight"],
                           base_tensors["model.embed_tokens.weight"])
    assert all(t.ok for t in oracle(ours, base, adapter).tensors)


def test_trainable_tokens_on_a_tied_model_stay_tied(workshop):
    base = workshop.base("qwen2", "BF16")
    adapter = workshop.adapter(base, target_modules=["q_proj"], trainable_token_indices=[2, 4])
    ours = workshop.ours(base, adapter)
    assert "lm_head.weight" not in read_tensors(ours)
    assert_same_merge(ours, workshop.peft(base, adapter))


def test_adapters_merge_in_sequence(workshop):
    base = workshop.base("llama", "BF16")
    first = workshop.adapter(base, seed=1, target_modules=["q_proj", "v_proj"])
    second = workshop.adapter(base, seed=2, target_modules=["q_proj", "up_proj"], use_dora=True)
    both = workshop.ours(base, [first, second])
    step = workshop.folder("peft-first")
    peft_merge(base, first, step)
    theirs = workshop.folder("peft-second")
    peft_merge(step, second, theirs)
    assert_same_merge(both, theirs)
    assert all(t.ok for t in oracle(both, base, [first, second]).tensors)


def test_side_files_are_copied_and_adapter_tokenizers_win(workshop, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(workshop.base("llama", "BF16"), base)
    (base / "tokenizer.json").write_text('{"from": "base"}')
    (base / "special_tokens_map.json").write_text("{}")
    (base / "README.md").write_text("not copied")
    adapter = tmp_path / "adapter"
    shutil.copytree(workshop.adapter(workshop.base("llama", "BF16")), adapter)
    (adapter / "tokenizer.json").write_text('{"from": "adapter"}')
    out = merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "special_tokens_map.json", "model.safetensors"} <= names
    assert "README.md" not in names
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "adapter"}
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text())


def test_existing_output_is_refused_unless_overwrite(workshop, tmp_path):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoint(base, adapter, out, progress=False)
    assert (out / "keep.txt").exists()
    merge_checkpoint(base, adapter, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists()
    assert_same_merge(out, workshop.ours(base, adapter))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


@pytest.mark.parametrize("where", ["inside-base", "inside-adapter", "is-base", "contains-base"])
def test_output_never_touches_the_inputs(workshop, tmp_path, where):
    import shutil

    base = tmp_path / "models" / "base"
    shutil.copytree(workshop.base("llama", "BF16"), base)
    adapter = tmp_path / "adapter"
    shutil.copytree(workshop.adapter(workshop.base("llama", "BF16")), adapter)
    out = {"inside-base": base / "merged", "inside-adapter": adapter / "merged",
           "is-base": base, "contains-base": tmp_path / "models"}[where]
    before = hash_folder(base), hash_folder(adapter)
    with pytest.raises(MergeError):
        merge_checkpoint(base, adapter, out, overwrite=True, progress=False)
    assert (hash_folder(base), hash_folder(adapter)) == before


def test_a_failed_merge_leaves_nothing(workshop, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(workshop.adapter(workshop.base("llama", "BF16")), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "VERA"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(HarnessError, match="adapter type VERA is not verifiable"):
        merge_checkpoint(workshop.base("llama", "BF16"), adapter, tmp_path / "out",
                         progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_progress_bar(workshop, tmp_path, capsys):
    base = workshop.base("llama", "BF16")
    merge_checkpoint(base, workshop.adapter(base), tmp_path / "out", progress=True)
    assert "merging" in capsys.readouterr().err
