"""One streamed pass over a checkpoint: canonical digests and non-finite counts together.

Each tensor's bytes are read once, in file order, by a reader thread that stays one tensor ahead
(file reads and sha256 release the GIL, and so does torch), then hashed and checked for NaN/Inf
while the next one is read. At most two tensors are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from harness.dtypes import FLOATING
from harness.io.checkpoint import Checkpoint
from harness.io.safetensors import TensorInfo, tensor_from_bytes
from harness.stream.hashing import Manifest, combine, hash_tensor_stream
from harness.stream.pipeline import ByteBudget, pipeline


@dataclass(frozen=True)
class NonFinite:
    """Where a tensor holds NaN or Inf: counts and the first bad flat index and value."""

    nan: int
    inf: int
    first_index: int
    first_value: float


@dataclass
class ScanResult:
    """Per-tensor digests, the canonical digest, and the tensors that are not finite."""

    manifest: Manifest
    nonfinite: dict[str, NonFinite] = field(default_factory=dict)


def find_nonfinite(info: TensorInfo, data: bytearray) -> NonFinite | None:
    """NaN/Inf statistics of one floating tensor, or None when every element is finite."""
    if info.dtype not in FLOATING or info.numel == 0:
        return None
    import torch

    tensor = tensor_from_bytes(info, data).reshape(-1)
    if info.dtype.startswith("F8"):
        tensor = tensor.float()
    # One vectorised pass first: min and max are NaN when any element is NaN and infinite when
    # any is Inf. ``isfinite`` on bf16/fp16 is not vectorised on CPU (about 20x slower), so the
    # mask below is built only for the rare tensor that is not finite.
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return None
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return None
    first = int(bad.nonzero()[0, 0])
    nan = int(torch.isnan(tensor).sum())
    return NonFinite(nan, int(bad.sum()) - nan, first, float(tensor[first]))


#: A tensor's canonical digest and its NaN/Inf statistics (None when finite).
Scanned = tuple[str, NonFinite | None]


def scan_tensor(info: TensorInfo, data: bytearray) -> Scanned:
    """The canonical digest and NaN/Inf statistics of one tensor from its bytes in memory."""
    return hash_tensor_stream(info, data), find_nonfinite(info, data)


def scan_checkpoint(
    checkpoint: Checkpoint,
    visit: Callable[[TensorInfo, bytearray], None] | None = None,
    names: Collection[str] | None = None,
) -> ScanResult:
    """Stream a checkpoint once: digest and finite-check every tensor, then call ``visit``.

    A reader thread stays up to two tensors ahead while a worker scans (``parallel.pipeline``);
    ``visit`` runs here, in file order. With ``names``, only those tensors are read (one part
    of a divided pass; the canonical digest then covers them alone).
    """
    order = [i for i in checkpoint.in_file_order() if names is None or i.name in names]
    budget = ByteBudget(2 * max((info.nbytes for info in order), default=0))

    def read(info: TensorInfo) -> tuple[TensorInfo, bytearray]:
        return info, checkpoint.read_bytes(info.name)

    def scan(item: tuple[TensorInfo, bytearray]) -> tuple[TensorInfo, bytearray, Scanned]:
        return (*item, scan_tensor(*item))

    digests: dict[str, str] = {}
    nonfinite: dict[str, NonFinite] = {}
    for info, data, (digest, found) in pipeline(
        order, read, scan, lambda info: info.nbytes, budget, 1
    ):
        try:
            digests[info.name] = digest
            if found is not None:
                nonfinite[info.name] = found
            if visit is not None:
                visit(info, data)
        finally:
            budget.release(info.nbytes)
    return ScanResult(Manifest(combine(digests), digests, {}), nonfinite)
