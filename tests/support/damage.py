"""Make bad inputs from private copies of a correct tiny merge, and the plugin arguments to run.

:class:`Good` holds the copies (and :class:`Foreign`, models that fit nothing); the helpers edit
safetensors headers, lengths and index files byte by byte, and each ``make_*``/``with_*``
function damages the copies and returns the arguments the user would pass. torch is imported
inside the few functions that write tensors, so the case table renders without it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TASK_YAML = (FIXTURES / "tasks" / "tiny_choice" / "tiny_choice.yaml").read_text()


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


def file_for_folder(good: Good) -> Path:
    target = good.root / "merged.safetensors"
    shutil.copy(good.merged / "model.safetensors", target)
    return target


def empty_folder(good: Good) -> Path:
    (good.root / "empty").mkdir()
    return good.root / "empty"


def truncated(keep: int | None = None, cut: int = 0) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        path = good.merged / "model.safetensors"
        raw = path.read_bytes()
        path.write_bytes(raw[:keep] if keep is not None else raw[:-cut])
        return good.merged

    return change


def header_length(value: Callable[[int], int]) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        path = good.merged / "model.safetensors"
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value(len(raw))) + raw[8:])
        return good.merged

    return change


def edited_header(edit: Callable[[dict[str, Any]], None]) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        edit_header(good.merged / "model.safetensors", edit)
        return good.merged

    return change


def bad_json(good: Good) -> Path:
    path = good.merged / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8] = ord("#")  # the opening brace of the header
    path.write_bytes(bytes(raw))
    return good.merged


def duplicate_key(good: Good) -> Path:
    path = good.merged / "model.safetensors"
    header, data = split(path)
    name = by_offset(header)[0]
    text = json.dumps(header)
    text = "{" + json.dumps(name) + ": " + json.dumps(header[name]) + ", " + text[1:]
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    return good.merged


def missing_shard(folder: Path) -> None:
    shards(folder)[-1].unlink()


def escape_symlink(folder: Path) -> None:
    shard = shards(folder)[0]
    outside = folder.parent / "elsewhere"
    outside.mkdir()
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)


def single_symlink(good: Good) -> Path:
    outside = good.root / "elsewhere"
    outside.mkdir()
    shutil.move(good.merged / "model.safetensors", outside / "model.safetensors")
    (good.merged / "model.safetensors").symlink_to(outside / "model.safetensors")
    return good.merged


def two_shards(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    first, second = shards(folder)[:2]
    moved = load_file(first)
    name = sorted(moved)[0]
    extra = load_file(second)
    extra[name] = moved[name]
    save_file(extra, second, metadata={"format": "pt"})


def stale_shard(folder: Path) -> None:
    shutil.copy(shards(folder)[0], folder / "model-00009-of-00009.safetensors")


def index_text(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "model.safetensors.index.json").write_text(text)


def total_size(folder: Path) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["metadata"]["total_size"] += 2
    path.write_text(json.dumps(index))


def pickle_only(good: Good) -> Path:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(good.merged / "model.safetensors"), good.merged / "pytorch_model.bin")
    (good.merged / "model.safetensors").unlink()
    return good.merged


def nan_weight(good: Good) -> Path:
    from safetensors.torch import load_file, save_file

    path = good.merged / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return good.merged


def fifo(good: Good) -> Path:
    (good.merged / "model.safetensors").unlink()
    os.mkfifo(good.merged / "model.safetensors")
    return good.merged


def folder_named_file(good: Good) -> Path:
    (good.merged / "model.safetensors").unlink()
    (good.merged / "model.safetensors").mkdir()
    return good.merged


def config_text(text: str) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        (good.merged / "config.json").write_text(text)
        return good.merged

    return change


def auto_map(good: Good) -> Path:
    path = good.merged / "config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    path.write_text(json.dumps(config))
    (good.merged / "modeling_evil.py").write_text("import os\nos.system('echo pwned')\n")
    return good.merged


def make_base(change: Callable[[Good], Path]) -> Callable[[Good], list[str]]:
    return lambda good: ["--merged-model", str(good.merged), "--base-model", str(change(good))]


def base_truncated(good: Good) -> Path:
    path = good.base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    return good.base


def base_file(good: Good) -> Path:
    target = good.root / "base.safetensors"
    shutil.copy(good.base / "model.safetensors", target)
    return target


def with_config_file(text: str, name: str = "merge-harness.toml") -> Callable[[Good], list[str]]:
    def make(good: Good) -> list[str]:
        path = good.root / name
        path.write_text(text)
        return [*merged_and_base(good.merged, good), "--merge-config", str(path)]

    return make


def make_adapter(change: Callable[[Good], Path]) -> Callable[[Good], list[str]]:
    """A case that damages the adapter: ``change`` returns the adapter folder to pass."""
    return lambda good: [*merged_and_base(good.merged, good), "--adapter", str(change(good))]


def adapter_config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        path = good.adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
        return good.adapter

    return change


def adapter_weights(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                     ) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        from safetensors.torch import load_file, save_file

        path = good.adapter / "adapter_model.safetensors"
        save_file(edit(load_file(path)), path)
        return good.adapter

    return change


def adapter_text(text: str) -> Callable[[Good], Path]:
    def change(good: Good) -> Path:
        (good.adapter / "adapter_config.json").write_text(text)
        return good.adapter

    return change


def adapter_file(good: Good) -> Path:
    target = good.root / "adapter.safetensors"
    shutil.copy(good.adapter / "adapter_model.safetensors", target)
    return target


def adapter_truncated(good: Good) -> Path:
    path = good.adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    return good.adapter


def adapter_pickle(good: Good) -> Path:
    import torch
    from safetensors.torch import load_file

    path = good.adapter / "adapter_model.safetensors"
    torch.save(load_file(path), good.adapter / "adapter_model.bin")
    path.unlink()
    return good.adapter


def with_lock(text: str) -> Callable[[Good], list[str]]:
    def make(good: Good) -> list[str]:
        path = good.root / "merge-harness.lock"
        path.write_text(text)
        return [*merged_and_base(good.merged, good), "--merge-lock", str(path)]

    return make


def with_lock_keys(extra: dict[str, Any]) -> Callable[[Good], list[str]]:
    def make(good: Good) -> list[str]:
        lock = json.loads((FIXTURES / "gate" / "example.lock").read_text())
        lock.update(extra)
        return with_lock(json.dumps(lock))(good)

    return make


def with_tasks(
    prepare: Callable[[Path], None], include: str = "tasks"
) -> Callable[[Good], list[str]]:
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


def task_yaml(text: str | None) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        (root / "tasks").mkdir()
        if text is not None:
            (root / "tasks" / "tiny_choice.yaml").write_text(text)

    return prepare

