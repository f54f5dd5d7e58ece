"""What each GGUF tensor type allows: exact re-encoding, decoding, and an error bound.

Encoding and decoding are the ``gguf`` package's own (``gguf.quants``, the numpy port of
ggml's reference quantizers that the converter itself calls): a type it can quantize (F32,
F16, BF16, Q8_0, Q4_0...) is *reproducible*, and the export must hold exactly the bytes that
re-encoding the merged tensor gives. Other types (K-quants, IQ types) come out of
``llama-quantize`` and its search for good scales: only their decoded values can be checked,
against :func:`error_bound`.

:func:`quick_differs` answers "do these bytes re-encode these values?" for the four types most
exports use (F32, F16, BF16, Q8_0) several times faster than encoding with ``gguf.quants``
(which makes a dozen full passes over the values): on a 1.1B-parameter model that is the
difference between minutes and seconds. It only ever confirms: blocks it finds different are
re-encoded with ``gguf.quants``, which alone decides what is reported, and a property test holds
it to ``gguf.quants`` on random values, ties and zero blocks included.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import gguf
import numpy as np

from harness.stream.pipeline import workspace

if TYPE_CHECKING:
    import torch

PLAIN = frozenset(
    {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
)
#: Reproducible types llama-quantize may also make with an importance matrix (a weighted scale
#: search): when no route reproduces their bytes they are held to the error bound instead.
SEARCHED = frozenset(
    {
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q5_0,
        gguf.GGMLQuantizationType.Q5_1,
    }
)
#: Bound on a decoded element's error, in uniform quantization steps over its block's range.
BOUND_STEPS = 2.0
BOUND_TEXT = (
    f"|decoded - merged| <= {BOUND_STEPS:g} x 2 max|x| / (2^b - 1) + max|x| x 2^-10 + 2^b x"
    " 2^-24 per block, b = the type's whole bits per weight"
)


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    """Elements per block."""
    return int(gguf.GGML_QUANT_SIZES[qtype][0])


def type_size(qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes per block."""
    return int(gguf.GGML_QUANT_SIZES[qtype][1])


@functools.cache
def reproducible(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants`` can quantize ``qtype`` (then an export must match exactly)."""
    if qtype in PLAIN:
        return True
    try:
        gguf.quants.quantize(np.zeros((1, block_size(qtype)), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.QuantError, ValueError, AssertionError):
        return False
    return True


@functools.cache
def decodable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants`` can dequantize ``qtype``."""
    try:
        gguf.quants.dequantize(np.zeros((1, type_size(qtype)), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, AssertionError):
        return False
    return True


def encode(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``values`` (rows, row_length), float32 or float16, as the bytes of ``qtype``.

    (rows, row_length) -> (rows, row_length / block_size * type_size) uint8: exactly what the
    converter writes, since it calls the same function on the same values.
    """
    encoded = gguf.quants.quantize(values, qtype)
    return np.ascontiguousarray(encoded).view(np.uint8).reshape(values.shape[0], -1)


def quick_differs(
    values: np.ndarray, stored: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> np.ndarray | None:
    """Per block, whether ``stored`` is not the encoding of ``values``; None: no quick path.

    ``values`` (rows, row_length) float32 or float16, ``stored`` (rows, row_bytes) uint8 ->
    (blocks,) bool.
    """
    found: np.ndarray
    if qtype == gguf.GGMLQuantizationType.F32:
        found = values.astype(np.float32, copy=False).view(np.uint32).ravel()
        return np.asarray(found != stored.view(np.uint32).ravel())
    if qtype == gguf.GGMLQuantizationType.F16:
        found = values.astype(np.float16, copy=False).view(np.uint16).ravel()
        return np.asarray(found != stored.view(np.uint16).ravel())
    if qtype == gguf.GGMLQuantizationType.BF16:
        import torch

        # torch rounds float32 to bfloat16 to nearest even, as ggml does (NaNs aside, which
        # differ and are then settled by gguf.quants).
        wide = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        found = wide.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).ravel()
        return np.asarray(found != stored.view(np.uint16).ravel())
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return _q8_0_differs(values.astype(np.float32, copy=False), stored)
    return None


def _q8_0_differs(values: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Q8_0: a float16 scale ``d = max|x| / 127`` and 32 int8 ``round(x / d)`` per block.

    In torch, whose per-block reductions are an order of magnitude faster than numpy's on rows
    of 32, in this thread's reused scratch tensors (fresh ones cost a page fault per 4 KiB);
    the 32 quants of a block are compared as four 64-bit words. Rounding is to nearest with
    ties to even; blocks that then differ are looked at again with Q8_0's own rounding (ties
    away from zero), so that only a real difference is reported.
    """
    import torch

    count = values.size
    blocks = torch.from_numpy(values).reshape(-1, 32)
    raw = torch.from_numpy(stored).reshape(-1, 34)
    work = _scratch(count, torch.float32, "q8_0:work").reshape(-1, 32)
    # (blocks,) the scale as gguf computes it: float32 max|x| / 127, stored as float16; max|x|
    # from the largest and the smallest value (two reads, no |x| written), +0 for zero blocks
    scale = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_().div_(127)
    stored_scale = raw[:, :2].contiguous().view(torch.int16).reshape(-1)
    differs = scale.to(torch.float16).view(torch.int16) != stored_scale
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    # (blocks, 32) x / d in float32, rounded; |x / d| <= 127, so the int8 copy is exact
    scaled = torch.mul(blocks, inverse[:, None], out=work)
    rounded = _scratch(count, torch.float32, "q8_0:rounded").reshape(-1, 32)
    torch.round(scaled, out=rounded)
    narrow = _scratch(count, torch.int8, "q8_0:narrow").reshape(-1, 32)
    narrow.copy_(rounded)
    quants = _scratch(count, torch.int8, "q8_0:quants").reshape(-1, 32)
    quants.copy_(raw[:, 2:].view(torch.int8))
    lanes = _scratch(count // 8, torch.bool, "q8_0:lanes").reshape(-1, 4)
    torch.ne(narrow.view(torch.int64), quants.view(torch.int64), out=lanes)
    differs |= lanes.any(dim=1)
    if bool(differs.any()):
        suspects = torch.nonzero(differs, as_tuple=True)[0]
        exact = scaled[suspects]
        whole = torch.trunc(exact)
        tie = (exact - whole).abs() == 0.5
        away = torch.where(tie, whole + torch.sign(exact), torch.round(exact)).to(torch.int8)
        differs[suspects] = (away != quants[suspects]).any(dim=1) | (
            scale[suspects].to(torch.float16).view(torch.int16) != stored_scale[suspects]
        )
    result: np.ndarray = differs.numpy()
    return result


def _scratch(count: int, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """A flat scratch tensor of this thread (:func:`harness.stream.pipeline.workspace`)."""
    import torch

    found = workspace(count, dtype, slot)
    return found if found is not None else torch.empty(count, dtype=dtype)


def decode(raw: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The stored bytes (rows, row_bytes) uint8 as float32 values (rows, row_length)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32)
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def bits_per_weight(qtype: gguf.GGMLQuantizationType) -> int:
    """Whole bits of payload per weight (the block's scales excluded, rounded down; >= 1)."""
    return max(1, (type_size(qtype) * 8) // block_size(qtype))


def error_bound(expected: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Per block, the largest error a faithful ``qtype`` encoding of ``expected`` can have.

    (rows, row_length) -> (rows * row_length / block_size,). A type storing ``b`` bits per
    weight cannot do better than a uniform grid of ``2^b`` levels over the block's range
    ``[-max|x|, max|x|]``; the scale search of llama-quantize and non-uniform grids (IQ, MXFP4)
    make it up to about one such step worse, hence :data:`BOUND_STEPS` steps. Exact types are
    held to zero instead.
    """
    blocks = expected.reshape(-1, block_size(qtype)).astype(np.float32, copy=False)
    # Symmetric types (Q8_0, Q4_0, Q6_K, IQ...) spread their levels over [-max|x|, max|x|],
    # which also covers the [min, max] of the offset ones (Q4_1, Q4_K...).
    amax = np.abs(blocks).max(axis=1)
    levels = float(2 ** bits_per_weight(qtype) - 1)
    # Block scales are stored as float16: relative precision 2^-10 (a constant block is exact
    # only to that), absolute 2^-24 (below it a scale underflows), times the largest level.
    slack = amax * np.float32(2.0**-10) + np.float32((levels + 1) * 2.0**-24)
    return np.asarray(BOUND_STEPS * 2 * amax / levels + slack, dtype=np.float32)
