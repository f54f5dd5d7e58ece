"""Opt-in pickle state dicts, behind the same per-tensor reader as safetensors files.

Only used after the user opted in (``--merge-allow-pickle``), and then only through
``torch.load(weights_only=True)``: a pickle that names any global outside torch's tensor
allow-list is refused by torch's restricted unpickler before anything is called.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from harness.dtypes import from_torch
from harness.errors import CheckpointError, one_line
from harness.io.files import check_regular_file
from harness.io.safetensors import TensorInfo

if TYPE_CHECKING:
    import torch

PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.pt", "model.pt", "model.pth")
#: How a user opts in, in each of the harness's entry points.
OPT_IN = (
    "--merge-allow-pickle with pytest, --allow-pickle with merge-harness hash and merge;"
    " loads with weights_only=True"
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
            return one_line(rest[0].split(". Please use", 1)[0].rstrip("."))
    return one_line(error)


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickle state dict with ``torch.load(weights_only=True)`` only; never execute it.

    The refusal of a hostile or broken pickle becomes a one-line :class:`CheckpointError`.
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


def pickle_infos(path: Path, state: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """Headers of a pickled state dict: ``file`` is the pickle, the range its own byte count.

    The range is never read from the file (:func:`tensor_bytes` reads the loaded tensor); it
    gives every consumer the same ``nbytes``, ``numel`` and ordering as a safetensors header.
    """
    infos: dict[str, TensorInfo] = {}
    for name, tensor in state.items():
        try:
            code = from_torch(tensor.dtype)
        except KeyError:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold"
            ) from None
        nbytes = tensor.numel() * tensor.element_size()
        infos[name] = TensorInfo(name, code, tuple(tensor.shape), path, 0, nbytes)
    return infos


def tensor_bytes(tensor: torch.Tensor, buffer: bytearray | None = None) -> bytearray:
    """The raw little-endian bytes of a loaded tensor, into ``buffer`` when one is given."""
    import torch

    # (numel,) dtype -> (nbytes,) uint8
    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    if buffer is None:
        return bytearray(flat.numpy().tobytes())
    if flat.numel():
        torch.frombuffer(buffer, dtype=torch.uint8)[: flat.numel()].copy_(flat)
    return buffer
