"""The safetensors format, read by the harness itself: header validation and byte ranges.

Headers are parsed and validated here rather than by ``safetensors.safe_open`` so that a hostile
header (a declared length beyond the file, offsets that overlap or run past the end, an unknown
dtype) becomes a :class:`~harness.errors.CheckpointError` with a one-line cause before anything
is allocated, and so that the raw bytes of a tensor are read once and serve both the hash and the
comparison.

The parser accepts exactly the files the reference library accepts and loads (``safe_open``
then ``get_tensor`` for torch): its JSON is serde_json's, not Python's (no ``NaN``/``Infinity``,
no number that overflows a double, no lone surrogate, at most :data:`MAX_DEPTH` levels of
nesting, no field of a tensor given twice), dimensions and offsets are 64-bit, sizes are
computed with the reference's overflow checks, and a dimension must fit torch's 64-bit signed
sizes. Where the harness refuses more, it says why (:data:`STRICTER`).
"""

from __future__ import annotations

import json
import math
import re
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
#: Deepest nesting serde_json (the reference's parser) accepts: 127 levels of ``{`` and ``[``.
MAX_DEPTH = 127
#: Dimensions and offsets are ``usize`` (u64) in the reference; torch sizes are int64.
U64 = 2**64
TORCH_DIM = 2**63
#: What the harness refuses although the reference library would load it, and why.
STRICTER = {
    "duplicate tensor": "a tensor named twice in one header (readers disagree on which counts)",
    "sub-byte dtype": "F4 tensors (packed two to a byte) are not verifiable by the harness",
}
#: Dtypes the reference knows that torch cannot load (``get_tensor`` refuses them too).
_UNLOADABLE = frozenset({"F6_E2M3", "F6_E3M2"})
_SUB_BYTE = frozenset({"F4"})
_SURROGATE = re.compile("[\ud800-\udfff]")


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


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers which keys it was given more than once."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    out = _Object(pairs)  # the last value of a repeated key wins, as in serde_json
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = []
        for key, _ in pairs:
            if key in seen:
                repeated.append(key)
            seen.add(key)
        out.duplicates = tuple(repeated)
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text[:30]}")
    return value


def _int(text: str) -> int | float:
    value = int(text)
    if text.startswith("-0"):
        return -0.0  # serde_json reads -0 as a float: never a dimension or an offset
    try:
        float(value)  # serde_json reads integers beyond 64 bits as doubles: those may overflow
    except OverflowError:
        raise ValueError(f"number out of range: {text[:30]}...") from None
    return value


def _check_document(header: Any) -> None:
    """Depth and lone surrogates anywhere in the parsed header (iteratively: no recursion)."""
    stack = [(header, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise ValueError(f"lone surrogate in the string {value!r}")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                raise ValueError(f"lone surrogate in the key {key!r}")
            stack.append((item, depth + 1))


def parse_header_json(raw: bytes) -> dict[str, Any]:
    """A header's JSON as the reference reads it (serde_json); ValueError with the cause."""
    header = json.loads(
        raw.decode("utf-8"),
        object_pairs_hook=_object,
        parse_constant=_constant,
        parse_float=_float,
        parse_int=_int,
    )
    if not isinstance(header, dict):
        raise ValueError("not a JSON object")
    _check_document(header)
    return header


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
        header = parse_header_json(raw)
    except RecursionError:
        raise CheckpointError(
            f"{path}: malformed safetensors header: nested deeper than {MAX_DEPTH} levels"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed safetensors header: {one_line(exc)}") from None
    duplicates = getattr(header, "duplicates", ())
    if duplicates:
        what = "__metadata__ given twice" if "__metadata__" in duplicates else (
            f"duplicate key {duplicates[0]!r} ({STRICTER['duplicate tensor']})"
        )
        raise CheckpointError(f"{path}: malformed safetensors header: {what}")

    data_start = 8 + header_size
    data_size = size - data_start
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is None:  # the reference reads it as an Option
                continue
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


def _dimension(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is not an object")
    repeated = sorted(set(getattr(entry, "duplicates", ())) & {"dtype", "shape", "data_offsets"})
    if repeated:
        raise CheckpointError(f"{where}: field {repeated[0]} given twice")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype in _SUB_BYTE:
        raise CheckpointError(f"{where}: {STRICTER['sub-byte dtype']}")
    if dtype in _UNLOADABLE:
        raise CheckpointError(f"{where}: dtype {dtype} cannot be loaded into torch")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_dimension(d, U64) for d in shape):
        raise CheckpointError(
            f"{where}: shape must be a list of integers from 0 to 2**64-1"
        )
    if not all(d < TORCH_DIM for d in shape):
        raise CheckpointError(f"{where}: a dimension of 2**63 or more cannot be loaded into torch")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_dimension(o, U64) for o in offsets)
        or not offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
    # the element count as the reference computes it: left to right, refused on u64 overflow
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= U64:
            raise CheckpointError(f"{where}: shape {shape} overflows a 64-bit element count")
    expected = numel * ITEMSIZE[dtype]
    if expected >= U64:
        raise CheckpointError(f"{where}: shape {shape} overflows a 64-bit byte count")
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
