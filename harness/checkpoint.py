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
import re
import stat
import struct
import zipfile
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


def _one_line(error: BaseException) -> str:
    """The first line of an exception's text, without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _allowed_area(folder: Path) -> list[Path]:
    """Where files of ``folder`` may live once symlinks are resolved.

    The folder itself and, for a Hugging Face cache snapshot (``.../snapshots/<rev>/``, whose
    files are symlinks into the repository's ``blobs/``), that sibling ``blobs`` folder.
    """
    home = folder.resolve()
    areas = [home]
    if home.parent.name == "snapshots":
        areas.append(home.parent.parent / "blobs")
    return areas


def resolves_inside(folder: Path, candidate: Path) -> bool:
    """Whether ``candidate`` resolves inside ``folder`` (or its HF cache blobs)."""
    target = candidate.resolve()
    for area in _allowed_area(folder):
        try:
            target.relative_to(area)
        except ValueError:
            continue
        return True
    return False


def check_regular_file(path: Path) -> int:
    """Refuse anything but a regular file inside its own folder; return its size in bytes.

    A named pipe or a device would block or never end, and a symlink leaving the folder would
    read files the checkpoint has no business naming (``model.safetensors -> ~/.ssh/id_rsa``).
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte in a name
        raise CheckpointError(f"{path!r}: invalid file name: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe, socket or device"
        raise CheckpointError(f"{path}: not a regular file ({kind})")
    if path.is_symlink() and not resolves_inside(path.parent, path):
        raise CheckpointError(
            f"{path}: symlink resolves outside its folder (to {path.resolve()}); refusing to"
            " read it"
        )
    return info.st_size


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
        raise CheckpointError(f"{path}: malformed safetensors header: {_one_line(exc)}") from None
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


def read_json(path: Path) -> Any:
    """Load a small JSON side file, turning every failure into a one-line CheckpointError."""
    size = check_regular_file(path)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too large for a JSON side file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: malformed JSON: {_one_line(exc)}") from None


def _bad_shard_name(shard: str) -> bool:
    """A weight_map value that is not a plain file name of this folder (``../x``, ``/x``, NUL)."""
    return (
        os.path.isabs(shard)
        or any(c in shard for c in "/\\\0")
        or shard in ("", ".", "..")
        or not shard.endswith(".safetensors")
    )


def _pickle_cause(error: BaseException) -> str:
    """The informative line of a ``torch.load(weights_only=True)`` refusal.

    torch's message opens with generic advice (including "re-run with weights_only=False", which
    is exactly what a user must not do with an untrusted file); the cause follows
    ``WeightsUnpickler error:``.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        if rest:
            return rest[0].split(". Please use", 1)[0].rstrip(".")
    return _one_line(error)


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickle state dict with ``torch.load(weights_only=True)`` only; never execute it.

    Only called after the user opted in (``--merge-allow-pickle``). A pickle that names any
    global outside torch's tensor allow-list is refused by torch's restricted unpickler before
    anything is called; the refusal becomes a one-line :class:`CheckpointError`.
    """
    import torch

    check_regular_file(path)
    try:
        # mmap keeps memory flat for zip-format files; the legacy format cannot be mapped.
        loaded = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as exc:  # weights_only raises many types for hostile or broken pickles
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): {_pickle_cause(exc)}"
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    return loaded


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
        try:
            return cls._open(root, allow_pickle)
        except OSError as exc:  # a folder that cannot be listed, a file that vanished
            raise CheckpointError(f"{root}: cannot read: {exc.strerror or exc}") from None

    @classmethod
    def _open(cls, root: Path, allow_pickle: bool) -> Checkpoint:
        if not root.exists():
            raise CheckpointError(f"{root}: no such checkpoint folder")
        if not root.is_dir():
            raise CheckpointError(f"{root}: expected a checkpoint folder, found a file")
        config = cls._read_config(root)
        index_path = root / INDEX_FILE
        present = sorted(root.glob("*.safetensors"))
        if index_path.exists() or index_path.is_symlink():
            files, index = cls._open_sharded(root, index_path, present)
        elif present:
            if len(present) > 1 or present[0].name != SINGLE_FILE:
                names = ", ".join(p.name for p in present)
                raise CheckpointError(
                    f"{root}: safetensors files ({names}) but no {INDEX_FILE}"
                    if len(present) > 1
                    else f"{root}: expected {SINGLE_FILE} or an index, found {names}"
                )
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
            cls._check_index(index_path, index, tensors)
        return cls(root, files, tensors, index, config)

    @staticmethod
    def _read_config(root: Path) -> dict[str, Any] | None:
        path = root / "config.json"
        if not (path.exists() or path.is_symlink()):
            return None
        config = read_json(path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return config

    @classmethod
    def _open_sharded(
        cls, root: Path, index_path: Path, present: list[Path]
    ) -> tuple[list[SafetensorsFile], dict[str, Any]]:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index_path}: missing or malformed weight_map")
        assert isinstance(index, dict)
        shard_names = sorted(set(weight_map.values()))
        files: list[SafetensorsFile] = []
        for shard in shard_names:
            if _bad_shard_name(shard):
                raise CheckpointError(
                    f"{index_path}: shard {shard!r} is not a .safetensors file name inside the"
                    " folder"
                )
            shard_path = root / shard
            if not (shard_path.exists() or shard_path.is_symlink()):
                raise CheckpointError(f"{index_path}: lists shard {shard} which does not exist")
            files.append(read_header(shard_path))
        stale = sorted({p.name for p in present} - set(shard_names))
        if stale:
            raise CheckpointError(
                f"{index_path}: shard file(s) {', '.join(stale)} present but not in the index"
                " (stale shards from an earlier save?)"
            )
        return files, index

    @staticmethod
    def _check_index(
        index_path: Path, index: dict[str, Any], tensors: dict[str, TensorInfo]
    ) -> None:
        weight_map: dict[str, str] = index["weight_map"]
        for name, shard in sorted(weight_map.items()):
            info = tensors.get(name)
            if info is None:
                raise CheckpointError(f"{index_path}: tensor {name!r} is not in shard {shard}")
            if info.file.name != shard:
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} is mapped to {shard} but stored in"
                    f" {info.file.name}"
                )
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise CheckpointError(
                f"{index_path}: {len(unlisted)} tensor(s) stored but not in the index,"
                f" first {unlisted[0]!r}"
            )
        metadata = index.get("metadata")
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        if total is not None:
            data = sum(t.nbytes for t in tensors.values())
            if not _is_int(total) or total != data:
                raise CheckpointError(
                    f"{index_path}: total_size {total!r} but the shards hold {data} tensor bytes"
                )

    @classmethod
    def _open_pickle(
        cls, root: Path, config: dict[str, Any] | None, allow_pickle: bool
    ) -> Checkpoint:
        pickles = [root / n for n in PICKLE_NAMES if (root / n).exists()]
        pickles += sorted(root.glob("pytorch_model-*.bin"))
        if not pickles:
            raise CheckpointError(f"{root}: no model.safetensors, index or shards in this folder")
        if not allow_pickle:
            raise CheckpointError(
                f"{root}: only pickle checkpoint(s) ({', '.join(p.name for p in pickles)});"
                " refusing to unpickle. Save with safetensors, or pass --merge-allow-pickle"
                " (loads with weights_only=True)"
            )
        from harness.dtypes import from_torch

        state: dict[str, torch.Tensor] = {}
        for path in pickles:
            state.update(load_pickle_state(path))
        tensors: dict[str, TensorInfo] = {}
        for name, t in state.items():
            try:
                code = from_torch(t.dtype)
            except KeyError:
                raise CheckpointError(
                    f"{root}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold"
                ) from None
            tensors[name] = TensorInfo(
                name, code, tuple(t.shape), root, 0, t.numel() * t.element_size()
            )
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
        return read_range(info, bytearray(info.nbytes))

    def tensor(self, name: str, buffer: bytearray | None = None) -> torch.Tensor:
        """One tensor as a CPU torch tensor, from ``buffer`` when the bytes are already read."""
        data = self.read_bytes(name) if buffer is None else buffer
        return tensor_from_bytes(self.tensors[name], data)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, bytearray]]:
        """Yield (info, raw bytes) in file order, holding one tensor at a time."""
        for info in self.in_file_order():
            yield info, self.read_bytes(info.name)


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
