"""The quick comparison: stored F32, F16, BF16 or Q8_0 bytes against the values they encode.

``gguf.quants`` encodes Q8_0 with a dozen numpy passes over the values, some of them in
float64 and some reducing rows of 32 (about 12 ns per weight on a 2.8 GHz Xeon): re-encoding
every chunk of a 1.1B-parameter model with it takes minutes. The same question is answered here
with six torch passes over the chunk, in this thread's reused scratch tensors, and one
comparison of the whole chunk's bytes: the expected bytes of every block are written next to
each other, as the file holds them, and compared with the stored bytes at once.

Only a match is decided here. When any byte differs, or a block lies outside what this path
computes exactly (a scale that is zero-adjacent, infinite or NaN), the blocks are returned and
``gguf.quants`` re-encodes the chunk and decides: :func:`mismatches` may only ever say "the same"
for bytes that gguf.quants would write. The tests hold it to that on random values, exact .5
ties, zero, maximal and subnormal blocks, and damaged bytes.

The arithmetic is the reference's, operation for operation, in float32 (the torch operations
used are correctly rounded, with no fused multiply-add across a rounding ``gguf.quants``
performs):

* Q8_0 (``Q8_0.quantize_blocks``): ``d = max|x| / 127`` stored as float16; ``id = 1 / d``
  (0 for a zero block); quants ``round(x * id)`` with ties away from zero. The rounding is
  ``trunc(q + copysign(0.5 - 2^-25, q))``: the float32 just below 1/2 makes every tie reach
  the next integer and nothing else does for ``|q| < 2^22``, and the float32 to int8
  conversion truncates. ``|q| <= 127`` holds whenever ``d`` is a normal float32, so blocks
  whose scale is subnormal (or infinite, or NaN) are left to ``gguf.quants``.
* F16 and BF16: round to nearest even (torch's conversions). A NaN is narrowed to a NaN whose
  bits differ from ggml's (sign, payload), so an element that is NaN is left to
  ``gguf.quants``. F32: the bits themselves.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import gguf
import numpy as np

from harness.stream.pipeline import workspace

if TYPE_CHECKING:
    import torch

Q = gguf.GGMLQuantizationType
#: Types with a quick comparison.
QUICK = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0})
#: The float32 just below 1/2: ``trunc(q + copysign(HALF_BELOW, q))`` is ``q`` rounded half
#: away from zero (C's ``roundf``, ``gguf.quants.np_roundf``) for every float32 ``|q| < 2^22``.
HALF_BELOW = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
#: The smallest normal float32: a Q8_0 scale at least this large has an exact enough inverse
#: that every scaled value stays within [-127, 127].
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)
LARGEST = float(np.finfo(np.float32).max)


def mismatches(
    values: torch.Tensor, stored: torch.Tensor, qtype: gguf.GGMLQuantizationType
) -> torch.Tensor | None:
    """None when ``stored`` is exactly the encoding of ``values``; else the blocks to re-check.

    ``values`` (rows, row_length) float32, contiguous; ``stored`` (rows, row_bytes) uint8 ->
    None, or (blocks,) bool: True for every block that differs or that this path cannot decide
    (a superset of the differing blocks).
    """
    import torch

    if qtype == Q.Q8_0:
        return _q8_0(values, stored)
    if qtype == Q.F32:
        # gguf.quants writes the float32 bits as they are, NaN payloads included
        expected = values
    elif qtype in (Q.F16, Q.BF16):
        dtype = torch.float16 if qtype == Q.F16 else torch.bfloat16
        expected = _scratch(values.numel(), dtype, "match:narrow").view(values.shape)
        expected.copy_(values)
    else:
        raise ValueError(f"no quick comparison for {qtype.name}")
    flat = expected.reshape(-1).view(torch.uint8)
    # torch narrows a NaN to its own NaN (0x7E00, 0x7FC0 or 0xFFFF, by code path), ggml keeps
    # the sign and the top of the payload: a NaN is never decided here.
    undecided = torch.isnan(values).reshape(-1) if qtype != Q.F32 else None
    if _same_bytes(flat, stored.reshape(-1)) and (undecided is None or not undecided.any()):
        return None
    size = expected.element_size()
    differs = (flat.view(-1, size) != stored.reshape(-1, size)).any(dim=1)
    return differs if undecided is None else differs | undecided


class _Q8_0Scratch:
    """One thread's scratch for chunks of ``blocks`` Q8_0 blocks, its views made once.

    A torch call costs microseconds before it touches any data: made per chunk, these views
    would cost as much as a pass over a chunk small enough to stay in the CPU's cache.
    """

    def __init__(self, blocks: int) -> None:
        import torch

        # (blocks, 34) uint8: what gguf.quants would write, block by block
        self.expected = torch.empty((blocks, 34), dtype=torch.uint8)
        self.scales = self.expected.view(torch.float16)[:, 0]
        self.quants = self.expected[:, 2:].view(torch.int8)
        self.flat = self.expected.view(-1).numpy()
        self.work = torch.empty((blocks, 32), dtype=torch.float32)
        self.scale = torch.empty(blocks, dtype=torch.float32)
        self.inverse = self.scale[:, None]
        # 0-d operands: a Python number costs a conversion on every call
        self.levels = torch.tensor(127.0, dtype=torch.float32)
        self.half_below = torch.tensor(HALF_BELOW, dtype=torch.float32)


_threads = threading.local()
#: Chunk sizes whose scratch a thread keeps (a tensor's full chunks and its last one).
KEPT_SIZES = 4


def _q8_0_scratch(blocks: int) -> _Q8_0Scratch:
    kept: dict[int, _Q8_0Scratch] = getattr(_threads, "q8_0", None) or {}
    _threads.q8_0 = kept
    found = kept.get(blocks)
    if found is None:
        if len(kept) >= KEPT_SIZES:
            kept.clear()
        found = kept[blocks] = _Q8_0Scratch(blocks)
    return found


def _q8_0(values: torch.Tensor, stored: torch.Tensor) -> torch.Tensor | None:
    """Q8_0: expected blocks (2-byte float16 scale, 32 int8 quants) built in place, compared."""
    import torch

    blocks = values.numel() // 32
    x = values.view(blocks, 32)
    s = _q8_0_scratch(blocks)
    work, scale = s.work, s.scale
    # (blocks,) d = max|x| / 127 in float32, stored as float16 (to nearest even)
    torch.abs(x, out=work)
    torch.amax(work, dim=1, out=scale)
    scale.div_(s.levels)
    s.scales.copy_(scale)
    low, high = (float(v) for v in torch.aminmax(scale))
    undecided: torch.Tensor | None = None
    if low >= SMALLEST_NORMAL and high <= LARGEST:
        scale.reciprocal_()
    else:
        # Zero blocks (id = 0, all quants 0, as the reference) and blocks left to gguf.quants;
        # NaN fails both comparisons.
        normal = (scale >= SMALLEST_NORMAL) & (scale <= LARGEST)
        undecided = ~normal & (scale != 0)
        scale.copy_(torch.where(normal, scale.reciprocal(), torch.zeros_like(scale)))
    # (blocks, 32) |x| * id + (1/2 - 2^-25), given the sign of x, truncated by the int8 copy.
    # (OR-ing in x's sign bit instead is two faster passes, but its scratch of a chunk's size
    # made the whole pass about 8 % slower.)
    work.mul_(s.inverse)
    work.add_(s.half_below)
    torch.copysign(work, x, out=work)
    s.quants.copy_(work)
    if undecided is None and np.array_equal(s.flat, stored.numpy().reshape(-1)):
        return None
    differs = (s.expected != stored.reshape(blocks, 34)).any(dim=1)
    return differs if undecided is None else differs | undecided


def _same_bytes(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether two flat uint8 tensors hold the same bytes.

    numpy's comparison: several times faster than torch.equal on bytes.
    """
    return bool(np.array_equal(left.numpy(), right.numpy()))


def _scratch(count: int, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """A flat scratch tensor of this thread (:func:`harness.stream.pipeline.workspace`)."""
    import torch

    found = workspace(count, dtype, slot)
    return found if found is not None else torch.empty(count, dtype=dtype)
