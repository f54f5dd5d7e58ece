"""Read model checkpoints lazily and safely: header-only listings, one tensor at a time.

A checkpoint is a folder holding either one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json``. Headers are parsed and validated here rather than by
``safetensors.safe_open`` so that a hostile header (a declared length beyond the file, offsets
that overlap or run past the end, an unknown dtype) becomes a :class:`CheckpointError` with a
one-line cause before anything is allocated, and so that the raw bytes of a tensor are read once
and serve both the hash and the comparison. Files are opened read-only; nothing is unpickled
unless the caller opts in, and then only with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.dtypes import ITEMSIZE, to_torch
from harness.errors import CheckpointError

if TYPE_CHECKING:
    import torch

#: The safetensors library refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
#: JSON side files (config, index) larger than this are refused rather than parsed.
MAX_JSON_BYTES = 64 * 1024 * 1024
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.pt", "model.pt", "model.pth")


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
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path.name}: header length {header_size} exceeds the {MAX_HEADER_BYTES}"
                    " byte limit (not a safetensors file, or hostile)"
                )
            if 8 + header_size > size:
                raise CheckpointError(
                    f"{path.name}: truncated: header declares {header_size} bytes but the file"
                    f" has {size} bytes"
                )
            raw = handle.read(header_size)
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path.name}: malformed safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: malformed safetensors header: not a JSON object")

    data_start = 8 + header_size
    data_size = size - data_start
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise CheckpointError(f"{path.name}: __metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start)

    ranges = sorted((t.start - data_start, t.end - data_start, t.name) for t in tensors.values())
    cursor = 0
    for begin, end, name in ranges:
        if begin < cursor:
            raise CheckpointError(f"{path.name}: tensor {name!r} overlaps the previous tensor")
        if begin > cursor:
            raise CheckpointError(f"{path.name}: {begin - cursor} unaccounted bytes before {name!r}")
        cursor = end
    if cursor > data_size:
        last = ranges[-1][2]
        raise CheckpointError(
            f"{path.name}: truncated: tensor {last!r} ends at data byte {cursor} but the file"
            f" holds {data_size} data bytes"
        )
    if cursor < data_size:
        raise CheckpointError(
            f"{path.name}: {data_size - cursor} trailing bytes after the last tensor"
        )
    return SafetensorsFile(path, size, header_size, metadata, tensors)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path.name}: tensor {name!r}"
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


def read_json(path: Path) -> Any:
    """Load a small JSON side file, turning every failure into a one-line CheckpointError."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path.name}: {size} bytes is too large for a JSON side file")
        return json.loads(path.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path.name}: malformed JSON: {exc}") from None


def _inside(folder: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


@dataclass
class Checkpoint:
    """A validated checkpoint folder with lazy, read-only, per-tensor access."""

    root: Path
    files: list[SafetensorsFile]
    tensors: dict[str, TensorInfo]
    index: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
        """Open and validate a checkpoint folder; raise :class:`CheckpointError` if invalid."""
        root = Path(path)
        if not root.exists():
            raise CheckpointError(f"{root}: no such checkpoint folder")
        if not root.is_dir():
            raise CheckpointError(f"{root}: expected a checkpoint folder, found a file")
        config = cls._read_config(root)
        index_path = root / INDEX_FILE
        present = sorted(p for p in root.glob("*.safetensors") if p.is_file() or p.is_symlink())
        if index_path.exists():
            files, index = cls._open_sharded(root, index_path, present)
        elif present:
            if len(present) > 1 or present[0].name != SINGLE_FILE:
                names = ", ".join(p.name for p in present)
                raise CheckpointError(
                    f"{root}: safetensors files ({names}) but no {INDEX_FILE}"
                    if len(present) > 1
                    else f"{root}: expected {SINGLE_FILE} or an index, found {names}"
                )
            cls._check_inside(root, present[0])
            files, index = [read_header(present[0])], None
        else:
            return cls._open_pickle(root, config, allow_pickle)
        tensors: dict[str, TensorInfo] = {}
        for sfile in files:
            for name, info in sfile.tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"{root}: tensor {name!r} is stored in both {tensors[name].file.name}"
                        f" and {sfile.path.name}"
                    )
                tensors[name] = info
        if index is not None:
            cls._check_index(root, index, tensors)
        return cls(root, files, tensors, index, config)

    @staticmethod
    def _read_config(root: Path) -> dict[str, Any] | None:
        path = root / "config.json"
        if not path.exists():
            return None
        config = read_json(path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: config.json is not a JSON object")
        return config

    @staticmethod
    def _check_inside(root: Path, path: Path) -> None:
        if not _inside(root, path):
            raise CheckpointError(f"{root}: {path.name} resolves outside the checkpoint folder")

    @classmethod
    def _open_sharded(
        cls, root: Path, index_path: Path, present: list[Path]
    ) -> tuple[list[SafetensorsFile], dict[str, Any]]:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{INDEX_FILE}: missing or malformed weight_map")
        shard_names = sorted(set(weight_map.values()))
        files: list[SafetensorsFile] = []
        for shard in shard_names:
            if os.path.isabs(shard) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise CheckpointError(
                    f"{INDEX_FILE}: shard {shard!r} is not a file name inside the folder"
                )
            shard_path = root / shard
            if not shard_path.exists():
                raise CheckpointError(f"{INDEX_FILE}: lists shard {shard} which does not exist")
            cls._check_inside(root, shard_path)
            files.append(read_header(shard_path))
        stale = sorted({p.name for p in present} - set(shard_names))
        if stale:
            raise CheckpointError(
                f"{INDEX_FILE}: shard file(s) {', '.join(stale)} present but not in the index"
                " (stale shards from an earlier save?)"
            )
        return files, index

    @staticmethod
    def _check_index(root: Path, index: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
        weight_map: dict[str, str] = index["weight_map"]
        for name, shard in sorted(weight_map.items()):
            info = tensors.get(name)
            if info is None:
                raise CheckpointError(f"{INDEX_FILE}: tensor {name!r} is not in shard {shard}")
            if info.file.name != shard:
                raise CheckpointError(
                    f"{INDEX_FILE}: tensor {name!r} is mapped to {shard} but stored in"
                    f" {info.file.name}"
                )
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise CheckpointError(
                f"{INDEX_FILE}: {len(unlisted)} tensor(s) stored but not in the index,"
                f" first {unlisted[0]!r}"
            )
        metadata = index.get("metadata")
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        if total is not None:
            data = sum(t.nbytes for t in tensors.values())
            if not _is_int(total) or total != data:
                raise CheckpointError(
                    f"{INDEX_FILE}: total_size {total} but the shards hold {data} tensor bytes"
                )

    @classmethod
    def _open_pickle(
        cls, root: Path, config: dict[str, Any] | None, allow_pickle: bool
    ) -> Checkpoint:
        pickles = [root / n for n in PICKLE_NAMES if (root / n).is_file()]
        pickles += sorted(root.glob("pytorch_model-*.bin"))
        if not pickles:
            raise CheckpointError(f"{root}: no model.safetensors, index or shards in this folder")
        if not allow_pickle:
            raise CheckpointError(
                f"{root}: only pickle checkpoint(s) ({', '.join(p.name for p in pickles)});"
                " refusing to unpickle. Save with safetensors, or pass --merge-allow-pickle"
                " (loads with weights_only=True)"
            )
        import torch

        state: dict[str, torch.Tensor] = {}
        for path in pickles:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # weights_only raises many types for hostile pickles
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{path.name}: refused by weights_only loading: {first}") from None
            if not isinstance(loaded, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
            ):
                raise CheckpointError(f"{path.name}: not a flat state dict of tensors")
            state.update(loaded)
        from harness.dtypes import from_torch

        tensors = {
            name: TensorInfo(
                name, from_torch(t.dtype), tuple(t.shape), root, 0, t.numel() * t.element_size()
            )
            for name, t in state.items()
        }
        return cls(root, [], tensors, None, config, state)

    # ---- access -------------------------------------------------------------------------

    @property
    def is_pickle(self) -> bool:
        """Whether the tensors came from an opted-in pickle checkpoint."""
        return self._pickled is not None

    @property
    def file_bytes(self) -> int:
        """Total size of the weight files on disk (headers included)."""
        return sum(f.size for f in self.files)

    @property
    def data_bytes(self) -> int:
        """Total size of the tensor data (headers excluded)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def parameter_count(self) -> int:
        """Total number of elements over all tensors."""
        return sum(t.numel for t in self.tensors.values())

    def in_file_order(self) -> list[TensorInfo]:
        """Tensors sorted by file then offset: sequential reads, the order the disk likes."""
        return sorted(self.tensors.values(), key=lambda t: (str(t.file), t.start))

    def read_bytes(self, name: str) -> bytearray:
        """Read the raw little-endian bytes of one tensor (a fresh, writable buffer)."""
        info = self.tensors[name]
        if self._pickled is not None:
            import torch

            tensor = self._pickled[name].contiguous()
            return bytearray(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        buffer = bytearray(info.nbytes)
        try:
            with info.file.open("rb", buffering=0) as handle:
                handle.seek(info.start)
                view = memoryview(buffer)
                got = 0
                while got < info.nbytes:
                    n = handle.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as exc:
            raise CheckpointError(f"{info.file.name}: cannot read {name!r}: {exc}") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file.name}: truncated while reading {name!r}")
        return buffer

    def tensor(self, name: str, buffer: bytearray | None = None) -> torch.Tensor:
        """One tensor as a CPU torch tensor, from ``buffer`` when the bytes are already read."""
        return tensor_from_bytes(self.tensors[name], self.read_bytes(name) if buffer is None else buffer)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, bytearray]]:
        """Yield (info, raw bytes) in file order, holding one tensor at a time."""
        for info in self.in_file_order():
            yield info, self.read_bytes(info.name)


def tensor_from_bytes(info: TensorInfo, buffer: bytearray) -> torch.Tensor:
    """View raw safetensors bytes as a torch tensor of the recorded dtype and shape."""
    import torch

    dtype = to_torch(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    # (nbytes,) uint8 -> (numel,) dtype -> shape; shares memory with the buffer, no copy.
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)
