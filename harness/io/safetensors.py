"""The safetensors format, read by the harness itself: header validation and byte ranges.

Headers are parsed and validated here rather than by ``safetensors.safe_open`` so that a hostile
header (a declared length beyond the file, offsets that overlap or run past the end, an unknown
dtype) becomes a :class:`~harness.errors.CheckpointError` with a one-line cause before anything
is allocated, and so that the raw bytes of a tensor are read once and serve both the hash and the
comparison.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.dtypes import ITEMSIZE, to_torch
from harness.errors import CheckpointError, one_line
from harness.io.files import check_regular_file

if TYPE_CHECKING:
    import torch

#: The safetensors library refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and absolute byte range, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the raw data in bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsFile:
    """A validated safetensors header: its tensors (absolute offsets) and metadata."""

    path: Path
    size: int
    header_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> SafetensorsFile:
    """Parse and validate the header of one safetensors file without reading tensor data.

    Raises :class:`CheckpointError` naming the file for any inconsistency: a file shorter than
    its declared header, an absurd header length, malformed JSON, an unknown dtype, a shape whose
    size disagrees with its byte range, overlapping ranges, holes, or data past the end.
    """
    size = check_regular_file(path)
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_size,) = struct.unpack("<Q", prefix)
            # Both limits are checked before the header is read: a hostile length allocates
            # nothing.
            if header_size > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {header_size} exceeds the {MAX_HEADER_BYTES}"
                    " byte limit (not a safetensors file, or hostile)"
                )
            if 8 + header_size > size:
                raise CheckpointError(
                    f"{path}: truncated: header declares {header_size} bytes but the file"
                    f" has {size} bytes"
                )
            raw = handle.read(header_size)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) != header_size:
        raise CheckpointError(f"{path}: truncated while reading the header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: malformed safetensors header: {one_line(exc)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header: not a JSON object")

    data_start = 8 + header_size
    data_size = size - data_start
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start)

    ranges = sorted((t.start - data_start, t.end - data_start, t.name) for t in tensors.values())
    cursor = 0
    for begin, end, name in ranges:
        if begin < cursor:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps the previous tensor")
        if begin > cursor:
            raise CheckpointError(f"{path}: {begin - cursor} unaccounted bytes before {name!r}")
        cursor = end
    if cursor > data_size:
        last = ranges[-1][2]
        raise CheckpointError(
            f"{path}: truncated: tensor {last!r} ends at data byte {cursor} but the file"
            f" holds {data_size} data bytes"
        )
    if cursor < data_size:
        raise CheckpointError(
            f"{path}: {data_size - cursor} trailing bytes after the last tensor"
        )
    return SafetensorsFile(path, size, header_size, metadata, tensors)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{where}: byte range holds {offsets[1] - offsets[0]} bytes but {dtype}{shape}"
            f" needs {expected}"
        )
    return TensorInfo(
        name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1]
    )


def tensor_from_bytes(info: TensorInfo, buffer: bytearray) -> torch.Tensor:
    """View raw safetensors bytes as a torch tensor of the recorded dtype and shape."""
    import torch

    try:
        dtype = to_torch(info.dtype)
    except KeyError as exc:
        raise CheckpointError(f"{info.file}: tensor {info.name!r}: {exc.args[0]}") from None
    if len(buffer) != info.nbytes:
        raise CheckpointError(
            f"{info.file}: tensor {info.name!r}: {len(buffer)} bytes given, {info.nbytes} needed"
        )
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    # (nbytes,) uint8 -> (numel,) dtype -> shape; shares memory with the buffer, no copy.
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


def read_range(info: TensorInfo, buffer: bytearray) -> bytearray:
    """Read one safetensors tensor's bytes into ``buffer`` (at least ``info.nbytes`` long)."""
    view = memoryview(buffer)
    got = 0
    try:
        with info.file.open("rb", buffering=0) as handle:
            handle.seek(info.start)
            while got < info.nbytes:
                n = handle.readinto(view[got : info.nbytes])
                if not n:
                    break
                got += n
    except OSError as exc:
        raise CheckpointError(
            f"{info.file}: cannot read {info.name!r}: {exc.strerror or exc}"
        ) from None
    if got != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading {info.name!r}")
    return buffer
