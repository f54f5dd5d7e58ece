"""(IA)^3: a learned vector rescales the weight's rows (or, for feed-forward modules, columns).

peft 0.21 ``tuners/ia3/layer.py``:
``weight = (weight * transpose(ia3_l, fan_in_fan_out)).to(dtype)``
with ``ia3_l`` shaped ``(out, 1)``, or ``(1, in)`` for ``feedforward_modules``; a non-feed-forward
layer with a bias also scales the bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from harness.architectures import CONV1D_MODEL_TYPES, CONV1D_MODULES
from harness.deltas.base import Edit, Rows, Step, Target
from harness.errors import AdapterError, UnsupportedAdapterError
from harness.ulp import compute_roundoff, ulp

if TYPE_CHECKING:
    import torch

    from harness.io.adapter import Adapter


class Ia3Scale(Edit):
    """Elementwise rescaling of a weight (or bias) by the broadcast ``ia3_l`` vector."""

    kind: ClassVar[str] = "ia3"

    def __init__(self, *args: Any, key: str, transposed: bool, bias: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self.transposed = transposed
        self.bias = bias

    def vector(self, dtype: torch.dtype) -> torch.Tensor:
        """``ia3_l`` oriented to broadcast over the stored tensor."""
        vector = self.load(self.key, dtype)
        if self.bias:
            return vector.reshape(self.info.shape)
        return vector.T if self.transposed else vector

    def describe(self) -> str:
        """``ia3 (rows)`` or ``ia3 (columns)``."""
        return f"{self.kind} {'bias' if self.bias else 'weight'}"

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """``W * l``, bounded for rounding of the vector and of the product.

        The vector may round to the stored dtype first (``|W| ulp(l)``); the product rounds in
        fp32 in the merge and in the compute dtype here (``2 u_c |R|``).
        """
        vector = self.vector(w.dtype)
        if vector.shape[0] != 1 or vector.dim() == 1:
            vector = vector[rows]
        value = w * vector
        bound = w.abs().mul_(ulp(vector, code)).add_(value.abs(), alpha=2 * compute_roundoff(code))
        if incoming is not None:
            bound.add_(incoming * vector.abs())
        return Step(value, bound)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """``torch.mul(weight, ia3_l).to(weight.dtype)`` with peft's fp32 vector."""
        import torch

        return torch.mul(w, self.vector(torch.float32)).to(w.dtype)


class Ia3Type:
    """The registry entry for ``peft_type == "IA3"``."""

    peft_type = "IA3"

    def plan(self, adapter: Adapter, index: int, target: Target) -> list[Edit]:
        """One rescaling per module (and per bias of non-feed-forward modules)."""
        edits: list[Edit] = []
        for module, roles in sorted(adapter.layout.modules.items()):
            if set(roles) != {"ia3_l"}:
                raise AdapterError(
                    f"adapter module {module!r}: unexpected tensors {sorted(roles)} in an IA3"
                    " adapter"
                )
            key = roles["ia3_l"]
            tensor = module + ".weight"
            base = target.resolve(tensor, module)
            info = target.tensors[base]
            shape = tuple(adapter.tensors[key].shape)
            if len(info.shape) != 2 or len(shape) != 2:
                raise UnsupportedAdapterError(
                    f"adapter type IA3 on a {len(info.shape)}-d weight ({module!r}) is not"
                    " verifiable by merge-harness"
                )
            feedforward = shape[0] == 1 and shape != (1, 1)
            size = shape[1] if feedforward else shape[0]
            # Linear stores (out, in): feed-forward scales columns, others rows; Conv1D stores
            # (in, out), so the vector is transposed.
            direct = info.shape[1 if feedforward else 0] == size
            flipped = info.shape[0 if feedforward else 1] == size
            if direct and flipped:
                transposed = (
                    target.model_type in CONV1D_MODEL_TYPES
                    and module.rsplit(".", 1)[-1] in CONV1D_MODULES
                )
            elif direct or flipped:
                transposed = flipped
            else:
                raise AdapterError(
                    f"adapter module {module!r}: ia3_l has shape {list(shape)} but the base"
                    f" weight is {list(info.shape)}"
                )
            edits.append(Ia3Scale(adapter, module, tensor, base, info, index, key=key,
                                  transposed=transposed))
            bias = module + ".bias"
            if not feedforward and bias in target.tensors:
                edits.append(Ia3Scale(adapter, module, bias, bias, target.tensors[bias], index,
                                      key=key, transposed=False, bias=True))
        return edits
