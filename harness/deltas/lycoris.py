"""LyCORIS types peft merges: LoHa (Hadamard product) and LoKr (Kronecker product), Linear only.

peft 0.21 ``tuners/loha/layer.py``: ``delta = ((w1a @ w1b) * (w2a @ w2b)) * torch.tensor(alpha/r)``;
``tuners/lokr/layer.py``: ``delta = kron(w1, w2) * (alpha/r)`` with ``w1 = lokr_w1`` or
``lokr_w1_a @ lokr_w1_b`` (likewise ``w2``); both reshaped to the weight and added with
``weight.data += delta``. The convolution forms (``hada_t*``, ``lokr_t2``) are not verifiable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from harness.deltas.base import Edit, Rows, Step, Target, oriented_rows, outer_norms
from harness.deltas.lowrank import DELTA_ULPS, LoraScale
from harness.errors import AdapterError, UnsupportedAdapterError
from harness.ulp import U32, compute_roundoff, gamma, ulp

if TYPE_CHECKING:
    import torch

    from harness.io.adapter import Adapter


class _Lycoris(Edit):
    additive: ClassVar[bool] = True
    scale: float

    def __init__(
        self, *args: Any, roles: dict[str, str], scale: LoraScale, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.roles = roles
        self.settings = scale
        self.scale = scale.value
        self.rank = scale.r

    def describe(self) -> str:
        """``loha r=8 alpha=16 scale=2 (alpha/r)``."""
        return f"{self.kind} {self.settings.describe()}"

    def alternatives(self) -> list[tuple[str, float]]:
        """See :meth:`LoraScale.alternatives` (the faults of this type)."""
        return self.settings.alternatives(self.kind)

    def t(self, role: str, dtype: torch.dtype) -> torch.Tensor:
        """An adapter tensor by role."""
        return self.load(self.roles[role], dtype)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """``weight.data += delta`` with peft's fp32 delta (one rounding)."""
        w += self.peft_delta().reshape(w.shape)
        return w

    def peft_delta(self) -> torch.Tensor:
        """Peft's ``get_delta_weight`` (before the reshape)."""
        raise NotImplementedError


class Loha(_Lycoris):
    """LoHa: ``((w1a @ w1b) * (w2a @ w2b)) * s``."""

    kind: ClassVar[str] = "loha"

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """Both rank-``r`` products carry ``γ_r`` error each (in the merge and here)."""
        d = w.dtype
        w1a, w1b, w2a, w2b = (self.t(n, d) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                      "hada_w2_b"))
        p1 = oriented_rows(w1a, w1b, rows, False)
        p2 = oriented_rows(w2a, w2b, rows, False)
        delta = p1 * p2 * self.scale
        u_c = compute_roundoff(code)
        g = gamma(self.settings.r, U32) + gamma(self.settings.r, u_c)
        cross = outer_norms(w1a, w1b, rows, False).mul_(p2.abs())
        cross.add_(outer_norms(w2a, w2b, rows, False).mul_(p1.abs()))
        bound = ulp(delta, code).mul_(DELTA_ULPS).add_(cross, alpha=g * abs(self.scale) * 1.01)
        bound.add_(delta.abs(), alpha=4 * u_c).add_(w.abs(), alpha=2 * u_c)
        if incoming is not None:
            bound.add_(incoming)
        return Step(w + delta, bound)

    def peft_delta(self) -> torch.Tensor:
        """``HadaWeight.forward``: ``((w1a @ w1b) * (w2a @ w2b)) * scale`` (fp32 scale tensor)."""
        import torch

        d = torch.float32
        w1a, w1b, w2a, w2b = (self.t(n, d) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                      "hada_w2_b"))
        return ((w1a @ w1b) * (w2a @ w2b)) * torch.tensor(self.scale)


class Lokr(_Lycoris):
    """LoKr: ``kron(w1, w2) * s``, each factor full or a rank-``r`` product."""

    kind: ClassVar[str] = "lokr"
    blockable: ClassVar[bool] = False

    def _factor(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A Kronecker factor and the bound on its fp32 computation error (zero when full)."""
        import torch

        if f"lokr_{name}" in self.roles:
            full = self.t(f"lokr_{name}", dtype)
            return full, torch.zeros_like(full)
        a, b = self.t(f"lokr_{name}_a", dtype), self.t(f"lokr_{name}_b", dtype)
        rank = a.shape[1]
        error = outer_norms(a, b, slice(None), False)
        error.mul_(gamma(rank, U32) + gamma(rank, compute_roundoff_for(dtype)))
        return a @ b, error

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """Errors in the factors propagate through the Kronecker product."""
        import torch

        w1, e1 = self._factor("w1", w.dtype)
        w2, e2 = self._factor("w2", w.dtype)
        delta = (torch.kron(w1, w2) * self.scale).reshape(w.shape)
        spread = torch.kron(e1, w2.abs()) + torch.kron(w1.abs(), e2) + torch.kron(e1, e2)
        u_c = compute_roundoff(code)
        bound = ulp(delta, code).mul_(DELTA_ULPS)
        bound.add_(spread.reshape(w.shape), alpha=abs(self.scale) * 1.01)
        bound.add_(delta.abs(), alpha=4 * u_c).add_(w.abs(), alpha=2 * u_c)
        if incoming is not None:
            bound.add_(incoming)
        return Step(w + delta, bound)

    def peft_delta(self) -> torch.Tensor:
        """``make_kron(w1, w2, scale)``: ``torch.kron(w1, w2.contiguous()) * scale``."""
        import torch

        d = torch.float32
        w1 = self.t("lokr_w1", d) if "lokr_w1" in self.roles else (
            self.t("lokr_w1_a", d) @ self.t("lokr_w1_b", d))
        w2 = self.t("lokr_w2", d) if "lokr_w2" in self.roles else (
            self.t("lokr_w2_a", d) @ self.t("lokr_w2_b", d))
        return torch.kron(w1, w2.contiguous()) * self.scale


def compute_roundoff_for(dtype: torch.dtype) -> float:
    """Unit roundoff of a compute dtype (fp32 or fp64)."""
    import torch

    return 2.0**-53 if dtype == torch.float64 else U32


class _LycorisType:
    peft_type = ""
    edit: type[_Lycoris] = Loha
    required: tuple[frozenset[str], ...] = ()
    unsupported: frozenset[str] = frozenset()

    def plan(self, adapter: Adapter, index: int, target: Target) -> list[Edit]:
        """One edit per module with the type's tensors."""
        edits: list[Edit] = []
        for module, roles in sorted(adapter.layout.modules.items()):
            present = frozenset(roles)
            if present & self.unsupported:
                raise UnsupportedAdapterError(
                    f"adapter type {self.peft_type} on a convolution ({module!r}) is not"
                    " verifiable by merge-harness"
                )
            if present not in self.required:
                raise AdapterError(
                    f"adapter module {module!r}: tensors {sorted(present)} are not a"
                    f" {self.peft_type} layer"
                )
            tensor = module + ".weight"
            base = target.resolve(tensor, module)
            info = target.tensors[base]
            if len(info.shape) != 2:
                raise UnsupportedAdapterError(
                    f"adapter type {self.peft_type} on a {len(info.shape)}-d weight"
                    f" ({module!r}) is not verifiable by merge-harness"
                )
            edit = self.edit(adapter, module, tensor, base, info, index, roles=roles,
                             scale=LoraScale(adapter.config, module, alpha_key="alpha",
                                             matcher=adapter.patterns))
            self._check_shape(edit, info.shape)
            edits.append(edit)
        return edits

    def _check_shape(self, edit: _Lycoris, shape: tuple[int, ...]) -> None:
        numel = 1
        for dim in _delta_shape(edit):
            numel *= dim
        if numel != shape[0] * shape[1]:
            raise AdapterError(
                f"adapter module {edit.module!r}: the {self.peft_type} delta has {numel} elements"
                f" but the base weight is {list(shape)}"
            )


def _delta_shape(edit: _Lycoris) -> tuple[int, ...]:
    shapes = {role: edit.adapter.tensors[key].shape for role, key in edit.roles.items()}
    if isinstance(edit, Loha):
        return (shapes["hada_w1_a"][0], shapes["hada_w1_b"][1])
    w1 = shapes["lokr_w1"] if "lokr_w1" in shapes else (shapes["lokr_w1_a"][0],
                                                          shapes["lokr_w1_b"][1])
    w2 = shapes["lokr_w2"] if "lokr_w2" in shapes else (shapes["lokr_w2_a"][0],
                                                          shapes["lokr_w2_b"][1])
    return (w1[0] * w2[0], w1[1] * w2[1])


class LohaType(_LycorisType):
    """The registry entry for ``peft_type == "LOHA"``."""

    peft_type = "LOHA"
    edit = Loha
    required = (frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),)
    unsupported = frozenset({"hada_t1", "hada_t2"})


class LokrType(_LycorisType):
    """The registry entry for ``peft_type == "LOKR"``."""

    peft_type = "LOKR"
    edit = Lokr
    required = tuple(
        frozenset(a | b)
        for a in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
        for b in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})
    )
    unsupported = frozenset({"lokr_t2"})
