"""The value pass: every GGUF tensor against the merged tensors it was made from, streamed.

Each GGUF tensor is processed in chunks of whole rows (at most :data:`CHUNK_ELEMENTS`
elements), read with plain positional reads from both files, so memory stays flat whatever the
size of a tensor or a model. A chunk of the merged tensor is put through the converter's
transforms (:mod:`harness.export.layout`), then:

* for a reproducible type (:func:`~harness.export.encoding.reproducible`) it is re-encoded with
  ``gguf.quants`` and must give the exported bytes. A quantized type may also have been made by
  ``llama-quantize`` from a float16 or bfloat16 GGUF; re-encoding the values rounded to those is
  tried too before a block is reported;
* for another type the exported bytes are decoded and each block held to
  :func:`~harness.export.encoding.error_bound`.

With a base model, the decoded export and the base feed the retention ratio
(:mod:`harness.export.provenance`) of every tensor the merge changed, from an evenly spread
sample of each tensor's chunks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from harness.errors import CheckpointError, ExportError
from harness.export import encoding
from harness.export.layout import Layout, Source
from harness.export.provenance import Retention
from harness.export.reader import ExportFile, ExportTensor
from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import TensorInfo
from harness.stream.pipeline import default_workers, single_threaded_torch, workspace

if TYPE_CHECKING:
    import torch

#: Elements per chunk: 1 MiB of float32. Small enough that the temporaries of the comparison stay
#: in the CPU's cache and in the allocator's free lists (large fresh arrays cost a page fault
#: per 4 KiB), large enough that numpy's per-call overhead is noise.
CHUNK_ELEMENTS = 1 << 18
#: Chunks per tensor that feed the retention ratio (spread evenly over the tensor; all of
#: them in a tensor of fewer). The ratio is an estimate: a sample of a few million elements
#: per tensor pins it to a few parts in ten thousand, and spares reading the whole base.
PROVENANCE_CHUNKS = 4
#: Intermediate precisions a quantized export may have been made from (llama-quantize reads a
#: float16 or bfloat16 GGUF): None is the merged tensor itself, as convert_hf_to_gguf.py does.
ROUTES: tuple[str | None, ...] = (None, "F16", "BF16")


@dataclass
class TensorReport:
    """What the value pass found for one GGUF tensor."""

    name: str
    type: str
    sources: tuple[str, ...]
    transforms: list[str]
    numel: int
    blocks: int
    #: ``exact`` (re-encoded), ``exact from F16``/``from BF16`` (via that precision) or
    #: ``bounded`` (decoded and bounded).
    method: str = "exact"
    differing: int = 0
    first_block: int | None = None
    where: str = ""
    worst_error: float = 0.0
    worst_bound: float = 0.0
    retention: Retention | None = None

    @property
    def ok(self) -> bool:
        """Whether every block is as expected."""
        return self.differing == 0

    def to_json(self) -> dict[str, Any]:
        """JSON view (the report's per-tensor table)."""
        return {
            "tensor": self.name,
            "type": self.type,
            "sources": list(self.sources),
            "transforms": list(self.transforms),
            "method": self.method,
            "blocks": self.blocks,
            "differing": self.differing,
            "first_block": self.first_block,
            "where": self.where,
            "worst_error": self.worst_error,
            "worst_bound": self.worst_bound,
        }


@dataclass
class ValueResult:
    """Every tensor's report and the pass's figures."""

    tensors: list[TensorReport] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0

    def failing(self) -> list[TensorReport]:
        """Tensors with at least one differing block."""
        return [t for t in self.tensors if not t.ok]


class _Files:
    """Positional reads of tensor rows, from safetensors files and GGUF parts (one fd each).

    Each thread reads into its own buffers, one per ``slot`` and reused from chunk to chunk:
    what a slot held is valid until the same thread reads into that slot again.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._buffers = threading.local()
        self.bytes_read = 0

    def read(self, path: os.PathLike[str], offset: int, size: int, slot: str) -> memoryview:
        """``size`` bytes at ``offset`` (positional: safe from several threads at once)."""
        key = os.fspath(path)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(key, os.O_RDONLY)
                self._fds[key] = fd
        buffers: dict[str, bytearray] = getattr(self._buffers, "slots", None) or {}
        self._buffers.slots = buffers
        buffer = buffers.get(slot)
        if buffer is None or len(buffer) < size:
            buffer = bytearray(size)
            buffers[slot] = buffer
        view = memoryview(buffer)[:size]
        got = 0
        while got < size:
            count = os.preadv(fd, [view[got:]], offset + got)
            if count <= 0:
                raise ExportError(f"{key}: truncated: {size} bytes at {offset:,} cannot be read")
            got += count
        with self._lock:
            self.bytes_read += size
        return view

    def close(self) -> None:
        """Close every file."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row_length) of a tensor: a vector is one row."""
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    length = shape[-1]
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows, length


def _as_float(tensor: torch.Tensor, slot: str) -> torch.Tensor:
    """The converter's first step: anything but float16/float32 becomes float32.

    Into this thread's scratch tensor for ``slot`` (valid until the next chunk).
    """
    import torch

    if tensor.dtype in (torch.float16, torch.float32):
        return tensor
    found = workspace(tensor.numel(), torch.float32, slot)
    if found is None:
        return tensor.to(torch.float32)
    return found.reshape(tensor.shape).copy_(tensor)


class _Reader:
    """Row chunks of checkpoint tensors as torch tensors, read by range (pickles: whole)."""

    def __init__(self, checkpoint: Checkpoint, files: _Files, slot: str) -> None:
        self.checkpoint = checkpoint
        self.files = files
        self.slot = slot

    def rows(self, name: str, start: int, count: int) -> torch.Tensor:
        """Rows ``start .. start + count`` of tensor ``name`` as (count, row_length)."""
        import torch

        from harness.dtypes import to_torch

        info: TensorInfo = self.checkpoint.tensors[name]
        _, length = _rows_of(info.shape)
        if self.checkpoint.is_pickle:
            whole = self.checkpoint.tensor(name).reshape(-1, length)
            return whole[start : start + count]
        itemsize = info.nbytes // max(info.numel, 1)
        raw = self.files.read(
            info.file, info.start + start * length * itemsize, count * length * itemsize, self.slot
        )
        return torch.frombuffer(raw, dtype=to_torch(info.dtype)).reshape(count, length)


def _permute(chunk: torch.Tensor, head_rows: int) -> torch.Tensor:
    """llama.cpp's rotary row order within each head (``LlamaModel.permute``), on whole heads.

    (heads * head_rows, cols) -> same shape: in each head, rows ``[a0..a(h/2-1), b0..]`` become
    ``[a0, b0, a1, b1, ...]``. A bias (one row of heads * head_rows) is permuted the same way
    along its elements.
    """
    if chunk.shape[0] == 1 and chunk.shape[1] % head_rows == 0 and head_rows > 1:
        return _permute(chunk.reshape(-1, 1), head_rows).reshape(chunk.shape)
    heads = chunk.shape[0] // head_rows
    return (
        chunk.reshape(heads, 2, head_rows // 2, chunk.shape[1])
        .swapaxes(1, 2)
        .reshape(chunk.shape)
    )


def _source_row(source: Source, part_rows: int, row: int) -> tuple[str, int]:
    """The merged tensor and row a GGUF row was made from (for messages)."""
    part, row = divmod(row, part_rows) if len(source.parts) > 1 else (0, row)
    if source.head_rows:
        head, j = divmod(row, source.head_rows)
        row = head * source.head_rows + (j % 2) * (source.head_rows // 2) + j // 2
    return source.parts[min(part, len(source.parts) - 1)], row


@dataclass
class _Chunk:
    """One chunk: GGUF rows ``first_row ..`` and the expected values for them."""

    first_row: int
    expected: np.ndarray
    base: np.ndarray | None


def _chunks(
    source: Source,
    target: ExportTensor,
    merged: _Reader,
    base: _Reader | None,
) -> Iterator[_Chunk]:
    """The source's rows in GGUF order, transformed as the converter does, chunk by chunk."""
    part_shape = merged.checkpoint.tensors[source.parts[0]].shape
    part_rows, length = _rows_of(part_shape)
    if source.keep_rows is not None:
        part_rows = min(part_rows, source.keep_rows)
    step = max(1, CHUNK_ELEMENTS // max(length, 1))
    if source.head_rows:
        step = max(source.head_rows, step // source.head_rows * source.head_rows)
    chunks = len(source.parts) * -(-part_rows // step)
    # The base is read for an evenly spread sample of about PROVENANCE_CHUNKS chunks.
    stride = max(1, chunks // PROVENANCE_CHUNKS)
    number = 0
    for index, name in enumerate(source.parts):
        for start in range(0, part_rows, step):
            count = min(step, part_rows - start)
            expected = _transformed(merged.rows(name, start, count), source, "merged")
            prior = None
            if base is not None and number % stride == 0:
                prior = _transformed(base.rows(name, start, count), source, "base")
            number += 1
            yield _Chunk(index * part_rows + start, expected, prior)


def _transformed(chunk: torch.Tensor, source: Source, slot: str) -> np.ndarray:
    chunk = _as_float(chunk, f"export:{slot}")
    if source.head_rows:
        chunk = _permute(chunk, source.head_rows)
    if source.offset:
        chunk = chunk + source.offset
    return chunk.contiguous().numpy()


def _round_to(values: np.ndarray, route: str | None) -> np.ndarray:
    """``values`` as llama-quantize would have read them from a GGUF of ``route`` precision."""
    if route is None:
        return values
    if route == "F16":
        return values.astype(np.float16).astype(np.float32)
    bf16 = gguf.GGMLQuantizationType.BF16
    return encoding.decode(encoding.encode(values.astype(np.float32), bf16), bf16)


def _differs(
    values: np.ndarray, stored: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> np.ndarray:
    """Per block, whether ``stored`` differs from gguf.quants' encoding of ``values``."""
    quick = encoding.quick_differs(values, stored, qtype)
    if quick is not None and not quick.any():
        return quick
    # gguf.quants decides every difference that is reported.
    size = encoding.type_size(qtype)
    encoded = encoding.encode(values, qtype).reshape(-1, size)
    result: np.ndarray = (encoded != stored.reshape(-1, size)).any(axis=1)
    return result


def _compare_exact(
    chunk: np.ndarray,
    stored: np.ndarray,
    qtype: gguf.GGMLQuantizationType,
    routes: list[str | None],
) -> np.ndarray:
    """Per block, whether it differs from the re-encoding (by the route that fits best).

    ``routes`` is reordered in place so that the route that fitted is tried first next time.
    """
    best: np.ndarray | None = None
    for route in list(routes):
        differs = _differs(_round_to(chunk, route), stored, qtype)
        if best is None or differs.sum() < best.sum():
            best = differs
            routes.remove(route)
            routes.insert(0, route)
        if not differs.any():
            break
    assert best is not None
    if best.any():
        # No route reproduces this chunk: the rest of the tensor is judged by the closest one.
        del routes[1:]
    return best


def _check_tensor(
    source: Source,
    target: ExportTensor,
    merged: _Reader,
    base: _Reader | None,
    files: _Files,
) -> TensorReport:
    qtype = target.type
    length = _rows_of(target.shape)[1]
    block = encoding.block_size(qtype)
    report = TensorReport(
        target.name, qtype.name, source.parts, source.transforms(), target.numel,
        target.numel // block,
    )
    exact = encoding.reproducible(qtype)
    if not exact and not encoding.decodable(qtype):
        raise ExportError(
            f"{target.name}: type {qtype.name} cannot be decoded by gguf {gguf_version()}"
        )
    if length % block:
        raise ExportError(f"{target.name}: rows of {length} do not split into {qtype.name} blocks")
    routes: list[str | None] = list(ROUTES) if exact and qtype not in encoding.PLAIN else [None]
    retention = Retention() if base is not None else None
    part_rows = _rows_of(merged.checkpoint.tensors[source.parts[0]].shape)[0]
    for chunk in _chunks(source, target, merged, base):
        count = chunk.expected.shape[0]
        raw = files.read(target.file, target.start + chunk.first_row * target.row_bytes,
                         count * target.row_bytes, "export")
        stored = np.frombuffer(raw, dtype=np.uint8).reshape(count, target.row_bytes)
        differs = None
        if exact:
            differs = _compare_exact(chunk.expected, stored, qtype, routes)
            if differs.any() and qtype in encoding.SEARCHED:
                # llama-quantize quantizes these with an importance matrix when given one: not
                # reproducible then, only bounded.
                exact, differs = False, None
        if differs is None:
            decoded = encoding.decode(stored, qtype).reshape(-1, block)
            error = np.abs(decoded - chunk.expected.reshape(-1, block)).max(axis=1)
            bound = encoding.error_bound(chunk.expected, qtype)
            differs = error > bound
            worst = int(np.argmax(error - bound))
            if error[worst] - bound[worst] > report.worst_error - report.worst_bound:
                report.worst_error, report.worst_bound = float(error[worst]), float(bound[worst])
        bad = np.flatnonzero(differs)
        if bad.size:
            if report.first_block is None:
                report.first_block = int(chunk.first_row * length // block + bad[0])
                row = chunk.first_row + int(bad[0]) * block // length
                column = int(bad[0]) * block % length
                name, src_row = _source_row(source, part_rows, row)
                report.where = (
                    f"{name} row {src_row}, columns {column}..{column + block - 1}"
                    if block > 1 else f"{name} row {src_row}, column {column}"
                )
            report.differing += int(bad.size)
        if retention is not None and chunk.base is not None:
            values = chunk.expected.astype(np.float32, copy=False)
            delta = values - chunk.base
            if delta.any():
                decoded_all = encoding.decode(stored, qtype).reshape(delta.shape)
                retention.add(decoded_all - values, delta)
    report.method = "exact" if exact else "bounded"
    if exact and routes[0] is not None:
        report.method = f"exact from {routes[0]}"
    report.retention = retention
    return report


def gguf_version() -> str:
    """The installed gguf package's version (messages)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover - gguf imported from a source tree
        return "(unknown version)"


def _base_reader(merged: Checkpoint, base: Checkpoint | None,
                 files: _Files) -> Callable[[Source], _Reader | None]:
    """The base's reader for a source whose every part the base holds in the same shape."""
    reader = _Reader(base, files, "base") if base is not None else None

    def pick(source: Source) -> _Reader | None:
        if reader is None or base is None:
            return None
        for part in source.parts:
            found = base.tensors.get(part)
            if found is None or found.shape != merged.tensors[part].shape:
                return None
        return reader

    return pick


def compare_values(
    export: ExportFile,
    layout: Layout,
    merged: Checkpoint,
    base: Checkpoint | None = None,
    workers: int | None = None,
) -> ValueResult:
    """Compare every mapped GGUF tensor with its merged source (and the base, for provenance)."""
    started = time.perf_counter()
    files = _Files()
    merged_reader = _Reader(merged, files, "merged")
    base_for = _base_reader(merged, base, files)
    order = sorted(layout.sources.values(), key=lambda s: -export.tensors[s.gguf_name].nbytes)

    def run(source: Source) -> TensorReport:
        return _check_tensor(
            source, export.tensors[source.gguf_name], merged_reader, base_for(source), files
        )

    try:
        with single_threaded_torch(), ThreadPoolExecutor(
            max(1, workers or default_workers()), thread_name_prefix="merge-harness-export"
        ) as pool:
            reports = list(pool.map(run, order))
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    except OSError as exc:
        raise ExportError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        files.close()
    position = {name: i for i, name in enumerate(export.tensors)}
    reports.sort(key=lambda r: position[r.name])
    return ValueResult(reports, time.perf_counter() - started, files.bytes_read)
