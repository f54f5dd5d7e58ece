"""Every bad input is a failed check (exit 1) or a usage error (exit 4) with a one-line cause.

Each row of ``CASES`` damages a private copy of a tiny real merge, runs the plugin from an empty
folder exactly as a user would, and asserts the exit status, the one-line message naming the
file, and that no traceback or INTERNALERROR was printed. The same rows make the README's
table: ``MERGE_HARNESS_BADINPUT_TABLE=table.md pytest tests/test_badinput.py`` writes each
message as a user sees it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from guard import install_family
from safetensors.torch import load_file, save_file

from harness.errors import CheckpointError
from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import read_header

# ---- editing real checkpoints ------------------------------------------------------------------


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file as (header dict, data bytes)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def join(header: dict[str, Any], data: bytes) -> bytes:
    """The inverse of :func:`split`."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def edit_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the header of ``path`` in place, keeping the data bytes."""
    header, data = split(path)
    change(header)
    path.write_bytes(join(header, data))


def by_offset(header: dict[str, Any]) -> list[str]:
    """Tensor names in data order."""
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def overlap(header: dict[str, Any]) -> None:
    """Give the last of two equal-sized tensors the first one's byte range."""
    order = by_offset(header)
    sizes: dict[int, list[str]] = {}
    for name in order:
        begin, end = header[name]["data_offsets"]
        sizes.setdefault(end - begin, []).append(name)
    first, *_, last = next(group for group in sizes.values() if len(group) > 1)
    header[last]["data_offsets"] = list(header[first]["data_offsets"])


def past_end(header: dict[str, Any]) -> None:
    """Grow the last tensor by one row without adding its bytes."""
    entry = header[by_offset(header)[-1]]
    begin, end = entry["data_offsets"]
    row = (end - begin) // entry["shape"][0]
    entry["shape"][0] += 1
    entry["data_offsets"] = [begin, end + row]


def unknown_dtype(header: dict[str, Any]) -> None:
    header[by_offset(header)[0]]["dtype"] = "F13"


def remap_shard(folder: Path, new_name: str) -> None:
    """Point every tensor of the first shard at ``new_name`` in the index."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {
        k: (new_name if v == first else v) for k, v in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


# ---- the inputs every case starts from ---------------------------------------------------------


@dataclass(frozen=True)
class Good:
    """Private, damageable copies of a correct merge (single-file and sharded), in ``root``."""

    root: Path
    base: Path
    adapter: Path
    merged: Path
    sharded: Path
    sharded_base: Path
    foreign: Foreign


@dataclass(frozen=True)
class Foreign:
    """Models that fit nothing here: a wider Llama with its adapter, and a GPT-2 adapter."""

    wide_base: Path
    wide_adapter: Path
    gpt2_adapter: Path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Foreign:
    from harness.tiny import build_adapter, build_base

    root = tmp_path_factory.mktemp("foreign")
    wide = build_base(root / "wide", hidden_size=64, intermediate_size=128)
    gpt2 = build_base(root / "gpt2", arch="gpt2")
    return Foreign(wide, build_adapter(wide, root / "wide-adapter"),
                   build_adapter(gpt2, root / "gpt2-adapter", fan_in_fan_out=True))


@pytest.fixture
def good(pytester: pytest.Pytester, tiny_llama, tiny_llama_sharded, foreign) -> Good:
    """Copies made inside the pytester folder (the run's working directory)."""
    root = pytester.path / "inputs"
    copies = {}
    for name, source in (("base", tiny_llama.base), ("adapter", tiny_llama.adapter),
                         ("merged", tiny_llama.merged), ("sharded", tiny_llama_sharded.merged),
                         ("sharded_base", tiny_llama_sharded.base)):
        copies[name] = Path(shutil.copytree(source, root / name))
    return Good(root=root, foreign=foreign, **copies)


# ---- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, what the user runs, what they must see."""

    id: str
    input: str
    what: str
    #: Damages the copies and returns the plugin arguments.
    make: Callable[[Good], list[str]]
    status: int
    #: fnmatch pattern of the message; ``{root}`` is the inputs folder.
    message: str
    #: The check that must fail with it (exit 1), e.g. "structure::loads"; None for exit 4.
    check: str | None = None
    families: str = "structure,security,hash"


def merged_and_base(folder: Path, good: Good) -> list[str]:
    return ["--merged-model", str(folder), "--base-model", str(good.base)]


def make_merged(change: Callable[[Good], Path]) -> Callable[[Good], list[str]]:
    """A case that damages the merged model: ``change`` returns the merged folder to check."""
    return lambda good: merged_and_base(change(good), good)


def sharded_args(good: Good) -> list[str]:
    return ["--merged-model", str(good.sharded), "--base-model", str(good.sharded_base)]


def make_sharded(change: Callable[[Path], None]) -> Callable[[Good], list[str]]:
    def make(good: Good) -> list[str]:
        change(good.sharded)
        return sharded_args(good)

    return make


def _file_for_folder(good: Good) -> Path:
    target = good.root / "merged.safetensors"
    shutil.copy(good.merged / "model.safetensors", target)
    return target


def _empty(good: Good) -> Path:
    (good.root / "empty").mkdir()
    return good.root / "empty"


def _truncate(keep: int | None = None, cut: int = 0) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        path = good.merged / "model.safetensors"
        raw = path.read_bytes()
        path.write_bytes(raw[:keep] if keep is not None else raw[:-cut])
        return good.merged

    return change


def _length(value: Callable[[int], int]) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        path = good.merged / "model.safetensors"
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value(len(raw))) + raw[8:])
        return good.merged

    return change


def _header(edit: Callable[[dict[str, Any]], None]) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        edit_header(good.merged / "model.safetensors", edit)
        return good.merged

    return change


def _bad_json(good: Good) -> Path:
    path = good.merged / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8] = ord("#")  # the opening brace of the header
    path.write_bytes(bytes(raw))
    return good.merged


def _duplicate_key(good: Good) -> Path:
    path = good.merged / "model.safetensors"
    header, data = split(path)
    name = by_offset(header)[0]
    text = json.dumps(header)
    text = "{" + json.dumps(name) + ": " + json.dumps(header[name]) + ", " + text[1:]
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    return good.merged


def _missing_shard(folder: Path) -> None:
    shards(folder)[-1].unlink()


def _escape_symlink(folder: Path) -> None:
    shard = shards(folder)[0]
    outside = folder.parent / "elsewhere"
    outside.mkdir()
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)


def _single_symlink(good: Good) -> Path:
    outside = good.root / "elsewhere"
    outside.mkdir()
    shutil.move(good.merged / "model.safetensors", outside / "model.safetensors")
    (good.merged / "model.safetensors").symlink_to(outside / "model.safetensors")
    return good.merged


def _two_shards(folder: Path) -> None:
    first, second = shards(folder)[:2]
    moved = load_file(first)
    name = sorted(moved)[0]
    extra = load_file(second)
    extra[name] = moved[name]
    save_file(extra, second, metadata={"format": "pt"})


def _stale_shard(folder: Path) -> None:
    shutil.copy(shards(folder)[0], folder / "model-00009-of-00009.safetensors")


def _index_text(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "model.safetensors.index.json").write_text(text)


def _total_size(folder: Path) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["metadata"]["total_size"] += 2
    path.write_text(json.dumps(index))


def _pickle_only(good: Good) -> Path:
    torch.save(load_file(good.merged / "model.safetensors"), good.merged / "pytorch_model.bin")
    (good.merged / "model.safetensors").unlink()
    return good.merged


def _nan(good: Good) -> Path:
    path = good.merged / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return good.merged


def _fifo(good: Good) -> Path:
    (good.merged / "model.safetensors").unlink()
    os.mkfifo(good.merged / "model.safetensors")
    return good.merged


def _folder_named_file(good: Good) -> Path:
    (good.merged / "model.safetensors").unlink()
    (good.merged / "model.safetensors").mkdir()
    return good.merged


def _config(text: str) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        (good.merged / "config.json").write_text(text)
        return good.merged

    return change


def _auto_map(good: Good) -> Path:
    path = good.merged / "config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    path.write_text(json.dumps(config))
    (good.merged / "modeling_evil.py").write_text("import os\nos.system('echo pwned')\n")
    return good.merged


def _base(change: Callable[[Good], Path]) -> Callable[[Good], list[str]]:
    return lambda good: ["--merged-model", str(good.merged), "--base-model", str(change(good))]


def _base_truncated(good: Good) -> Path:
    path = good.base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    return good.base


def _base_file(good: Good) -> Path:
    target = good.root / "base.safetensors"
    shutil.copy(good.base / "model.safetensors", target)
    return target


def _config_file(text: str, name: str = "merge-harness.toml") -> Callable[[Good], list[str]]:
    def make(good: Good) -> list[str]:
        path = good.root / name
        path.write_text(text)
        return [*merged_and_base(good.merged, good), "--merge-config", str(path)]

    return make


def make_adapter(change: Callable[[Good], Path]) -> Callable[[Good], list[str]]:
    """A case that damages the adapter: ``change`` returns the adapter folder to pass."""
    return lambda good: [*merged_and_base(good.merged, good), "--adapter", str(change(good))]


def _adapter_config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        path = good.adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
        return good.adapter

    return change


def _adapter_weights(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                     ) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        path = good.adapter / "adapter_model.safetensors"
        save_file(edit(load_file(path)), path)
        return good.adapter

    return change


def _adapter_text(text: str) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        (good.adapter / "adapter_config.json").write_text(text)
        return good.adapter

    return change


def _adapter_file(good: Good) -> Path:
    target = good.root / "adapter.safetensors"
    shutil.copy(good.adapter / "adapter_model.safetensors", target)
    return target


def _adapter_truncated(good: Good) -> Path:
    path = good.adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    return good.adapter


def _adapter_pickle(good: Good) -> Path:
    path = good.adapter / "adapter_model.safetensors"
    torch.save(load_file(path), good.adapter / "adapter_model.bin")
    path.unlink()
    return good.adapter


def _lock(text: str) -> Callable[[Good], list[str]]:
    def make(good: Good) -> list[str]:
        path = good.root / "merge-harness.lock"
        path.write_text(text)
        return [*merged_and_base(good.merged, good), "--merge-lock", str(path)]

    return make


def _lock_with(extra: dict[str, Any]) -> Callable[[Good], list[str]]:
    def make(good: Good) -> list[str]:
        lock = json.loads((FIXTURES / "gate" / "example.lock").read_text())
        lock.update(extra)
        return _lock(json.dumps(lock))(good)

    return make


def _tasks(prepare: Callable[[Path], None], include: str = "tasks") -> Callable[[Good], list[str]]:
    """A gate config whose benchmark reads lm-eval tasks from a damaged folder."""

    def make(good: Good) -> list[str]:
        prepare(good.root)
        config = good.root / "gate.toml"
        config.write_text(
            "tokenizer = 'builtin:chars'\n[benchmark]\n"
            f"include_path = '{include}'\n[benchmark.tasks.tiny_choice]\nacc = {{ floor = 0.25 }}\n"
        )
        return [*merged_and_base(good.merged, good), "--adapter", str(good.adapter),
                "--merge-config", str(config)]

    return make


def _task_yaml(text: str | None) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        (root / "tasks").mkdir()
        if text is not None:
            (root / "tasks" / "tiny_choice.yaml").write_text(text)

    return prepare


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TASK_YAML = (FIXTURES / "tasks" / "tiny_choice" / "tiny_choice.yaml").read_text()
AD = "{root}/adapter"
WEIGHTS = "structure,weights"
M = "{root}/merged"
MF = "{root}/merged/model.safetensors"
IDX = "{root}/sharded/model.safetensors.index.json"

CASES = [
    # -- the merged model ---------------------------------------------------------------------
    Case("merged-missing", "merged", "missing path",
         lambda g: merged_and_base(g.root / "nope", g), 4,
         "--merged-model {root}/nope: no such file or folder"),
    Case("merged-file", "merged", "a file where a folder is expected",
         make_merged(_file_for_folder), 1,
         "{root}/merged.safetensors: expected a checkpoint folder, found a file",
         "structure::loads"),
    Case("merged-is-adapter", "merged", "the adapter folder passed as the merged model",
         lambda g: merged_and_base(g.adapter, g), 1,
         "{root}/adapter: expected model.safetensors or an index, found adapter_model.safetensors",
         "structure::loads"),
    Case("merged-empty", "merged", "an empty folder", make_merged(_empty), 1,
         "{root}/empty: no model.safetensors, index or shards in this folder", "structure::loads"),
    Case("merged-truncated", "merged", "a truncated safetensors file (tail cut)",
         make_merged(_truncate(cut=100)), 1,
         MF + ": truncated: tensor * ends at data byte * but the file holds * data bytes",
         "structure::loads"),
    Case("merged-stub", "merged", "a safetensors file of 5 bytes",
         make_merged(_truncate(keep=5)), 1, MF + ": truncated safetensors file (5 bytes)",
         "structure::loads"),
    Case("header-beyond-file", "merged", "header length larger than the file",
         make_merged(_length(lambda size: size + 1)), 1,
         MF + ": truncated: header declares * bytes but the file has * bytes",
         "structure::loads"),
    Case("header-absurd", "merged", "header length 2**60 (never allocated)",
         make_merged(_length(lambda size: 2**60)), 1,
         MF + ": header length 1152921504606846976 exceeds the 100000000 byte limit*",
         "structure::loads"),
    Case("header-json", "merged", "malformed header JSON", make_merged(_bad_json), 1,
         MF + ": malformed safetensors header: *", "structure::loads"),
    Case("header-duplicate", "merged", "a tensor named twice in one header",
         make_merged(_duplicate_key), 1,
         MF + ": malformed safetensors header: duplicate key *", "structure::loads"),
    Case("offsets-overlap", "merged", "overlapping tensor offsets", make_merged(_header(overlap)),
         1, MF + ": tensor * overlaps the previous tensor", "structure::loads"),
    Case("offsets-past-end", "merged", "offsets past the end of the file",
         make_merged(_header(past_end)), 1,
         MF + ": truncated: tensor * ends at data byte * but the file holds * data bytes",
         "structure::loads"),
    Case("dtype-unknown", "merged", "an unknown dtype", make_merged(_header(unknown_dtype)), 1,
         MF + ": tensor *: unknown dtype 'F13'", "structure::loads"),
    Case("index-missing-shard", "merged", "index names a missing shard",
         make_sharded(_missing_shard), 1,
         IDX + ": lists shard model-0000*.safetensors which does not exist", "structure::loads"),
    Case("index-dotdot", "merged", "index names a shard `../x.safetensors`",
         make_sharded(lambda f: remap_shard(f, "../x.safetensors")), 1,
         IDX + ": shard '../x.safetensors' is not a .safetensors file name inside the folder",
         "structure::loads"),
    Case("index-absolute", "merged", "index names an absolute shard path",
         make_sharded(lambda f: remap_shard(f, "/etc/x.safetensors")), 1,
         IDX + ": shard '/etc/x.safetensors' is not a .safetensors file name inside the folder",
         "structure::loads"),
    Case("shard-symlink-out", "merged", "a shard that is a symlink leaving the folder",
         make_sharded(_escape_symlink), 1,
         "{root}/sharded/model-0000*.safetensors: symlink resolves outside its folder*",
         "structure::loads"),
    Case("single-symlink-out", "merged", "model.safetensors a symlink leaving the folder",
         make_merged(_single_symlink), 1, MF + ": symlink resolves outside its folder*",
         "structure::loads"),
    Case("tensor-in-two-shards", "merged", "one tensor stored in two shards",
         make_sharded(_two_shards), 1,
         "{root}/sharded: tensor * is stored in both model-0000*.safetensors and"
         " model-0000*.safetensors", "structure::loads"),
    Case("stale-shard", "merged", "a shard file the index does not list",
         make_sharded(_stale_shard), 1,
         IDX + ": shard file(s) model-00009-of-00009.safetensors present but not in the index*",
         "structure::loads"),
    Case("index-json", "merged", "malformed index JSON", make_sharded(_index_text("{oops")), 1,
         IDX + ": malformed JSON: *", "structure::loads"),
    Case("index-total", "merged", "index total_size disagrees with the shards",
         make_sharded(_total_size), 1,
         IDX + ": total_size * but the shards hold * tensor bytes", "structure::loads"),
    Case("pickle-only", "merged", "a pickle-only checkpoint (default)", make_merged(_pickle_only),
         1, M + ": only pickle checkpoint(s) (pytorch_model.bin); refusing to unpickle*",
         "structure::loads"),
    Case("nonfinite", "merged", "a NaN in a weight", make_merged(_nan), 1,
         "1 tensor(s) hold NaN/Inf; first 'model.layers.0.mlp.down_proj.weight': 1 NaN*",
         "structure::all_finite"),
    Case("fifo", "merged", "model.safetensors is a named pipe (would block)",
         make_merged(_fifo), 1, MF + ": not a regular file (a pipe, socket or device)",
         "structure::loads"),
    Case("folder-as-file", "merged", "model.safetensors is a folder",
         make_merged(_folder_named_file), 1, MF + ": not a regular file (a folder)",
         "structure::loads"),
    Case("config-json", "merged", "config.json with bad syntax", make_merged(_config("{,}")), 1,
         M + "/config.json: malformed JSON: *", "structure::loads"),
    Case("config-not-object", "merged", "config.json that is not an object",
         make_merged(_config("[1, 2]")), 1, M + "/config.json: not a JSON object",
         "structure::loads"),
    Case("auto-map", "merged", "config.json with auto_map custom code",
         make_merged(_auto_map), 1,
         M + "/config.json has auto_map (custom code (modeling_evil.py)); refusing custom code:"
         " pass --merge-trust-remote-code to allow", "security::no_remote_code"),
    # -- the base model -----------------------------------------------------------------------
    Case("base-missing", "base", "missing path",
         lambda g: ["--merged-model", str(g.merged), "--base-model", str(g.root / "nope")], 4,
         "--base-model {root}/nope: no such file or folder"),
    Case("base-file", "base", "a file where a folder is expected", _base(_base_file), 1,
         "{root}/base.safetensors: expected a checkpoint folder, found a file",
         "structure::same_tensor_names"),
    Case("base-empty", "base", "an empty folder", _base(_empty), 1,
         "{root}/empty: no model.safetensors, index or shards in this folder",
         "structure::same_tensor_names"),
    Case("base-truncated", "base", "a truncated safetensors file", _base(_base_truncated), 1,
         "{root}/base/model.safetensors: truncated: tensor * ends at data byte*",
         "structure::same_tensor_names"),
    Case("base-mismatch", "base", "a base that does not match the merged model (hidden size)",
         lambda g: ["--merged-model", str(g.merged), "--base-model", str(g.foreign.wide_base)], 1,
         "* tensor(s) changed shape; 'lm_head.weight': base [128, 64], merged [128, 32]",
         "structure::same_shapes"),
    # -- the adapter --------------------------------------------------------------------------
    Case("adapter-missing", "adapter", "missing path",
         lambda g: [*merged_and_base(g.merged, g), "--adapter", str(g.root / "nope")], 4,
         "--adapter {root}/nope: no such file or folder"),
    Case("adapter-file", "adapter", "a file where a folder is expected",
         make_adapter(_adapter_file), 1,
         "{root}/adapter.safetensors: expected an adapter folder, found a file",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-empty", "adapter", "an empty folder", make_adapter(_empty), 1,
         "{root}/empty: no adapter_config.json (not a PEFT adapter folder)",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-config-json", "adapter", "adapter_config.json with bad syntax",
         make_adapter(_adapter_text('{"r": 4,')), 1, "adapter_config.json: malformed JSON: *",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-no-type", "adapter", "adapter_config.json without peft_type",
         make_adapter(_adapter_config(lambda c: c.pop("peft_type"))), 1,
         "adapter_config.json: missing peft_type", "weights::adapter_supported", WEIGHTS),
    Case("adapter-r0", "adapter", "r = 0", make_adapter(_adapter_config(lambda c: c.update(r=0))),
         1, "adapter_config.json: r must be a positive integer, got 0",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-negative-alpha", "adapter", "a negative lora_alpha",
         make_adapter(_adapter_config(lambda c: c.update(lora_alpha=-4))), 1,
         "adapter_config.json: lora_alpha must be >= 0, got -4", "weights::adapter_supported",
         WEIGHTS),
    Case("adapter-unknown-type", "adapter", "an unknown adapter type",
         make_adapter(_adapter_config(lambda c: c.update(peft_type="FOO"))), 1,
         "adapter type FOO is not verifiable by merge-harness (verifiable: *)",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-targets-nothing", "adapter", "target modules matching nothing in the base",
         make_adapter(_adapter_weights(
             lambda t: {k.replace(".layers.", ".blocks."): v for k, v in t.items()})), 1,
         "adapter module 'model.blocks.*' matches no tensor of the base checkpoint*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-no-weights", "adapter", "an adapter file with no tensors",
         make_adapter(_adapter_weights(lambda t: {})), 1,
         "adapter_model.safetensors: no adapter weights (target_modules * matched nothing*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-truncated", "adapter", "a truncated adapter_model.safetensors",
         make_adapter(_adapter_truncated), 1,
         AD + "/adapter_model.safetensors: truncated: tensor * ends at data byte*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-pickle", "adapter", "a pickle-only adapter (default)",
         make_adapter(_adapter_pickle), 1,
         AD + ": only a pickle adapter_model.bin; refusing to unpickle*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-hidden-size", "adapter", "an adapter for a different hidden size",
         lambda g: [*merged_and_base(g.merged, g), "--adapter", str(g.foreign.wide_adapter)], 1,
         "adapter module '*': the delta is * but the base weight is *",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-architecture", "adapter", "an adapter for a different architecture (GPT-2)",
         lambda g: [*merged_and_base(g.merged, g), "--adapter", str(g.foreign.gpt2_adapter)], 1,
         "adapter module 'transformer.h.0.attn.c_attn' matches no tensor of the base checkpoint*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-merge-mismatch", "adapter",
         "no --merged-model: an adapter that cannot be merged into the base",
         lambda g: ["--base-model", str(g.base), "--adapter", str(g.foreign.wide_adapter)], 4,
         "cannot merge * into {root}/base: adapter module '*': the delta is * but the base weight"
         " is *", None, WEIGHTS),
    Case("adapter-hub-base", "adapter", "no --base-model, and the adapter names a hub model",
         lambda g: ["--adapter", str(_adapter_config(
             lambda c: c.update(base_model_name_or_path="meta-llama/Llama-2-7b-hf"))(g))], 4,
         "--adapter: *base_model_name_or_path 'meta-llama/Llama-2-7b-hf' is not a local folder*"),
    # -- the lock file ------------------------------------------------------------------------
    Case("lock-syntax", "lock", "a lock file with bad JSON syntax", _lock('{"digests": '), 1,
         "{root}/merge-harness.lock: bad JSON lock file: *", "lock::digests", "structure,lock"),
    Case("lock-unknown-key", "lock", "a lock file with an unknown key",
         _lock_with({"surprise": 1}), 1, "{root}/merge-harness.lock: unknown key(s) surprise",
         "lock::digests", "structure,lock"),
    Case("lock-unknown-digest", "lock", "a lock file with an unknown digest",
         _lock_with({"digests": {"merged": "ab", "extra": "cd"}}), 1,
         "{root}/merge-harness.lock: unknown digest(s) extra", "lock::digests", "structure,lock"),
    Case("lock-format", "lock", "a lock file of another format",
         _lock_with({"format": "something/2"}), 1,
         "{root}/merge-harness.lock: unsupported lock format 'something/2'*", "lock::digests",
         "structure,lock"),
    # -- the lm-eval tasks ----------------------------------------------------------------------
    Case("tasks-missing", "tasks", "benchmark.include_path naming a missing folder",
         _tasks(lambda root: None), 4, "{root}/gate.toml: benchmark.include_path: *no such folder",
         None, "benchmark"),
    Case("tasks-empty", "tasks", "a tasks folder without the task",
         _tasks(_task_yaml(None)), 1,
         "benchmark task 'tiny_choice' is not defined under {root}/tasks (no task YAML found)",
         "benchmark::tiny_choice.acc", "benchmark"),
    Case("tasks-yaml", "tasks", "a task YAML with bad syntax",
         _tasks(_task_yaml("task: tiny_choice\n  bad: [\n")), 1,
         "benchmark task 'tiny_choice' is not defined under {root}/tasks*",
         "benchmark::tiny_choice.acc", "benchmark"),
    Case("tasks-data", "tasks", "a task whose local data file is missing",
         _tasks(_task_yaml(TASK_YAML)), 1,
         "{root}/tasks/tiny_choice.yaml: data file 'data/test.jsonl' not found*",
         "benchmark::tiny_choice.acc", "benchmark"),
    # -- the gate configuration ---------------------------------------------------------------
    Case("config-syntax", "config", "a gate config file with bad TOML syntax",
         _config_file("checks = [structure\n"), 4, "{root}/merge-harness.toml: *"),
    Case("config-unknown-key", "config", "a gate config file with an unknown key",
         _config_file("max_dorp = 0.1\n"), 4, "{root}/merge-harness.toml: *max_dorp*"),
    Case("config-missing", "config", "--merge-config naming a missing file",
         lambda g: [*merged_and_base(g.merged, g), "--merge-config", str(g.root / "no.toml")], 4,
         "*{root}/no.toml*"),
]

#: What the users saw, collected for the README table (see the module docstring).
SEEN: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_table() -> Iterator[None]:
    yield
    target = os.environ.get("MERGE_HARNESS_BADINPUT_TABLE")
    if target and SEEN:
        rows = ["| input | bad input | exit | failing check | what the user sees |",
                "|---|---|---|---|---|"]
        for case in CASES:
            if case.id in SEEN:
                text = SEEN[case.id].replace("|", "\\|")
                check = f"`{case.check}`" if case.check else "(usage error)"
                rows.append(
                    f"| {case.input} | {case.what} | {case.status} | {check} | `{text}` |"
                )
        Path(target).write_text("\n".join(rows) + "\n")


def assert_clean(output: str) -> None:
    """No traceback, no INTERNALERROR: whatever went wrong was reported as one line."""
    assert "Traceback" not in output, output
    assert "INTERNALERROR" not in output, output


def run_case(pytester: pytest.Pytester, good: Good, case: Case, subprocess: bool = False) -> str:
    """Run ``case`` and return the line the user sees (paths relative to the run folder)."""
    args = ["-p", "no:randomly", "--merge-checks", case.families, *case.make(good)]
    result = pytester.runpytest_subprocess(*args) if subprocess else pytester.runpytest(*args)
    output = result.stdout.str() + "\n" + result.stderr.str()
    assert_clean(output)
    assert result.ret == case.status, output
    # Messages are fnmatch patterns: "*" is the only wildcard, brackets and "?" are literal.
    message = case.message.replace("{root}", str(good.root))
    pattern = re.sub(r"[\[\]?]", lambda m: f"[{m.group()}]", message)
    if case.check is None:
        result.stderr.fnmatch_lines([f"ERROR: {pattern}"])
        shown = next(ln for ln in result.stderr.lines if ln.startswith("ERROR: "))
    else:
        prefix = f"FAIL merge::{case.check} "
        result.stdout.fnmatch_lines([f"{prefix}*{pattern}"])
        shown = next(ln for ln in result.stdout.lines if ln.startswith(prefix))
        shown = shown[len(prefix):].strip()
    return shown.replace(str(good.root), ".").replace(str(good.foreign.wide_base.parent), ".")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(pytester: pytest.Pytester, good: Good, case: Case):
    SEEN[case.id] = run_case(pytester, good, case)


@pytest.mark.parametrize("case_id", ["merged-missing", "header-absurd"])
def test_bad_input_subprocess(pytester: pytest.Pytester, good: Good, case_id: str):
    """The same, through a real subprocess: what CI sees, stderr included."""
    run_case(pytester, good, next(c for c in CASES if c.id == case_id), subprocess=True)


# ---- resource bounds ----------------------------------------------------------------------------


def test_absurd_header_allocates_nothing(tmp_path: Path):
    """A header declaring 2**60 bytes (or just beyond the file) is refused before any read."""
    path = tmp_path / "model.safetensors"
    for declared in (2**60, 2**64 - 1, 99_999_999):
        path.write_bytes(struct.pack("<Q", declared) + b"{}" + b"\0" * 64)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError, match=r"exceeds|truncated"):
                read_header(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, f"declared {declared}: peak {peak} bytes"


def test_huge_tensor_claims_allocate_nothing(tmp_path: Path):
    """Shapes and offsets claiming terabytes are refused from the header, before a read."""
    header = {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(join(header, b"\0" * 16))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="truncated: tensor 'w' ends at data byte"):
            Checkpoint.open(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_reading_holds_one_tensor(tmp_path: Path):
    """Streaming a checkpoint allocates about one tensor at a time, not the whole model."""
    from harness.stream.scan import scan_checkpoint

    tensors = {f"layer{i}.weight": torch.randn(256, 256) for i in range(16)}  # 16 x 256 KiB
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    checkpoint = Checkpoint.open(folder)
    tracemalloc.start()
    try:
        scan_checkpoint(checkpoint)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one = 256 * 256 * 4
    # The reader thread stays at most two tensors ahead of the consumer (plus the one in use).
    assert peak < 5 * one, f"peak {peak} bytes for tensors of {one} bytes (model {16 * one})"


# ---- hangs, internal errors and interrupts through the real runner -----------------------------


def _check(run: Callable[[Any], Any]) -> Any:
    from harness.run.check import Check
    from harness.run.result import Family

    return Check(Family.STRUCTURE, "probe", "test-only", run)


def _context() -> Any:
    from harness.run.context import Context
    from harness.run.settings import Settings

    return Context(Settings())


def test_timeout_turns_a_hang_into_a_failed_check():
    import threading
    import time

    from harness.run.result import Outcome
    from harness.run.runner import run_check

    release = threading.Event()
    started = time.perf_counter()
    result = run_check(_check(lambda ctx: release.wait(30)), _context(), timeout=0.2)
    elapsed = time.perf_counter() - started
    release.set()  # let the abandoned thread finish
    assert result.outcome is Outcome.FAILED
    assert result.message == "timed out after 0.2 s (raise --merge-timeout if the inputs are large)"
    assert elapsed < 5


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_keyboard_interrupt_still_interrupts(timeout):
    from harness.run.runner import run_check

    def interrupt(ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_check(_check(interrupt), _context(), timeout=timeout)


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("boom\nsecond line"),
         "internal error in merge::structure::probe: ValueError: boom (checking no input)"),
        (SystemExit(3), "internal error in merge::structure::probe: SystemExit(3)"),
        (MemoryError(), "ran out of resources: MemoryError while checking no input"),
        (CheckpointError("x.safetensors: bad\nmore"), "x.safetensors: bad"),
    ],
)
def test_errors_become_one_line_failures(error, message, timeout):
    from harness.run.result import Outcome
    from harness.run.runner import run_check

    def fail(ctx):
        raise error

    result = run_check(_check(fail), _context(), timeout=timeout)
    assert result.outcome is Outcome.FAILED
    assert result.message == message


def test_internal_error_item_shows_one_line(pytester: pytest.Pytester, monkeypatch, tiny_llama):
    """An unexpected exception in a check: one line; the traceback only with --full-trace."""
    def broken(ctx):
        return {}["no such key"]

    install_family(monkeypatch, {"lookup": broken})
    args = ["--merge-checks", "security", "--merged-model", str(tiny_llama.merged)]
    result = pytester.runpytest(*args)
    assert result.ret == 1
    assert_clean(result.stdout.str() + result.stderr.str())
    result.stdout.fnmatch_lines(
        ["FAIL merge::security::lookup *internal error in merge::security::lookup: KeyError: 'no*"]
    )
    traced = pytester.runpytest(*args, "--full-trace")
    assert traced.ret == 1
    traced.stdout.fnmatch_lines(["Traceback (most recent call last):", "*KeyError*"])


def test_timeout_option_end_to_end(pytester: pytest.Pytester, monkeypatch, tiny_llama):
    """--merge-timeout fails a hanging check and the run goes on to the next one."""
    import threading

    release = threading.Event()
    install_family(monkeypatch, {"hang": lambda ctx: release.wait(30),
                                 "quick": lambda ctx: _passed("fine")})
    try:
        result = pytester.runpytest("--merge-checks", "security", "--merge-timeout", "0.5",
                                    "--merged-model", str(tiny_llama.merged))
    finally:
        release.set()
    assert result.ret == 1
    assert_clean(result.stdout.str() + result.stderr.str())
    result.stdout.fnmatch_lines(["FAIL merge::security::hang *timed out after 0.5 s*",
                                 "PASS merge::security::quick *fine"])


def _passed(message: str) -> Any:
    from harness.run.result import CheckResult

    return CheckResult.passed(message)



def test_hf_cache_snapshot_symlinks_are_followed(tmp_path: Path, tiny_llama):
    """A Hugging Face cache snapshot (files are symlinks into ../../blobs) opens; a symlink
    from the same snapshot to anywhere else is still refused."""
    repo = tmp_path / "models--tiny--llama"
    snapshot_dir = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copy(tiny_llama.merged / name, blob)
        (snapshot_dir / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    checkpoint = Checkpoint.open(snapshot_dir)
    assert len(checkpoint.tensors) == 21 and checkpoint.config is not None
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    (snapshot_dir / "config.json").unlink()
    (snapshot_dir / "config.json").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="symlink resolves outside its folder"):
        Checkpoint.open(snapshot_dir)


def test_folder_hash_refuses_what_it_must_not_read(tmp_path: Path):
    """hash_folder (adapters, task folders) never follows a link out or blocks on a pipe."""
    from harness.stream.hashing import hash_folder

    folder = tmp_path / "tasks"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.yaml").write_text("task: a\n")
    first = hash_folder(folder)
    (folder / "sub" / "a.yaml").write_text("task: b\n")
    assert hash_folder(folder) != first
    secret = tmp_path / "secret"
    secret.write_text("token")
    (folder / "leak.yaml").symlink_to(secret)
    with pytest.raises(CheckpointError, match="symlink resolves outside"):
        hash_folder(folder)
    (folder / "leak.yaml").unlink()
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    with pytest.raises(CheckpointError, match="symlinked folder"):
        hash_folder(folder)
    (folder / "loop").unlink()
    os.mkfifo(folder / "pipe.yaml")
    with pytest.raises(CheckpointError, match="not a regular file"):
        hash_folder(folder)


def test_warning_as_error_is_one_line(pytester: pytest.Pytester, monkeypatch, tiny_llama):
    """Under -W error a check's warning fails its item, still with one line and no traceback."""
    from harness.run.result import CheckResult, Outcome

    install_family(monkeypatch, {
        "sidecar": lambda ctx: CheckResult(Outcome.WARNING, "tokenizer.json differs from the base"),
    })
    # (a plain "-W error" in-process would also raise pytest's own already-imported warning)
    result = pytester.runpytest("-W", "error::harness.plugin.items.MergeHarnessWarning",
                                "--merge-checks", "security",
                                "--merged-model", str(tiny_llama.merged))
    assert_clean(result.stdout.str() + result.stderr.str())
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "merge::security::sidecar: tokenizer.json differs from the base (a warning, raised as an"
        " error by -W)"
    ])
