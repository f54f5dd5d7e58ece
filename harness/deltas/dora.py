"""DoRA: LoRA renormalised per output unit to a learned magnitude vector.

``W' = m / ||W + delta||_c * (W + delta)`` with the norm taken per output unit (per embedding
dimension for embeddings), computed from the unmerged weight, as peft 0.21's
``DoraLinearVariant.merge_unsafe`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from harness.deltas.base import Edit, Rows, Step
from harness.deltas.lowrank import LoraLinear, lora_slack
from harness.errors import AdapterError
from harness.ulp import U32, compute_dtype, gamma, unit_roundoff

if TYPE_CHECKING:
    import torch


class LoraDora(LoraLinear):
    """DoRA: LoRA renormalised per output unit to the learned magnitude vector."""

    kind: ClassVar[str] = "dora"
    blockable: ClassVar[bool] = False
    additive: ClassVar[bool] = False

    def __init__(self, *args: Any, magnitude_key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.magnitude_key = magnitude_key

    def check(self) -> None:
        """The magnitude vector has one entry per output unit."""
        super().check()
        units = self.info.shape[1] if self.transposed else self.info.shape[0]
        shape = self.adapter.tensors[self.magnitude_key].shape
        if tuple(shape) != (units,):
            raise AdapterError(
                f"adapter module {self.module!r}: lora_magnitude_vector has shape {list(shape)}"
                f" but the layer has {units} output units"
            )

    def rounded(self, code: str) -> None:
        """No half-precision path is recognised for DoRA (its magnitudes would round too)."""
        return None

    def without_variant(self) -> Edit:
        """The same LoRA without the magnitude renormalisation (DoRA ignored)."""
        return LoraLinear(self.adapter, self.module, self.tensor, self.base, self.info,
                          self.index, a_key=self.a_key, b_key=self.b_key, scale=self.settings,
                          transposed=self.transposed)

    def value(self, w: torch.Tensor, rows: Rows, code: str) -> torch.Tensor:
        """The renormalised value (DoRA has no cheaper path)."""
        return self.reference(w.to(compute_dtype(code)), None, rows, code).value

    def factor(self, v: torch.Tensor) -> torch.Tensor:
        """``m / ||v||`` per output unit, shaped to broadcast over the stored tensor."""
        import torch

        m = self.load(self.magnitude_key, v.dtype)
        dim = 0 if self.transposed else 1
        f = m / torch.linalg.vector_norm(v, dim=dim)
        shaped: torch.Tensor = f[None, :] if self.transposed else f[:, None]
        return shaped

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """``m / ||W + delta|| * (W + delta)``, bounded for fp32 norms and stored-dtype factors.

        Beyond the LoRA slack ``e`` (scaled by ``|f|``): the norm of ``n`` squares carries
        ``γ_n/2`` relative error, the square root, division, product and add 4 more ``u32``; an
        implementation computing the factor in the stored dtype rounds it twice more (``2 u_s``);
        and an error ``e`` in ``W + delta`` moves the norm by at most ``||e||``, the factor by
        ``||e|| / ||W + delta||`` relative.
        """
        import torch

        delta, products = self.delta_rows(slice(None), w.dtype)
        slack = lora_slack(delta, w, products, self.settings.r, self.scale, code)
        if incoming is not None:
            slack.add_(incoming)
        v = w + delta
        f = self.factor(v)
        value = f * v
        dim = 0 if self.transposed else 1
        n = v.shape[dim]
        moved = torch.linalg.vector_norm(slack, dim=dim) / torch.linalg.vector_norm(v, dim=dim)
        moved = moved[None, :] if self.transposed else moved[:, None]
        relative = gamma(n, U32) / 2 + 4 * U32 + 2 * unit_roundoff(code)
        bound = slack.mul_(f.abs()).add_(value.abs().mul_(moved.add(relative)))
        return Step(value, bound)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """Peft's ``DoraLinearVariant.merge_unsafe`` (op for op, for bit identity)."""
        import torch

        delta = self.peft_delta()
        magnitude = self.load(self.magnitude_key, delta.dtype)
        # DoraLinearLayer.get_weight_norm(base_weight, transpose(delta, fif), scaling=1)
        lora_weight = delta.T if self.transposed else delta
        weight = w.T if self.transposed else w
        weight = weight + 1 * lora_weight
        weight_norm = torch.linalg.norm(weight, dim=1).to(weight.dtype)
        dora_factor = magnitude / weight_norm
        dora_factor = dora_factor.view(-1, 1)
        if self.transposed:
            dora_factor = dora_factor.T
        merged: torch.Tensor = (dora_factor * (w + delta)).to(w.dtype)
        return merged
