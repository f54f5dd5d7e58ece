"""The merge was made into another base than the one given: name which, from many tensors at once.

One tensor's failure can look like noise; the same kind of difference in every tensor is a
cause. After the pass, the tensors whose own diagnosis stayed generic ("no known fault fits", "a
different adapter", "non-target tensor modified") are examined together, on a bounded sample
read again from both checkpoints:

* **a dequantized 4-bit base** (QLoRA-style merge): ``M - delta`` (the base was dequantized,
  then merged) or ``M`` itself (merged into the 4-bit weights and dequantized after) takes only
  the 16 NF4 levels times one scale per block of 64 elements, the blockwise quantisation of
  bitsandbytes;
* **a sequential merge**: beyond this adapter's delta the tensors carry another low-rank update
  (an earlier adapter merged into the base the merge was made from);
* **another base revision**: the tensors the adapter does not touch differ from the base
  everywhere, and the targeted ones hold the adapter's delta plus a difference of the same size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.deltas.apply import reference_tensor
from harness.oracle.compare import Role, TensorCheck
from harness.oracle.evidence import NO_FIT
from harness.ulp import compute_dtype, ulp

if TYPE_CHECKING:
    import torch

    from harness.deltas import Plan
    from harness.io.checkpoint import Checkpoint

#: The 16 levels of the NF4 data type (QLoRA, Dettmers et al. 2023, appendix E), as
#: bitsandbytes' ``get_4bit_type("nf4")`` holds them.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: Block sizes bitsandbytes quantises with (64 is its and QLoRA's default).
BLOCK_SIZES = (64, 128, 32, 256)
#: How far ``x / absmax`` may lie from a level: a quarter of the closest two levels' gap.
LEVEL_TOLERANCE = 0.02
#: Share of blocks that must show the pattern.
BLOCK_FRACTION = 0.99
#: Tensors read again, at most, and their elements in all.
SAMPLE_TENSORS = 8
SAMPLE_ELEMENTS = 1 << 24
#: Per-tensor diagnoses that say no more than "something differs": the run-level cause may
#: replace them.
_GENERIC = (NO_FIT, "non-target tensor modified:", "a different adapter")


@dataclass
class _Sample:
    check: TensorCheck
    merged: torch.Tensor
    base: torch.Tensor
    #: ``R - W``: the adapter's change (zero for an untouched tensor).
    delta: torch.Tensor
    #: Rounding noise the reference allows, elementwise, and as one norm.
    slack: torch.Tensor
    noise: float


def _generic(check: TensorCheck) -> bool:
    return not check.ok and any((check.diagnosis or "").startswith(g) for g in _GENERIC)


def _read(check: TensorCheck, plan: Plan, merged: Checkpoint, base: Checkpoint,
          k: float) -> _Sample | None:
    import torch

    name = check.name
    if name not in merged.tensors or name not in base.tensors:
        return None
    if merged.tensors[name].shape != base.tensors[name].shape:
        return None
    code = merged.tensors[name].dtype
    cd = compute_dtype(code)
    m, w = merged.tensor(name).to(cd), base.tensor(name).to(cd)
    edits = plan.for_tensor(name)
    if edits:
        r, s = reference_tensor(w.clone(), edits, code, k)
    else:
        r, s = w, torch.zeros_like(w)
    # the rounding of the merge itself and of any earlier merge into the given weights, at the
    # larger of the two magnitudes
    slack = ulp(torch.maximum(r.abs(), m.abs()) + s, code).mul_(max(k, 1.0)).add_(s)
    noise = float(torch.linalg.vector_norm(slack)) * 2
    return _Sample(check, m, w, r - w, slack, noise)


def _samples(checks: Sequence[TensorCheck], plan: Plan, merged: Checkpoint, base: Checkpoint,
             k: float) -> list[_Sample]:
    # matrices first (the rank and block tests need them), the smallest first (bounded reads)
    chosen = sorted((c for c in checks if _generic(c) and c.name in merged.tensors),
                    key=lambda c: (len(merged.tensors[c.name].shape) < 2, c.numel))
    out: list[_Sample] = []
    total = 0
    for check in chosen:
        if len(out) >= SAMPLE_TENSORS or total + check.numel > SAMPLE_ELEMENTS:
            break
        found = _read(check, plan, merged, base, k)
        if found is not None:
            out.append(found)
            total += check.numel
    return out


def nf4_blocks(x: torch.Tensor, block: int, slack: torch.Tensor | None = None) -> float | None:
    """Share of ``block``-element blocks of ``x`` (flattened) that are NF4 levels x absmax.

    ``slack`` bounds how far each element may be from the value the pattern predicts (the
    rounding of a merge on top of it); blocks it blurs beyond the test's resolution are not
    counted, and None is returned when fewer than 8 blocks can be judged.
    """
    import torch

    flat = x.reshape(-1)
    usable = flat.numel() // block * block
    if not usable:
        return None
    blocks = flat[:usable].reshape(-1, block).double()
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    blur = (torch.zeros_like(blocks) if slack is None
            else slack.reshape(-1)[:usable].reshape(-1, block).double())
    sharp = (absmax.reshape(-1) > 0) & (blur.amax(dim=1) < LEVEL_TOLERANCE * absmax.reshape(-1))
    if int(sharp.sum()) < 8:
        return None
    scaled = blocks[sharp] / absmax[sharp]
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    distance = (scaled[..., None] - levels).abs().amin(dim=-1)
    allowed = LEVEL_TOLERANCE + blur[sharp] / absmax[sharp]
    nearest = (scaled[..., None] - levels).abs().argmin(dim=-1)
    if int(torch.unique(nearest).numel()) < 8:
        return 0.0  # constant or two-valued blocks fit any scale: not a quantisation pattern
    return float((distance <= allowed).all(dim=1).double().mean())


def _nf4(samples: list[_Sample]) -> str | None:
    matrices = [s for s in samples if s.merged.dim() == 2]
    for block in BLOCK_SIZES:
        # merged into the 4-bit weights: M itself is quantised; dequantized first: M - delta
        for label in ("M", "M - delta"):
            shares = [
                nf4_blocks(s.merged, block) if label == "M" else
                nf4_blocks(s.merged - s.delta, block, s.slack if s.delta.any() else None)
                for s in matrices
            ]
            judged = [share for share in shares if share is not None]
            if len(judged) >= 2 and min(judged) >= BLOCK_FRACTION:
                how = (
                    "the base was dequantized, then merged" if label == "M - delta"
                    else "merged into the 4-bit weights, then dequantized"
                )
                return (
                    f"merged into a dequantized 4-bit (NF4) base: in {len(judged)} tensor(s)"
                    f" {label} takes only the 16 NF4 levels times one scale per block of {block}"
                    f" elements ({min(judged):.1%} of blocks or more), bitsandbytes' blockwise"
                    f" quantisation ({how}: a QLoRA-style merge); merge the adapter into the"
                    " 16-bit base instead"
                )
    return None


def _rank(residual: torch.Tensor, noise: float) -> int:
    """The smallest ``k`` whose singular values beyond the ``k``-th sum to the noise or less."""
    import torch

    values = torch.linalg.svdvals(residual.double())
    tails = torch.flip(torch.cumsum(torch.flip(values**2, [0]), 0), [0]).sqrt()
    above = (tails > noise).nonzero()
    return int(above[-1]) + 1 if above.numel() else 0


def _coefficient(samples: list[_Sample]) -> float | None:
    """How much of the adapter's delta the targeted tensors carry (1: all of it)."""
    num = den = 0.0
    for s in samples:
        if s.check.role is Role.UNTOUCHED:
            continue
        num += float(((s.merged - s.base) * s.delta).sum())
        den += float((s.delta * s.delta).sum())
    return num / den if den else None


def _relative(s: _Sample) -> float:
    import torch

    residual = s.merged - s.base - s.delta
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(s.base).clamp_min(
        1e-30))


def _sequential(samples: list[_Sample]) -> str | None:
    matrices = [s for s in samples if s.merged.dim() == 2 and min(s.merged.shape) > 2]
    if len(matrices) < 2:
        return None
    coefficient = _coefficient(matrices)
    if coefficient is not None and abs(coefficient - 1) > 0.1:
        return None
    ranks = [_rank(s.merged - s.base - s.delta, s.noise) for s in matrices]
    if not all(0 < r <= max(1, min(s.merged.shape) // 4) for r, s in zip(ranks, matrices,
                                                                          strict=True)):
        return None
    return (
        f"an earlier merge is already in the weights: beyond this adapter's delta, {len(matrices)}"
        f" tensor(s) carry another low-rank update (rank <= {max(ranks)}): a sequential merge"
        " checked against the original base; the base to give is the earlier merge (the model"
        " this adapter was merged into)"
    )


def _revision(samples: list[_Sample], checks: Sequence[TensorCheck]) -> str | None:
    untouched = [c for c in checks if c.role is Role.UNTOUCHED]
    differing = [c for c in untouched if not c.ok]
    if len(untouched) < 2 or len(differing) < max(2, math.ceil(len(untouched) / 2)):
        return None
    if not any(s.check.role is Role.UNTOUCHED for s in samples):
        return None
    coefficient = _coefficient(samples)
    if coefficient is not None and abs(coefficient - 1) > 0.1:
        return None
    drift = [_relative(s) for s in samples]
    carry = f", and the targeted ones carry its delta (x{coefficient:.2f}) plus a difference" \
        " of the same kind" if coefficient is not None else ""
    return (
        f"merged into a different base revision: {len(differing)} of {len(untouched)} tensors"
        f" the adapter does not touch differ from the given base (relative difference"
        f" {min(drift):.2g}..{max(drift):.2g}){carry}; give the base the merge was made from"
        " (instruct vs base, or another snapshot)"
    )


def diagnose_base(checks: Sequence[TensorCheck], plan: Plan, merged: Checkpoint,
                  base: Checkpoint, k: float) -> str | None:
    """Name a merge into another base from the generic failures; rewrite their diagnoses."""
    if sum(1 for c in checks if _generic(c)) < 2:
        return None
    samples = _samples(checks, plan, merged, base, k)
    if len(samples) < 2:
        return None
    cause = _nf4(samples) or _sequential(samples) or _revision(samples, checks)
    if cause is None:
        return None
    for check in checks:
        if _generic(check):
            check.diagnosis = cause
    return cause
