"""Generate a Llama-shaped bf16 base checkpoint, a rank-16 all-linear LoRA adapter and its merge.

    python benchmarks/generate.py --preset 1.1b [--root benchmarks/out/models] [--seed 0]

Writes ``<root>/<preset>-seed<seed>/{base,adapter,merged}`` and reuses them when they exist.
Nothing is downloaded and nothing is held whole in memory: each safetensors shard's header is
computed from the shapes first, then every tensor is generated (seeded, ``normal * 0.02`` in
bf16; RMSNorm weights are ones) and written in chunks, so a 13.5 GB 7B checkpoint is written with
a few hundred MB of memory. Shards follow huggingface_hub's plan (state-dict order, a new shard
when the next tensor would pass ``--max-shard-size``, default 5GB, the layout of most Hub
checkpoints) and safetensors' own layout (tensors sorted by name, header padded to 8 bytes).

The adapter is what ``peft`` 0.21.2 saves for ``LoraConfig(r=16, lora_alpha=32,
target_modules="all-linear")``: the ``adapter_config.json`` is written by peft itself from a
config resolved on a tiny model with the same module names, and ``adapter_model.safetensors``
holds fp32 ``lora_A`` (kaiming-uniform, as peft initialises it) and non-zero ``lora_B``
(``normal * 0.01``; peft initialises it to zero, which would make the merge a no-op). The
resulting delta is about 5 % of a weight's magnitude, so most bf16 elements change.

The merged checkpoint is written by ``harness.merger.merge_checkpoint`` when the package has it,
otherwise by this script's own streaming merge in peft's rounding order (``W += (B @ A) *
scale``, bf16 += fp32, i.e. one rounding of the fp32 sum).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, PRESETS, Shape, table

DEFAULT_ROOT = OUT / "models"
RANK = 16
ALPHA = 32
#: Elements generated per chunk: 16M fp32 values = 64 MB transient.
CHUNK = 16 * 1024 * 1024
DEFAULT_SHARD = "5GB"
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (huggingface_hub's units: decimal KB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(text, int):
        return text
    upper = text.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * SIZE_UNITS[unit])
    return int(upper)


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---- safetensors layout -------------------------------------------------------------------


def plan_shards(
    tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_size: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """huggingface_hub's ``split_state_dict_into_shards_factory`` plan."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    current: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if nbytes > max_shard_size:
            shards.append([(name, shape)])
            continue
        if size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def header_bytes(
    entries: list[tuple[str, tuple[int, ...]]], dtype: str, itemsize: int
) -> tuple[bytes, list[tuple[str, tuple[int, ...]]]]:
    """The safetensors header for ``entries`` (sorted by name, as safetensors writes them)."""
    ordered = sorted(entries)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in ordered:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, ordered


# ---- base ---------------------------------------------------------------------------------


def _write_tensor(handle: Any, name: str, shape: tuple[int, ...], seed: int) -> None:
    import torch

    if len(shape) == 1:  # RMSNorm weights: ones, as initialised
        data = torch.ones(shape, dtype=torch.bfloat16)
        handle.write(data.view(torch.int16).numpy().tobytes())
        return
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    rows, cols = shape
    step = max(1, CHUNK // cols)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        # (n, cols) fp32 -> bf16, written row block by row block.
        block = torch.randn((n, cols), generator=generator).mul_(0.02).to(torch.bfloat16)
        handle.write(memoryview(block.view(torch.int16).numpy()))


def llama_config(shape: Shape) -> dict[str, Any]:
    """The ``config.json`` transformers writes for this shape (bf16)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    data: dict[str, Any] = config.to_dict()
    data["dtype"] = "bfloat16"
    data.pop("torch_dtype", None)
    return data


def write_base(folder: Path, shape: Shape, seed: int, max_shard_size: int) -> None:
    """Write config, generation config and the sharded bf16 weights of a random base."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(llama_config(shape), indent=2, sort_keys=True))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shards = plan_shards(shape.tensors(), 2, max_shard_size)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, entries in zip(names, shards, strict=True):
        header, ordered = header_bytes(entries, "BF16", 2)
        with (folder / file_name).open("wb") as handle:
            handle.write(header)
            for name, tensor_shape in ordered:
                _write_tensor(handle, name, tensor_shape, seed)
                weight_map[name] = file_name
                total += math.prod(tensor_shape) * 2
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---- adapter ------------------------------------------------------------------------------


def adapter_config(base: Path, shape: Shape) -> dict[str, Any]:
    """peft's own ``adapter_config.json`` for an all-linear rank-16 LoRA on a Llama.

    peft 0.21 resolves ``all-linear`` to full module names and shortens them to suffixes only
    when there are 20 or more, so the stand-in model has the real layer count (and 16-wide
    layers): the saved ``target_modules`` are what peft saves for the full-size model.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=shape.layers, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=32,
                                        tie_word_embeddings=False))
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.05,
                        task_type="CAUSAL_LM")
    with torch.device("cpu"):
        model = get_peft_model(tiny, config)
    resolved = model.peft_config["default"]
    resolved.base_model_name_or_path = str(base)
    scratch = base.parent / ".adapter-config-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    resolved.save_pretrained(str(scratch))
    data: dict[str, Any] = json.loads((scratch / "adapter_config.json").read_text())
    if isinstance(data.get("target_modules"), list):  # saved from a set: make it reproducible
        data["target_modules"] = sorted(data["target_modules"])
    shutil.rmtree(scratch)
    return data


def adapter_tensors(shape: Shape, seed: int) -> dict[str, Any]:
    """fp32 ``lora_A`` (kaiming-uniform bound 1/sqrt(in)) and non-zero ``lora_B``, peft's keys."""
    import torch

    tensors = {}
    for module, fan_in, fan_out in shape.linear_modules():
        key = f"base_model.model.{module}"
        g = torch.Generator().manual_seed(_tensor_seed(seed + 1, module))
        bound = 1.0 / math.sqrt(fan_in)
        # lora_A: (r, in); lora_B: (out, r)
        tensors[key + ".lora_A.weight"] = (torch.rand((RANK, fan_in), generator=g) * 2 - 1) * bound
        tensors[key + ".lora_B.weight"] = torch.randn((fan_out, RANK), generator=g) * 0.01
    return tensors


def write_adapter(folder: Path, base: Path, shape: Shape, seed: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = adapter_config(base, shape)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(adapter_tensors(shape, seed), str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


# ---- merge --------------------------------------------------------------------------------


def fallback_merge(base: Path, adapter: Path, out: Path) -> None:
    """Streaming merge in peft's rounding order, same files and headers as the base.

    A LoRA merge leaves every name, shape and dtype unchanged, so each shard's header is copied
    byte for byte and the tensors are rewritten in file order one at a time.
    """
    from safetensors import safe_open

    from harness.io.checkpoint import Checkpoint

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    checkpoint = Checkpoint.open(base)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for side in base.iterdir():
        if side.suffix != ".safetensors":
            shutil.copy2(side, tmp / side.name)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as lora:
        keys = set(lora.keys())
        for sfile in checkpoint.files:
            with sfile.path.open("rb") as src, (tmp / sfile.path.name).open("wb") as dst:
                dst.write(src.read(8 + sfile.header_size))
            with (tmp / sfile.path.name).open("ab") as dst:
                for info in sorted(sfile.tensors.values(), key=lambda t: t.start):
                    data = checkpoint.read_bytes(info.name)
                    module = "base_model.model." + info.name.removesuffix(".weight")
                    if module + ".lora_A.weight" in keys:
                        weight = checkpoint.tensor(info.name, data)
                        a = lora.get_tensor(module + ".lora_A.weight")
                        b = lora.get_tensor(module + ".lora_B.weight")
                        # (out, r) @ (r, in) -> (out, in), fp32; bf16 += fp32 rounds once.
                        weight += (b @ a) * scale
                    dst.write(data)
    tmp.rename(out)


def merge(base: Path, adapter: Path, out: Path, max_shard_size: int | None) -> str:
    """Merge with the harness's streaming merger when available; return which merger ran."""
    try:
        from harness.merger import merge_checkpoint
    except ImportError:
        fallback_merge(base, adapter, out)
        return "benchmarks fallback (peft rounding order)"
    merge_checkpoint(base, adapter, out, max_shard_size=max_shard_size, progress=False)
    return "harness.merger.merge_checkpoint"


# ---- cache --------------------------------------------------------------------------------


def case_folder(root: Path, preset: str, seed: int) -> Path:
    return root / f"{preset}-seed{seed}"


def ensure(preset: str, *, root: Path = DEFAULT_ROOT, seed: int = 0,
           max_shard_size: str | int | None = None, with_merged: bool = True,
           log: bool = True) -> dict[str, Any]:
    """Generate (or reuse) base, adapter and merge of ``preset``; return their paths and facts."""
    shape = PRESETS[preset]
    case = case_folder(root, preset, seed)
    case.mkdir(parents=True, exist_ok=True)
    info_path = case / "info.json"
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.exists() else {}
    shard = parse_size(max_shard_size or info.get("max_shard_size") or DEFAULT_SHARD)
    if info.get("max_shard_size") not in (None, shard):
        raise SystemExit(f"{case} was generated with max_shard_size {info['max_shard_size']};"
                         " use another --root or delete it")
    info.update(preset=preset, seed=seed, shape=shape.__dict__, parameters=shape.parameters,
                max_shard_size=shard)

    def say(text: str) -> None:
        if log:
            print(text, flush=True)

    for part, build in (
        ("base", lambda tmp: write_base(tmp, shape, seed, shard)),
        ("adapter", lambda tmp: write_adapter(tmp, case / "base", shape, seed)),
    ):
        final = case / part
        if final.exists():
            continue
        tmp = case / f".{part}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        build(tmp)
        tmp.rename(final)
        info[f"{part}_seconds"] = round(time.perf_counter() - start, 2)
        say(f"generated {final} in {info[f'{part}_seconds']} s")
    merged = case / "merged"
    if with_merged and not merged.exists():
        start = time.perf_counter()
        info["merged_by"] = merge(case / "base", case / "adapter", merged, shard)
        info["merged_seconds"] = round(time.perf_counter() - start, 2)
        say(f"merged into {merged} with {info['merged_by']} in {info['merged_seconds']} s")
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True))
    info.update(base=case / "base", adapter=case / "adapter", merged=merged, case=case)
    return info


def ensure_in_child(preset: str, *, root: Path = DEFAULT_ROOT, seed: int = 0,
                    max_shard_size: str | None = None) -> dict[str, Any]:
    """:func:`ensure` in a child process, so the caller never imports torch.

    The benchmark drivers stay small: a child forked from a driver that holds torch would start
    with the driver's resident pages and inflate the ``ru_maxrss`` of short contenders.
    """
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), "--preset", preset,
               "--root", str(root), "--seed", str(seed)]
    if max_shard_size:
        command += ["--max-shard-size", str(max_shard_size)]
    subprocess.run(command, check=True)
    case = case_folder(root, preset, seed)
    info: dict[str, Any] = json.loads((case / "info.json").read_text())
    info.update(base=case / "base", adapter=case / "adapter", merged=case / "merged", case=case)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="presets:\n" + "\n".join(
                                         f"  {k:6} {v.parameters / 1e9:.3f}B params, hidden"
                                         f" {v.hidden}, intermediate {v.intermediate}, {v.layers}"
                                         f" layers, {v.heads}/{v.kv_heads} heads, vocab"
                                         f" {v.vocab} ({v.note})" for k, v in PRESETS.items()))
    parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=["0.1b"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="cache folder of generated models (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None,
                        help=f"shard size, huggingface_hub units (default: {DEFAULT_SHARD}, or"
                        " what a cached case was generated with)")
    parser.add_argument("--no-merge", action="store_true", help="only base and adapter")
    parser.add_argument("--delete", action="store_true",
                        help="delete the preset's generated folders instead")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.preset:
        if args.delete:
            case = case_folder(args.root, preset, args.seed)
            shutil.rmtree(case, ignore_errors=True)
            print(f"deleted {case}")
            continue
        info = ensure(preset, root=args.root, seed=args.seed, max_shard_size=args.max_shard_size,
                      with_merged=not args.no_merge)
        base_bytes = sum(p.stat().st_size for p in info["base"].glob("*.safetensors"))
        rows.append([preset, f"{info['parameters'] / 1e9:.3f}B", f"{base_bytes / 1e9:.2f} GB",
                     str(len(list(info["base"].glob("*.safetensors")))),
                     str(info.get("base_seconds", "cached")), str(info.get("merged_by", "-")),
                     str(info["case"])])
    if rows:
        print(table(["preset", "params", "base size", "shards", "base s", "merged by", "folder"],
                    rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
