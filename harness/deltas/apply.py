"""Compose a tensor's edits into the exact reference ``R`` and its bound ``S``.

Edits of one tensor apply in merge order, each to the previous one's result *rounded to the
stored dtype* (that is what a merger that saves between adapters does), so the bound carried
into each step grows by the rounding of the step before. Shared by the oracle, the diagnosis
and any check that needs the correct merge of a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from harness.ulp import ulp

if TYPE_CHECKING:
    import torch

    from harness.deltas.base import Edit, Rows


def reference_rows(
    w: torch.Tensor, edits: Sequence[Edit], rows: Rows, code: str, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, S)`` for a block: the edits applied in order, each intermediate result rounded."""
    value = w
    bound: torch.Tensor | None = None
    for step, edit in enumerate(edits):
        incoming = None
        if step and bound is not None:
            # the previous edit's result was rounded to the stored dtype before this one
            incoming = bound + ulp(value.abs() + bound, code) * k
        result = edit.reference(value, incoming, rows, code)
        value, bound = result.value, result.bound
    if bound is None:
        raise ValueError("reference_rows needs at least one edit")
    return value, bound


def value_rows(w: torch.Tensor, edits: Sequence[Edit], rows: Rows, code: str) -> torch.Tensor:
    """``R`` alone for a block (the fast path: no bound)."""
    value = w
    for edit in edits:
        value = edit.value(value, rows, code)
    return value


def reference_tensor(
    w: torch.Tensor, edits: Sequence[Edit], code: str, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, S)`` of a whole tensor (``w`` in the compute dtype)."""
    return reference_rows(w, edits, slice(None), code, k)


def rounded_paths(edits: Sequence[Edit], code: str) -> list[Edit] | None:
    """``edits`` as peft computes them with half-precision factors, when that path exists.

    Every edit that has such a path (:meth:`~harness.deltas.base.Edit.rounded`) is replaced by
    it, the others are kept; None when no edit of the tensor has one.
    """
    twins = [edit.rounded(code) for edit in edits]
    if all(twin is None for twin in twins):
        return None
    return [twin if twin is not None else edit for twin, edit in zip(twins, edits, strict=True)]
