"""The streaming merger: base + adapter(s) -> a merged safetensors checkpoint, tensor by tensor.

Bit for bit what peft's ``merge_and_unload`` followed by ``save_pretrained`` writes (each edit's
:meth:`~harness.deltas.base.Edit.merge` replays peft's rounding path), but without loading a model:
a reader thread streams base tensors in file order, the main thread applies the edits of one
tensor, and a writer thread appends the result to the output shard, so reads, arithmetic and
writes overlap and only a few tensors are held at a time.

The output keeps the base's tensor set, dtypes and shard plan (or re-shards to
``max_shard_size``), copies ``config.json``, ``generation_config.json``, tokenizer files and custom
code, and is written into a temporary folder beside ``out`` that is renamed into place at the end.
A base that ties its output head to the input embedding is untied (``tie_word_embeddings=false``
and a separate ``lm_head.weight``) when the adapter changes one side of the tie and not the other
— exactly what the unmerged adapter model computes, which peft's merge does for
``modules_to_save=["lm_head"]`` but not for LoRA on a tied embedding or head (peft then writes
the changed shared tensor for both, see peft issue 2777).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from harness.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, TensorInfo, tensor_from_bytes
from harness.errors import HarnessError

if TYPE_CHECKING:
    import torch

    from harness.deltas import Plan
    from harness.parallel import BufferPool, ByteBudget

#: Files copied from the base (and, for tokenizers, overridden by an adapter's own copy).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
#: Side files an adapter folder may carry that supersede the base's (a retrained tokenizer).
ADAPTER_OVERRIDES = frozenset(SIDE_FILES) - {"generation_config.json"}
#: Bytes of tensors in flight between reader, workers and writer: at least this, or two of the
#: largest tensor.
MIN_BUDGET = 256 * 1024 * 1024
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class MergeError(HarnessError):
    """The merge cannot be done as asked (existing output, output inside an input, ...)."""


def parse_size(value: int | str) -> int:
    """Bytes from ``1000000``, ``"500MB"`` (10^6) or ``"2GiB"`` (2^30), as transformers reads."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(2).upper() not in _UNITS:
            raise MergeError(f"max shard size {value!r}: expected bytes or a size like 5GB, 500MiB")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise MergeError(f"max shard size must be positive, got {value!r}")
    return size


@dataclass
class _Entry:
    """One output tensor: its name and header, and the base tensor its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: TensorInfo


@dataclass
class _Shard:
    """One output file and the tensors it holds, in write order."""

    name: str
    entries: list[_Entry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Tensor bytes in this shard."""
        return sum(e.nbytes for e in self.entries)

    def header(self) -> bytes:
        """The safetensors header (length prefix included), padded to 8 bytes."""
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for entry in self.entries:
            header[entry.name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw


def _path_inside(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
    except ValueError:
        return False
    return True


def _check_paths(base: Path, adapters: Sequence[Path], out: Path, overwrite: bool) -> None:
    for label, source in [("base", base)] + [("adapter", a) for a in adapters]:
        if _path_inside(out, source):
            raise MergeError(f"{out}: the output must not be inside the {label} folder {source}")
        if _path_inside(source, out):
            raise MergeError(f"{out}: the output folder contains the {label} folder {source}")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise MergeError(f"{out}: exists and is not a folder; refusing to replace it")
        if not overwrite:
            raise MergeError(f"{out}: already exists (pass --overwrite to replace it)")


def _plan_shards(
    checkpoint: Checkpoint, extra: dict[str, _Entry], max_shard_size: int | None
) -> list[_Shard]:
    """The output files: the base's own plan, or a greedy re-plan to ``max_shard_size``.

    ``extra`` maps a base tensor name to an added tensor written right after it (an untied head).
    """
    ordered: list[tuple[str, _Entry]] = []
    for info in checkpoint.in_file_order():
        entries = [_Entry(info.name, info.dtype, info.shape, info.nbytes, info)]
        if info.name in extra:
            entries.append(extra[info.name])
        ordered += [(info.file.name, e) for e in entries]
    if max_shard_size is None:
        shards: dict[str, _Shard] = {}
        for file_name, entry in ordered:
            shards.setdefault(file_name, _Shard(file_name)).entries.append(entry)
        planned = list(shards.values())
        if len(planned) == 1:
            planned[0].name = SINGLE_FILE
        return planned
    planned = [_Shard("")]
    for _, entry in ordered:
        current = planned[-1]
        if current.entries and current.nbytes + entry.nbytes > max_shard_size:
            current = _Shard("")
            planned.append(current)
        current.entries.append(entry)
    total = len(planned)
    for number, shard in enumerate(planned, 1):
        shard.name = SINGLE_FILE if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"
    return planned


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (a view when it is contiguous)."""
    import torch

    flat = tensor.contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


class _Writer:
    """Appends tensor bytes to the output shards on a thread of its own."""

    def __init__(
        self, folder: Path, shards: list[_Shard], budget: ByteBudget, pool: BufferPool
    ) -> None:
        self.folder = folder
        self.shards = shards
        self.budget = budget
        self.pool = pool
        self.slots: queue.Queue[memoryview | bytes | bytearray | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="merge-harness-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        handle: IO[bytes] | None = None
        try:
            for shard in self.shards:
                handle = (self.folder / shard.name).open("wb")
                handle.write(shard.header())
                for entry in shard.entries:
                    data = self.slots.get()
                    if data is None:
                        return
                    if len(data) != entry.nbytes:
                        raise MergeError(
                            f"internal error: {entry.name} produced {len(data)} bytes, expected"
                            f" {entry.nbytes}"
                        )
                    handle.write(data)
                    if isinstance(data, bytearray):
                        self.pool.put(data)
                    del data
                    self.budget.release(entry.nbytes)
                handle.close()
                handle = None
        except BaseException as exc:  # reported by put()/finish() on the main thread
            self.error = exc
            while self.slots.get() is not None:
                pass
        finally:
            if handle is not None:
                handle.close()

    def put(self, data: memoryview | bytes | bytearray) -> None:
        """Queue the next tensor's bytes (in plan order)."""
        if self.error is not None:
            raise self.error
        self.slots.put(data)

    def finish(self) -> None:
        """Wait for the last write; re-raise a write error."""
        self.slots.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _untie(plan: Plan) -> bool:
    """Whether the merge makes a tied head differ from the input embedding."""
    source = plan.target.tie_source
    if source is None or plan.tied_head is None:
        return False
    head, embed = plan.for_tensor(plan.tied_head), plan.for_tensor(source)
    return len(head) != len(embed) or any(a is not b for a, b in zip(head, embed, strict=True))


def _copy_side_files(base: Path, adapters: Sequence[Path], tmp: Path, config: dict[str, Any] | None,
                     untie: bool) -> None:
    if config is not None:
        merged_config = dict(config)
        if untie:
            merged_config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(merged_config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        source = base / name
        for adapter in adapters:
            if name in ADAPTER_OVERRIDES and (adapter / name).is_file():
                source = adapter / name
        if source.is_file():
            shutil.copyfile(source, tmp / name)
    for code in sorted(base.glob("*.py")):
        if code.is_file():
            shutil.copyfile(code, tmp / code.name)


def merge_checkpoint(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Merge ``adapter`` (or several, in sequence) into ``base`` and write the result to ``out``.

    Returns ``out``. Raises a :class:`~harness.errors.HarnessError` with a one-line cause for an
    unreadable input, an adapter type the registry does not know, an existing ``out`` (unless
    ``overwrite``), or an ``out`` inside an input folder. Nothing is left behind on failure.
    """
    from tqdm.auto import tqdm

    from harness.adapter import Adapter
    from harness.deltas import Target, plan_adapters
    from harness.parallel import (
        BufferPool,
        ByteBudget,
        default_workers,
        pipeline,
        read_into,
        single_threaded_torch,
    )

    base_path = Path(base)
    adapter_paths = (
        [Path(adapter)] if isinstance(adapter, (str, os.PathLike)) else [Path(a) for a in adapter]
    )
    if not adapter_paths:
        raise MergeError("no adapter to merge")
    out_path = Path(out)
    _check_paths(base_path, adapter_paths, out_path, overwrite)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    checkpoint = Checkpoint.open(base_path)
    adapters = [Adapter.open(p) for p in adapter_paths]
    plan = plan_adapters(adapters, Target(checkpoint.tensors, checkpoint.config or {}))
    untie = _untie(plan)
    extra: dict[str, _Entry] = {}
    source = plan.target.tie_source
    if untie and source is not None and plan.tied_head is not None:
        info = checkpoint.tensors[source]
        extra[source] = _Entry(plan.tied_head, info.dtype, info.shape, info.nbytes, info)
    shards = _plan_shards(checkpoint, extra, limit)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".merging", dir=out_path.parent)
    )
    largest = max((i.nbytes for i in checkpoint.tensors.values()), default=0)
    budget = ByteBudget(max(MIN_BUDGET, 2 * largest))
    pool = BufferPool(budget.limit // 2)

    def read(info: TensorInfo) -> tuple[TensorInfo, bytearray]:
        if checkpoint.is_pickle:
            return info, checkpoint.read_bytes(info.name)
        return info, read_into(info, pool)

    try:
        writer = _Writer(tmp, shards, budget, pool)
        total = sum(s.nbytes for s in shards)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not progress)
        def process(item: tuple[TensorInfo, bytearray]) -> list[memoryview | bytearray]:
            info, data = item
            # an untied head starts from the base embedding: copy it before edits change it
            original = None
            if info.name in extra:
                original = pool.get(len(data))
                original[:] = data
            outputs = [_apply(plan.for_tensor(info.name), info, data)]
            if original is not None:
                outputs.append(_apply(plan.for_tensor(extra[info.name].name), info, original))
            for edit in plan.for_tensor(info.name):
                edit.release()
            return outputs

        count = workers if workers is not None else default_workers()
        try:
            with single_threaded_torch():
                for outputs in pipeline(
                    checkpoint.in_file_order(),
                    read,
                    process,
                    lambda info: info.nbytes * (2 if info.name in extra else 1),
                    budget,
                    count,
                ):
                    for output in outputs:
                        writer.put(output)
                        bar.update(len(output))
        except BaseException:
            writer.slots.put(None)
            writer.thread.join()
            raise
        finally:
            bar.close()
        writer.finish()
        plan.release()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {e.name: s.name for s in shards for e in s.entries},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _copy_side_files(base_path, adapter_paths, tmp, checkpoint.config, untie)
        _publish(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def _apply(edits: list[Any], info: TensorInfo, data: bytearray) -> memoryview | bytearray:
    """The merged bytes of one tensor: ``data`` itself when no edit applies or all edit in place."""
    if not edits:
        return data
    tensor = tensor_from_bytes(info, data)
    for edit in edits:
        tensor = edit.merge(tensor)
    if tensor.data_ptr() == tensor_from_bytes(info, data).data_ptr() and tensor.is_contiguous():
        return data
    return _as_bytes(tensor)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing ``out`` is replaced only at the end."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
