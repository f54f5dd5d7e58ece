"""What each GGUF tensor type allows: exact re-encoding, decoding, and an error bound.

Encoding and decoding are the ``gguf`` package's own (``gguf.quants``, the numpy port of
ggml's reference quantizers that the converter itself calls): a type it can quantize (F32,
F16, BF16, Q8_0, Q4_0...) is *reproducible*, and the export must hold exactly the bytes that
re-encoding the merged tensor gives. Other types (K-quants, IQ types) come out of
``llama-quantize`` and its search for good scales: only their decoded values can be checked,
against :func:`error_bound`.

For the four types most exports use (F32, F16, BF16, Q8_0), :mod:`harness.export.matching`
confirms a match without encoding with ``gguf.quants``; blocks it does not confirm are
re-encoded here, and ``gguf.quants`` alone decides what is reported.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np

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
