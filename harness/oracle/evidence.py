"""What a suspect sees of one failed tensor: merged, base and reference values, and the plan.

:class:`Evidence` holds one failed tensor in the compute dtype and the correct merge's
``(R, S)``; a :class:`Suspect` builds the tensor its fault would have produced and asks
:meth:`Evidence.fits` whether the merged tensor is that, up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from harness.deltas.apply import reference_tensor
from harness.oracle.compare import TensorCheck
from harness.ulp import ulp

if TYPE_CHECKING:
    import torch

    from harness.deltas import Edit, Plan

#: Fraction of elements that must fit a suspect's tensor.
FIT_FRACTION = 0.999
NO_FIT = "no known fault fits"


@dataclass
class Evidence:
    """One failed tensor: merged, base and reference values (compute dtype), edits, plan."""

    check: TensorCheck
    code: str
    k: float
    merged: torch.Tensor
    base: torch.Tensor
    edits: list[Edit]
    plan: Plan
    base_name: str
    _cache: dict[str, object] = field(default_factory=dict)

    @cached_property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, S)`` of the correct merge."""
        if not self.edits:
            import torch

            return self.base, torch.zeros_like(self.base)
        return reference_tensor(self.base.clone(), self.edits, self.code, self.k)

    @cached_property
    def found(self) -> torch.Tensor:
        """``M - W``: the change the merge actually made."""
        return self.merged - self.base

    def inside(self, expected: torch.Tensor, slack: torch.Tensor,
               merged: torch.Tensor | None = None) -> torch.Tensor:
        """Elementwise: ``merged`` (default: the merged tensor) within twice the bound."""
        bound = (ulp(expected.abs() + slack, self.code) * max(self.k, 1.0) + slack) * 2
        return (self.merged if merged is None else merged).sub(expected).abs() <= bound

    def fraction(self, expected: torch.Tensor, slack: torch.Tensor) -> float:
        """Share of elements within twice the rounding bound of ``expected``."""
        inside = self.inside(expected, slack)
        return float(inside.double().mean()) if inside.numel() else 1.0

    def fits(self, expected: torch.Tensor, slack: torch.Tensor) -> bool:
        """Whether the merged tensor is ``expected`` up to rounding."""
        return self.fraction(expected, slack) >= FIT_FRACTION

    def step_delta(self, edit: Edit) -> torch.Tensor:
        """The change one additive edit makes in the correct reference (full tensor)."""
        position = self.edits.index(edit)
        before = (
            reference_tensor(self.base.clone(), self.edits[:position], self.code, self.k)[0]
            if position
            else self.base
        )
        after = reference_tensor(before.clone(), [edit], self.code, self.k)[0]
        return after - before

    def own_delta(self, edit: Edit) -> torch.Tensor:
        """``edit``'s change applied to this tensor's base (edits of other tensors too)."""
        w = self.base.clone()
        return edit.reference(w, None, slice(None), self.code).value - self.base


@dataclass(frozen=True)
class Suspect:
    """A named fault and the test that recognises it (returns the finding, or None)."""

    name: str
    test: Callable[[Evidence], str | None]
