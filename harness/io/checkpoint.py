"""Read model checkpoints lazily and safely: header-only listings, one tensor at a time.

A checkpoint is a folder holding either one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json`` (or, only when the user opts in, a pickle state dict). Files
are opened read-only; nothing is unpickled unless the caller opts in, and then only with
``weights_only=True``. Consumers read tensors through :meth:`Checkpoint.read_into` whatever
the format, so no caller branches on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import CheckpointError
from harness.io.files import exists, read_json
from harness.io.pickled import (
    OPT_IN,
    PICKLE_NAMES,
    load_pickle_state,
    pickle_infos,
    tensor_bytes,
)
from harness.io.safetensors import (
    SafetensorsFile,
    TensorInfo,
    _is_int,
    read_header,
    read_range,
    tensor_from_bytes,
)

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Buffers(Protocol):
    """Where a reader gets its byte buffers from (``stream.pipeline.BufferPool``)."""

    def get(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes``."""
        ...


def _bad_shard_name(shard: str) -> bool:
    """A weight_map value that is not a plain file name of this folder (``../x``, ``/x``, NUL)."""
    return (
        os.path.isabs(shard)
        or any(c in shard for c in "/\\\0")
        or shard in ("", ".", "..")
        or not shard.endswith(".safetensors")
    )


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
        if exists(index_path):
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
        if not exists(path):
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
            if not exists(shard_path):
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
                f" refusing to unpickle. Save with safetensors, or opt in ({OPT_IN})"
            )
        state: dict[str, torch.Tensor] = {}
        tensors: dict[str, TensorInfo] = {}
        for path in pickles:
            loaded = load_pickle_state(path)
            state.update(loaded)
            tensors.update(pickle_infos(path, loaded))
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
        return sorted(self.tensors.values(), key=lambda t: (str(t.file), t.start, t.name))

    def read_into(self, name: str, buffers: Buffers | None = None) -> bytearray:
        """The raw little-endian bytes of one tensor, in a buffer from ``buffers`` (or a new one).

        The one reading entry point: safetensors ranges and opted-in pickles alike.
        """
        info = self.tensors[name]
        buffer = bytearray(info.nbytes) if buffers is None else buffers.get(info.nbytes)
        if self._pickled is not None:
            return tensor_bytes(self._pickled[name], buffer)
        return read_range(info, buffer)

    def read_bytes(self, name: str) -> bytearray:
        """Read the raw little-endian bytes of one tensor (a fresh, writable buffer)."""
        return self.read_into(name)

    def tensor(self, name: str, buffer: bytearray | None = None) -> torch.Tensor:
        """One tensor as a CPU torch tensor, from ``buffer`` when the bytes are already read."""
        data = self.read_bytes(name) if buffer is None else buffer
        return tensor_from_bytes(self.tensors[name], data)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, bytearray]]:
        """Yield (info, raw bytes) in file order, holding one tensor at a time."""
        for info in self.in_file_order():
            yield info, self.read_bytes(info.name)
