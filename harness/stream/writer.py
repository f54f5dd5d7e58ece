"""Write safetensors shards from a stream of tensor bytes, on a thread of its own.

The output plan (which tensors go into which shard, in which order) is fixed first, so each
shard's header is known before its data; a writer thread then appends each tensor's bytes as
they arrive, returns the pooled buffers and releases their bytes from the pass's budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from harness.errors import HarnessError, MergeError
from harness.io.checkpoint import SINGLE_FILE, Checkpoint
from harness.io.safetensors import TensorInfo
from harness.io.staging import partial
from harness.stream.pipeline import BufferPool, ByteBudget

if TYPE_CHECKING:
    import torch

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}



def parse_size(value: int | str) -> int:
    """Bytes from ``1000000``, ``"500MB"`` (10^6) or ``"2GiB"`` (2^30), as transformers reads."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(2).upper() not in _UNITS:
            raise MergeError(
                f"max shard size {value!r}: expected bytes or a size like 5GB, 500MiB"
            )
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise MergeError(f"max shard size must be positive, got {value!r}")
    return size


@dataclass
class Entry:
    """One output tensor: its name and header, and the base tensor its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: TensorInfo


@dataclass
class Shard:
    """One output file and the tensors it holds, in write order."""

    name: str
    entries: list[Entry] = field(default_factory=list)

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


def plan_shards(
    checkpoint: Checkpoint, extra: dict[str, Entry], max_shard_size: int | None
) -> list[Shard]:
    """The output files: the base's own plan, or a greedy re-plan to ``max_shard_size``.

    ``extra`` maps a base tensor name to an added tensor written right after it (an untied head).
    """
    ordered: list[tuple[str, Entry]] = []
    for info in checkpoint.in_file_order():
        entries = [Entry(info.name, info.dtype, info.shape, info.nbytes, info)]
        if info.name in extra:
            entries.append(extra[info.name])
        ordered += [(info.file.name, e) for e in entries]
    if max_shard_size is None:
        shards: dict[str, Shard] = {}
        for file_name, entry in ordered:
            shards.setdefault(file_name, Shard(file_name)).entries.append(entry)
        planned = list(shards.values())
        if len(planned) == 1:
            planned[0].name = SINGLE_FILE
        return planned
    planned = [Shard("")]
    for _, entry in ordered:
        current = planned[-1]
        if current.entries and current.nbytes + entry.nbytes > max_shard_size:
            current = Shard("")
            planned.append(current)
        current.entries.append(entry)
    total = len(planned)
    for number, shard in enumerate(planned, 1):
        shard.name = SINGLE_FILE if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"
    return planned


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (a view when it is contiguous)."""
    import torch

    flat = tensor.contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


class Writer:
    """Appends tensor bytes to the output shards on a thread of its own."""

    def __init__(
        self, folder: Path, shards: list[Shard], budget: ByteBudget, pool: BufferPool
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
                # named *.partial until the merge is published: debris never loads as a model
                handle = partial(self.folder, shard.name).open("wb")
                handle.write(shard.header())
                for entry in shard.entries:
                    data = self.slots.get()
                    if data is None:
                        return
                    if len(data) != entry.nbytes:
                        raise HarnessError(
                            f"internal error: {entry.name} produced {len(data)} bytes, expected"
                            f" {entry.nbytes}"
                        )
                    handle.write(data)
                    if isinstance(data, bytearray):
                        self.pool.put(data)
                    del data
                    self.budget.release(entry.nbytes)
                # a full disk or a quota fails here, with its cause, not silently after rename
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                handle = None
        except BaseException as exc:  # reported by put()/finish() on the main thread
            self.error = exc
            while self.slots.get() is not None:
                pass
        finally:
            if handle is not None:
                # after a failed write, closing flushes the rest and fails again: already known
                with contextlib.suppress(OSError):
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
