"""LoRA edits: rsLoRA, rank/alpha patterns, Conv1D, embeddings and bias (DoRA in ``dora``).

Semantics follow peft 0.21's ``tuners/lora/layer.py`` and ``variants.py``:

* scale ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``); ``r`` and ``alpha``
  come from ``rank_pattern``/``alpha_pattern`` when a key matches the module as peft's
  ``get_pattern_key`` matches it;
* ``Linear``: ``delta = transpose(B @ A, fan_in_fan_out) * s``, added to the weight without first
  rounding the delta (peft upcasts adapter weights to fp32 on load, so ``weight += delta`` computes
  in fp32 and rounds once);
* ``Embedding``: ``delta = (B @ A).T * s`` rounded to the stored dtype, then added;
* ``lora_bias``: ``bias += lora_B.bias * s``;
* DoRA: ``W' = m / ||W + delta||_c * (W + delta)`` with the norm taken per output unit
  (per embedding dimension for embeddings), computed from the unmerged weight.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, ClassVar

from harness.deltas.base import (
    Edit,
    Rows,
    Step,
    oriented_rows,
    outer_norms,
)
from harness.dtypes import torch_dtype_name
from harness.errors import AdapterError
from harness.io.patterns import PatternMatcher, pattern_key
from harness.stream.pipeline import workspace
from harness.ulp import U32, compute_dtype, compute_roundoff, gamma, ulp

if TYPE_CHECKING:
    import torch

    from harness.io.adapter import Adapter
    from harness.io.safetensors import TensorInfo

#: How much a fault may be rounded away: the delta term allows the stored-dtype delta path.
DELTA_ULPS = 1.5
#: The delta term when the factors themselves are held in the stored dtype (see
#: :meth:`LoraLinear.rounded`): the product ``B @ A`` may be rounded to it (at most ``|s|/2``
#: ulp of the product, which is at most one ulp of the delta), then the scaling (half an ulp),
#: then the delta before the add (half an ulp).
ROUNDED_DELTA_ULPS = 2.0
#: The arithmetic a merge with half-precision factors follows, as reports name it.
ROUNDED_FACTORS = (
    "LoRA factors held in {dtype} at merge time (PeftModel.from_pretrained(...,"
    " autocast_adapter_dtype=False), .to(torch.{torch}) before merging, or a PiSSA/OLoRA adapter"
    " converted and merged in {dtype}): W + s * {dtype}(B) @ {dtype}(A), the product rounded"
)


def _lora_dtype(adapter: Adapter, key: str) -> torch.dtype:
    """The dtype peft holds an adapter tensor in after loading: fp32 unless saved as fp64."""
    import torch

    return torch.float64 if adapter.tensors[key].dtype == "F64" else torch.float32


class LoraScale:
    """The rank, alpha and scale peft uses for one module, and where they came from."""

    def __init__(
        self,
        config: dict[str, Any],
        module: str,
        *,
        alpha_key: str = "lora_alpha",
        matcher: PatternMatcher | None = None,
    ) -> None:
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        self.default_r = int(config.get("r", 8))
        self.default_alpha = float(config.get(alpha_key, 8))
        self.r_key = pattern_key(rank_pattern, module, matcher, "rank_pattern key")
        self.alpha_key = pattern_key(alpha_pattern, module, matcher, "alpha_pattern key")
        self.r = int(rank_pattern[self.r_key]) if self.r_key is not None else self.default_r
        self.alpha = (
            float(alpha_pattern[self.alpha_key])
            if self.alpha_key is not None
            else self.default_alpha
        )
        self.rslora = bool(config.get("use_rslora", False)) and alpha_key == "lora_alpha"
        self.value = self.scale(self.r, self.alpha)

    def scale(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (exactly peft's Python floats)."""
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def describe(self) -> str:
        """``r=8 alpha=16 scale=2 (alpha/r)`` with the pattern keys that applied."""
        rule = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        text = f"r={self.r} alpha={self.alpha:g} scale={self.value:g} ({rule})"
        if self.r_key is not None:
            text += f" rank_pattern[{self.r_key!r}]"
        if self.alpha_key is not None:
            text += f" alpha_pattern[{self.alpha_key!r}]"
        return text

    def alternatives(self, kind: str = "lora") -> list[tuple[str, float]]:
        """Wrong scales a faulty merger produces, as factors of the right one, with names.

        Only faults the adapter type ``kind`` can have are offered: rsLoRA and the rank/alpha
        patterns belong to LoRA; a LoHa or LoKr merger can instead scale both factors of its
        Hadamard or Kronecker product (``s**2``). Specific causes come first, generic factors
        after; causes that give the same factor are named together (with ``r = 4``, doubling is
        also ``sqrt(r)``).
        """
        s = self.value
        root = math.sqrt(self.r)
        found: list[tuple[str, float]] = [("sign flipped (delta subtracted)", -1.0)]
        lora = kind not in _PRODUCT_FACTORS
        if lora and self.rslora:
            found.append(("rsLoRA ignored: alpha/r used instead of alpha/sqrt(r)", 1 / root))
        elif lora:
            found.append(("rsLoRA scaling alpha/sqrt(r) used instead of alpha/r", root))
        else:
            found.append((f"scale applied to both {_PRODUCT_FACTORS[kind]} factors (s^2)", s))
        if s:
            if self.r_key is not None:
                wrong = self.scale(self.default_r, self.alpha)
                found.append((f"rank_pattern ignored (r={self.default_r} used)", wrong / s))
            if self.alpha_key is not None:
                wrong = self.scale(self.r, self.default_alpha)
                found.append(
                    (f"alpha_pattern ignored (alpha={self.default_alpha:g} used)", wrong / s)
                )
            if self.r_key is not None and self.alpha_key is not None:
                both = self.scale(self.default_r, self.default_alpha)
                found.append(("rank_pattern and alpha_pattern ignored", both / s))
        found += [
            ("delta applied twice (or scale doubled)", 2.0),
            ("scale halved", 0.5),
        ]
        if lora:
            found += [("scale off by sqrt(r)", root), ("scale off by 1/sqrt(r)", 1 / root)]
        found += [
            ("scale off by r (alpha used as the scale)", float(self.r)),
            ("scale off by 1/r", 1 / self.r),
        ]
        if s:
            found.append(("delta not scaled (scale 1 used)", 1 / s))
        merged: dict[float, list[str]] = {}
        for label, factor in found:
            key = next((f for f in merged if math.isclose(f, factor, rel_tol=1e-9)), factor)
            if label not in merged.setdefault(key, []):
                merged[key].append(label)
        return [(" or ".join(labels), factor) for factor, labels in merged.items()]


#: Adapter kinds whose delta is a product of two factors, and the product's name.
_PRODUCT_FACTORS = {"loha": "Hadamard", "lokr": "Kronecker"}


def lora_slack(
    delta: torch.Tensor,
    w: torch.Tensor,
    products: torch.Tensor,
    rank: int,
    scale: float,
    code: str,
    delta_ulps: float = DELTA_ULPS,
) -> torch.Tensor:
    """Bound on a correct merge's pre-rounding error for an additive low-rank delta.

    ``1.5 ulp(delta)``: the delta may be rounded to the stored dtype before the add (0.5 ulp), and
    when computed in the stored dtype its product and scaling round too (up to 1 ulp more);
    ``(γ_r(u32) + γ_r(u_c)) |s| sum_k |B_ik||A_kj|``: the rank-``r`` dot products accumulate in fp32
    in the merge and in the compute dtype in the reference (``products`` bounds the sum by
    Cauchy-Schwarz); ``2 u_c (|W| + |delta|)``: the fp32 add and the reference's own add.
    """
    u_c = compute_roundoff(code)
    slack = ulp(delta, code).mul_(delta_ulps)
    slack.add_(products, alpha=(gamma(rank, U32) + gamma(rank + 1, u_c)) * abs(scale))
    slack.add_(w.abs().add_(delta.abs()), alpha=2 * u_c)
    return slack


class LoraLinear(Edit):
    """LoRA on a ``Linear`` or ``Conv1D`` weight."""

    kind: ClassVar[str] = "lora"
    additive: ClassVar[bool] = True
    scale: float
    #: The dtype the factors are rounded to before the product (None: used as saved).
    factor_code: str | None = None
    #: Ulps of the delta a correct implementation may be off by (see :func:`lora_slack`).
    delta_ulps: float = DELTA_ULPS

    def __init__(
        self,
        adapter: Adapter,
        module: str,
        tensor: str,
        base: str,
        info: TensorInfo,
        index: int,
        *,
        a_key: str,
        b_key: str,
        scale: LoraScale,
        transposed: bool,
    ) -> None:
        super().__init__(adapter, module, tensor, base, info, index)
        self.a_key = a_key
        self.b_key = b_key
        self.settings = scale
        self.scale = scale.value
        self.rank = scale.r
        self.transposed = transposed

    def check(self) -> None:
        """The saved rank agrees with the config (after rank_pattern)."""
        rank_a = self.adapter.tensors[self.a_key].shape[0]
        rank_b = self.adapter.tensors[self.b_key].shape[-1]
        if rank_a != rank_b:
            raise AdapterError(
                f"adapter module {self.module!r}: lora_A has rank {rank_a} but lora_B {rank_b}"
            )
        if rank_a != self.settings.r:
            source = (
                f"rank_pattern[{self.settings.r_key!r}]" if self.settings.r_key else "r"
            )
            raise AdapterError(
                f"adapter module {self.module!r}: lora_A has rank {rank_a} but the config gives"
                f" {source}={self.settings.r}"
            )

    def describe(self) -> str:
        """``LoRA r=8 alpha=16 scale=2 (alpha/r)`` and the orientation."""
        where = " fan_in_fan_out" if self.transposed else ""
        return f"{self.kind} {self.settings.describe()}{where}"

    def alternatives(self) -> list[tuple[str, float]]:
        """See :meth:`LoraScale.alternatives`."""
        return self.settings.alternatives()

    def held(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """An adapter factor in ``dtype``, first rounded to :attr:`factor_code` when set."""
        if self.factor_code is None:
            return self.load(key, dtype)
        import torch

        cache = (key, ("rounded", dtype))
        value = self._cache.get(cache)
        if value is None:
            held = getattr(torch, torch_dtype_name(self.factor_code))
            value = self.adapter.tensor(key).to(held).to(dtype)
            self._cache[cache] = value
        return value

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in ``dtype``: ``(out, r)`` and ``(r, in)``."""
        return self.held(self.b_key, dtype), self.held(self.a_key, dtype)

    def rounded(self, code: str) -> LoraLinear | None:
        """The LoRA computed from factors held in the stored dtype ``code`` (half precision).

        peft casts the factors to the base layer's dtype when they are loaded with
        ``autocast_adapter_dtype=False`` or the model is cast with ``.to(torch.bfloat16)``:
        ``W + s * B' @ A'`` with ``B'``, ``A'`` rounded, the product rounded again on
        accelerators. None when the factors are saved in that dtype already (nothing rounds) or
        the checkpoint is not half precision.
        """
        if code not in ("BF16", "F16") or self.factor_code is not None:
            return None
        if all(self.adapter.tensors[k].dtype == code for k in (self.a_key, self.b_key)):
            return None
        twin = copy.copy(self)
        twin._cache = {}
        twin.factor_code = code
        twin.delta_ulps = ROUNDED_DELTA_ULPS
        return twin

    def scaled_rows(self, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        """Rows of ``(s * B) @ A`` in stored orientation: the reference delta.

        Scaling the ``(out, r)`` factor first saves a pass over the delta; the extra rounding is
        inside the ``γ`` term of :func:`lora_slack` (``r + 1`` roundings per element at most).
        """
        key = (self.b_key, ("scaled", dtype))
        b, a = self.factors(dtype)
        scaled = self._cache.get(key)
        if scaled is None:
            scaled = b * self.scale
            self._cache[key] = scaled
        return oriented_rows(scaled, a, rows, self.transposed)

    def delta_rows(self, rows: Rows, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the scaled delta in stored orientation, and the ``sum |B||A|`` bound."""
        b, a = self.factors(dtype)
        return self.scaled_rows(rows, dtype), outer_norms(b, a, rows, self.transposed)

    def value(self, w: torch.Tensor, rows: Rows, code: str) -> torch.Tensor:
        """``W + (s * B) @ A`` without the bound; ``w`` may be the stored block (promoted)."""
        return self.scaled_rows(rows, compute_dtype(code)).add_(w)

    def unscaled(self, dtype: torch.dtype) -> torch.Tensor:
        """``B @ A`` in its natural ``(out, in)`` orientation (never transposed), unscaled."""
        b, a = self.factors(dtype)
        return b @ a

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """``W + s * B @ A`` (transposed for Conv1D/embeddings) with :func:`lora_slack`."""
        delta, products = self.delta_rows(rows, w.dtype)
        bound = lora_slack(delta, w, products, self.settings.r, self.scale, code,
                           self.delta_ulps)
        if incoming is not None:
            bound.add_(incoming)
        return Step(w + delta, bound)

    def peft_delta(self) -> torch.Tensor:
        """Peft's ``get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) * scaling``.

        Computed into this thread's reusable scratch tensor when it fits (the same ops, so the
        same bits; no fresh pages to fault in per tensor). Valid until the next call.
        """
        import torch


        dtype = _lora_dtype(self.adapter, self.a_key)
        b, a = self.factors(dtype)
        scratch = workspace(b.shape[0] * a.shape[1], dtype)
        if scratch is None:
            product = b @ a
        else:
            product = torch.matmul(b, a, out=scratch.view(b.shape[0], a.shape[1]))
        product.mul_(self.scale)
        return product.T if self.transposed else product

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """Peft's ``Linear.merge``: ``weight.data += delta`` (one rounding, in place).

        For a half-precision weight torch computes ``fp32(W) + delta`` in a temporary fp32
        tensor and rounds it into ``W``; adding ``W`` into the (scratch) delta and copying back
        is the same arithmetic without the temporary.
        """
        delta = self.peft_delta()
        if delta.dtype == w.dtype:
            w += delta
            return w
        # torch would upcast W into a fresh temporary (a page fault per 4 KiB): use scratch
        upcast = workspace(w.numel(), delta.dtype, "weight")
        if upcast is None:
            w.copy_(delta.add_(w))
        else:
            upcast = upcast.view(w.shape)
            upcast.copy_(w)
            w.copy_(delta.add_(upcast))
        return w


class LoraEmbedding(LoraLinear):
    """LoRA on an ``Embedding``: ``lora_embedding_B @ lora_embedding_A``, transposed."""

    kind: ClassVar[str] = "lora-embedding"

    def rows_needed(self) -> int:
        """One row per embedding ``lora_embedding_A`` spans (more when the vocabulary grew)."""
        return int(self.adapter.tensors[self.a_key].shape[1])

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """Peft's ``Embedding.merge``: the delta is rounded to the stored dtype first."""
        w += self.peft_delta().to(w.dtype)
        return w


class LoraBias(Edit):
    """``lora_bias=True``: the trained ``lora_B.bias``, scaled, added to the base bias."""

    kind: ClassVar[str] = "lora-bias"
    additive: ClassVar[bool] = True
    scale: float

    def __init__(self, *args: Any, key: str, scale: LoraScale, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self.settings = scale
        self.scale = scale.value

    def check(self) -> None:
        """The bias has the base bias's shape."""
        shape = tuple(self.adapter.tensors[self.key].shape)
        if shape != self.info.shape:
            raise AdapterError(
                f"adapter module {self.module!r}: lora_B.bias has shape {list(shape)} but the"
                f" base bias {list(self.info.shape)}"
            )

    def describe(self) -> str:
        """``lora-bias scale=2``."""
        return f"{self.kind} scale={self.scale:g}"

    def alternatives(self) -> list[tuple[str, float]]:
        """See :meth:`LoraScale.alternatives`."""
        return self.settings.alternatives()

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """``b + s * lora_B.bias``: the delta may round to the stored dtype (1.5 ulp)."""
        delta = self.load(self.key, w.dtype)[rows] * self.scale
        u_c = compute_roundoff(code)
        bound = ulp(delta, code).mul_(DELTA_ULPS).add_(w.abs().add_(delta.abs()), alpha=2 * u_c)
        if incoming is not None:
            bound.add_(incoming)
        return Step(w + delta, bound)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """peft: ``bias.data += lora_B.bias * scaling``."""
        w += self.load(self.key, _lora_dtype(self.adapter, self.key)) * self.scale
        return w
