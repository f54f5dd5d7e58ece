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
from harness.export import encoding, matching
from harness.export.layout import Layout, Source
from harness.export.provenance import Retention
from harness.export.reader import ExportFile, ExportTensor
from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import TensorInfo
from harness.stream.pipeline import default_workers, single_threaded_torch, workspace

if TYPE_CHECKING:
    import torch

#: Elements per chunk: 512 KiB of float32. Each chunk costs about 25 torch calls and the
#: Python around them (on a 2.8 GHz Xeon 100-150 us whatever the chunk's size), so chunks
#: are large; a chunk's buffers (about 16 bytes per element) then outgrow a 1.25 MiB L2 cache,
#: but on that Xeon this size measured 15-20 % less CPU than half of it (with one worker
#: thread or two), and twice it no less.
CHUNK_ELEMENTS = 1 << 17
#: Chunks per tensor that feed the retention ratio (spread evenly over the tensor; all of
#: them in a tensor of fewer). The ratio is an estimate: a sample of about a million elements
#: per tensor pins it to a few parts in ten thousand, and spares reading the whole base.
PROVENANCE_CHUNKS = 8
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


class _Reader:
    """Row chunks of checkpoint tensors as torch tensors, read by range (pickles: whole)."""

    def __init__(self, checkpoint: Checkpoint, files: _Files, slot: str) -> None:
        self.checkpoint = checkpoint
        self.files = files
        self.slot = slot
        # name -> (file, first byte, row length, bytes per element, torch dtype): looked up once
        self._layout: dict[str, tuple[os.PathLike[str], int, int, int, torch.dtype]] = {}

    def rows(self, name: str, start: int, count: int) -> torch.Tensor:
        """Rows ``start .. start + count`` of tensor ``name`` as (count, row_length).

        A view of this thread's read buffer for the slot: valid until its next read.
        """
        import torch

        if self.checkpoint.is_pickle:
            length = _rows_of(self.checkpoint.tensors[name].shape)[1]
            whole = self.checkpoint.tensor(name).reshape(-1, length)
            return whole[start : start + count]
        found = self._layout.get(name)
        if found is None:
            from harness.dtypes import to_torch

            info: TensorInfo = self.checkpoint.tensors[name]
            found = (info.file, info.start, _rows_of(info.shape)[1],
                     info.nbytes // max(info.numel, 1), to_torch(info.dtype))
            self._layout[name] = found
        path, first, length, itemsize, dtype = found
        row = length * itemsize
        raw = self.files.read(path, first + start * row, count * row, self.slot)
        return torch.frombuffer(raw, dtype=dtype).reshape(count, length)


def _permute(chunk: torch.Tensor, head_rows: int) -> torch.Tensor:
    """llama.cpp's rotary row order within each head (``LlamaModel.permute``), on whole heads.

    (heads * head_rows, cols) -> a view (heads, head_rows / 2, 2, cols) whose row-major order is
    the converter's: in each head, rows ``[a0..a(h/2-1), b0..]`` become ``[a0, b0, a1, b1, ...]``.
    A bias (one row of heads * head_rows) is permuted the same way along its elements. Nothing
    is copied: the copy into float32 that follows reads the rows in this order.
    """
    if chunk.shape[0] == 1 and chunk.shape[1] % head_rows == 0 and head_rows > 1:
        return _permute(chunk.reshape(-1, 1), head_rows)
    heads = chunk.shape[0] // head_rows
    return chunk.reshape(heads, 2, head_rows // 2, chunk.shape[1]).swapaxes(1, 2)


def _source_row(source: Source, part_rows: int, row: int) -> tuple[str, int]:
    """The merged tensor and row a GGUF row was made from (for messages)."""
    part, row = divmod(row, part_rows) if len(source.parts) > 1 else (0, row)
    if source.head_rows:
        head, j = divmod(row, source.head_rows)
        row = head * source.head_rows + (j % 2) * (source.head_rows // 2) + j // 2
    return source.parts[min(part, len(source.parts) - 1)], row


@dataclass
class _Chunk:
    """One chunk: GGUF rows ``first_row ..`` and the expected values for them.

    ``expected`` is float32 (rows, row_length) in this thread's scratch: valid until the next
    chunk.
    """

    first_row: int
    expected: torch.Tensor
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
                prior = _transformed(base.rows(name, start, count), source, "base").numpy()
            number += 1
            yield _Chunk(index * part_rows + start, expected, prior)


def _transformed(chunk: torch.Tensor, source: Source, slot: str) -> torch.Tensor:
    """The converter's transforms of a chunk, as float32 (rows, row_length) in GGUF order.

    One pass: the copy into this thread's float32 scratch for ``slot`` converts (anything but
    float16 and float32 is float32 first, as in the converter), and reads the rows in the
    permuted order. The Gemma norm offset is added in the converter's dtype: float32, or
    float16 for a float16 tensor.
    """
    import torch

    if source.offset and chunk.dtype == torch.float16:
        chunk = chunk + source.offset
    found = workspace(chunk.numel(), torch.float32, f"export:{slot}")
    out = found.view(chunk.shape) if found is not None else torch.empty(chunk.shape)
    if source.head_rows:
        view = _permute(chunk, source.head_rows)
        out.view(view.shape).copy_(view)
    else:
        out.copy_(chunk)
    if source.offset and chunk.dtype != torch.float16:
        out.add_(source.offset)
    return out


def _round_to(values: np.ndarray, route: str | None) -> np.ndarray:
    """``values`` as llama-quantize would have read them from a GGUF of ``route`` precision."""
    if route is None:
        return values
    if route == "F16":
        return values.astype(np.float16).astype(np.float32)
    bf16 = gguf.GGMLQuantizationType.BF16
    return encoding.decode(encoding.encode(values.astype(np.float32), bf16), bf16)


def _rounded(values: torch.Tensor, route: str | None) -> torch.Tensor:
    """:func:`_round_to` in torch, for the quick comparison (this thread's scratch).

    Round to nearest even both ways; only NaN payloads may differ from ggml's rounding, and
    a block holding a NaN is always settled by ``gguf.quants`` from :func:`_round_to`.
    """
    import torch

    if route is None:
        return values
    narrow = torch.float16 if route == "F16" else torch.bfloat16
    count = values.numel()
    low = workspace(count, narrow, "export:route")
    wide = workspace(count, torch.float32, "export:route")
    if low is None or wide is None:
        return values.to(narrow).to(torch.float32)
    low.view(values.shape).copy_(values)
    return wide.view(values.shape).copy_(low.view(values.shape))


def _differs(
    values: torch.Tensor, stored: torch.Tensor, qtype: gguf.GGMLQuantizationType,
    route: str | None,
) -> np.ndarray | None:
    """Per block, whether ``stored`` differs from gguf.quants' encoding of ``values``.

    ``values`` rounded to ``route`` first; None when no block differs.
    """
    quick = qtype in matching.QUICK
    if quick and matching.mismatches(_rounded(values, route), stored, qtype) is None:
        return None
    # gguf.quants decides every difference that is reported.
    size = encoding.type_size(qtype)
    encoded = encoding.encode(_round_to(values.numpy(), route), qtype).reshape(-1, size)
    result: np.ndarray = (encoded != stored.numpy().reshape(-1, size)).any(axis=1)
    return result if result.any() else None


def _compare_exact(
    chunk: torch.Tensor,
    stored: torch.Tensor,
    qtype: gguf.GGMLQuantizationType,
    routes: list[str | None],
) -> np.ndarray | None:
    """Per block, whether it differs from the re-encoding (by the route that fits best).

    None when a route reproduces every block. ``routes`` is reordered in place so that the
    route that fitted is tried first next time.
    """
    best: np.ndarray | None = None
    for route in list(routes):
        differs = _differs(chunk, stored, qtype, route)
        if differs is None:
            routes.remove(route)
            routes.insert(0, route)
            return None
        if best is None or differs.sum() < best.sum():
            best = differs
            routes.remove(route)
            routes.insert(0, route)
    assert best is not None
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
    import torch

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
        stored = torch.frombuffer(raw, dtype=torch.uint8).reshape(count, target.row_bytes)
        differs: np.ndarray | None = None
        if exact:
            differs = _compare_exact(chunk.expected, stored, qtype, routes)
            if differs is not None and qtype in encoding.SEARCHED:
                # llama-quantize quantizes these with an importance matrix when given one: not
                # reproducible then, only bounded.
                exact = False
        if not exact:
            expected = chunk.expected.numpy()
            decoded = encoding.decode(stored.numpy(), qtype).reshape(-1, block)
            error = np.abs(decoded - expected.reshape(-1, block)).max(axis=1)
            bound = encoding.error_bound(expected, qtype)
            differs = error > bound
            worst = int(np.argmax(error - bound))
            if error[worst] - bound[worst] > report.worst_error - report.worst_bound:
                report.worst_error, report.worst_bound = float(error[worst]), float(bound[worst])
        bad = np.flatnonzero(differs) if differs is not None else np.empty(0, dtype=np.intp)
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
            values = chunk.expected.numpy()
            delta = values - chunk.base
            if delta.any():
                decoded_all = encoding.decode(stored.numpy(), qtype).reshape(delta.shape)
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
