r"""Canonical content digests: independent of shard layout, tensor order and file metadata.

Per tensor: ``sha256(b"merge-harness/tensor/v1\\0" + name + b"\\0" + dtype + b"\\0" + shape + b"\\0"
+ raw little-endian bytes)``, where shape is the decimal dimensions joined by ``,``. The checkpoint
digest is ``sha256`` over the lines ``"<name>\\t<tensor digest>\\n"`` sorted by name. Two
checkpoints with the same tensors have the same digest however they are sharded or whatever
``__metadata__`` their headers carry; one changed element, name, dtype or shape changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import CheckpointError
from harness.io.adapter import Adapter
from harness.io.checkpoint import Checkpoint
from harness.io.files import check_regular_file, resolves_inside
from harness.io.pickled import tensor_bytes
from harness.io.safetensors import TensorInfo, read_range

DOMAIN = b"merge-harness/tensor/v1\0"
#: Files are hashed in blocks of this many bytes so memory stays flat.
BLOCK = 16 * 1024 * 1024


def tensor_digest_start(name: str, dtype: str, shape: Iterable[int]) -> Any:
    """A sha256 object primed with the canonical prefix of one tensor, ready for its bytes."""
    digest = hashlib.sha256(DOMAIN)
    dims = ",".join(str(int(d)) for d in shape)
    # surrogatepass: a name that is not valid Unicode (from an opted-in pickle) still hashes
    digest.update(f"{name}\0{dtype}\0{dims}\0".encode("utf-8", "surrogatepass"))
    return digest


def tensor_digest(
    name: str, dtype: str, shape: Iterable[int], data: bytes | bytearray | memoryview
) -> str:
    """The canonical hex digest of one tensor from its raw bytes."""
    digest = tensor_digest_start(name, dtype, shape)
    digest.update(data)
    return str(digest.hexdigest())


def combine(digests: Mapping[str, str]) -> str:
    """The checkpoint digest from per-tensor digests (order of the mapping is irrelevant)."""
    outer = hashlib.sha256()
    for name in sorted(digests):
        outer.update(f"{name}\t{digests[name]}\n".encode("utf-8", "surrogatepass"))
    return outer.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's canonical digest, its per-tensor digests and its per-file sha256."""

    digest: str
    tensors: dict[str, str]
    files: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable view (sorted, stable)."""
        return {
            "digest": self.digest,
            "tensors": dict(sorted(self.tensors.items())),
            "files": dict(sorted(self.files.items())),
        }

    def changed_tensors(self, other: Manifest) -> list[str]:
        """Names whose digest differs from ``other`` or that exist in only one of the two."""
        names = set(self.tensors) | set(other.tensors)
        return sorted(n for n in names if self.tensors.get(n) != other.tensors.get(n))


def hash_tensor_stream(info: TensorInfo, data: bytes | bytearray | memoryview) -> str:
    """Digest of one tensor whose bytes are already in memory (no second read)."""
    return tensor_digest(info.name, info.dtype, info.shape, data)


def hash_checkpoint(checkpoint: Checkpoint, *, with_files: bool = True) -> Manifest:
    """Stream a checkpoint once and return its manifest.

    Each safetensors file is read sequentially in blocks: the tensor digests are fed from the
    same bytes as the file digest, so the data is read from disk exactly once.
    """
    tensors: dict[str, str] = {}
    files: dict[str, str] = {}
    if checkpoint.is_pickle:
        for info in checkpoint.in_file_order():
            tensors[info.name] = hash_tensor_stream(info, checkpoint.read_bytes(info.name))
        return Manifest(combine(tensors), tensors, files)
    for sfile in checkpoint.files:
        ordered = sorted(sfile.tensors.values(), key=lambda t: t.start)
        whole = hashlib.sha256()
        with sfile.path.open("rb", buffering=0) as handle:
            header = handle.read(8 + sfile.header_size)
            whole.update(header)
            position = len(header)
            for info in ordered:
                part = tensor_digest_start(info.name, info.dtype, info.shape)
                remaining = info.nbytes
                while remaining:
                    block = handle.read(min(BLOCK, remaining))
                    if not block:
                        raise CheckpointError(f"{sfile.path}: truncated inside {info.name!r}")
                    part.update(block)
                    whole.update(block)
                    remaining -= len(block)
                position += info.nbytes
                tensors[info.name] = part.hexdigest()
        files[sfile.path.name] = whole.hexdigest()
    return Manifest(combine(tensors), tensors, files)


def hash_file(path: Path) -> str:
    """Plain sha256 of a regular file, read in blocks (a pipe or device is refused)."""
    check_regular_file(path)
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def hash_folder(path: Path) -> str:
    """A digest over every regular file in a folder (relative name and sha256), for adapters.

    Used where a folder is not a model checkpoint (an adapter, a task folder): any byte change in
    any file changes it. Symlinked folders are not followed (no loops); a symlinked file must
    stay inside the folder, and anything but a regular file is refused.
    """
    files: list[tuple[str, Path]] = []
    for top, dirs, names in os.walk(path, followlinks=False):
        folder = Path(top)
        for name in dirs:
            if (folder / name).is_symlink():
                raise CheckpointError(f"{folder / name}: symlinked folder; refusing to follow it")
        files += [((folder / n).relative_to(path).as_posix(), folder / n) for n in names]
    outer = hashlib.sha256()
    for rel, file in sorted(files):
        if file.is_symlink() and not resolves_inside(path, file):
            raise CheckpointError(f"{file}: symlink resolves outside {path}; refusing to read it")
        outer.update(f"{rel}\t{hash_file(file)}\n".encode())
    return outer.hexdigest()


def dumps_manifest(manifest: Manifest) -> str:
    """The manifest as indented, sorted JSON (what ``merge-harness hash --json`` prints)."""
    return json.dumps(manifest.to_json(), indent=2, sort_keys=True)


#: adapter_config.json keys that say where or with what the adapter was saved, not what it is.
VOLATILE_ADAPTER_KEYS = frozenset({"base_model_name_or_path", "revision", "peft_version"})
ADAPTER_DOMAIN = b"merge-harness/adapter/v1\0"


def adapter_digest(adapter: Adapter) -> str:
    """A canonical digest of an adapter: its tensors and its config (machine keys removed).

    Independent of file layout and of where the base model lived when the adapter was saved;
    any changed weight, rank, alpha, target module or pattern changes it.
    """
    tensors: dict[str, str] = {}
    for key, info in adapter.tensors.items():
        if adapter.file is not None:
            data = read_range(info, bytearray(info.nbytes))
        else:
            data = tensor_bytes(adapter.tensor(key))
        tensors[key] = tensor_digest(key, info.dtype, info.shape, data)
    config = {k: v for k, v in adapter.config.items() if k not in VOLATILE_ADAPTER_KEYS}
    outer = hashlib.sha256(ADAPTER_DOMAIN)
    outer.update(combine(tensors).encode())
    outer.update(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode())
    return outer.hexdigest()
