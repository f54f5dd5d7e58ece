"""LoRA and its merge-time variants: rsLoRA, rank/alpha patterns, Conv1D, embeddings, bias, DoRA.

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

import math
from typing import TYPE_CHECKING, Any, ClassVar

from harness.adapter import pattern_key
from harness.deltas.base import (
    CONV1D_MODEL_TYPES,
    CONV1D_MODULES,
    Edit,
    Rows,
    Step,
    Target,
    oriented_rows,
    outer_norms,
)
from harness.errors import AdapterError, UnsupportedAdapterError
from harness.ulp import U32, compute_roundoff, gamma, ulp, unit_roundoff

if TYPE_CHECKING:
    import torch

    from harness.adapter import Adapter
    from harness.checkpoint import TensorInfo

#: LoRA variants peft merges with code of their own that the registry does not reproduce.
UNSUPPORTED_VARIANTS = {
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
}
#: How much a fault may be rounded away: the delta term allows the stored-dtype delta path.
DELTA_ULPS = 1.5


def _lora_dtype(adapter: Adapter, key: str) -> torch.dtype:
    """The dtype peft holds an adapter tensor in after loading: fp32 unless saved as fp64."""
    import torch

    return torch.float64 if adapter.tensors[key].dtype == "F64" else torch.float32


def fan_in_fan_out(
    target: Target, module: str, shape: tuple[int, ...], out_features: int, in_features: int
) -> bool:
    """Whether the base weight is stored ``(in, out)`` (transformers' ``Conv1D``).

    peft decides per module from its class (``Conv1D`` forces ``fan_in_fan_out=True``,
    ``nn.Linear`` forces False), whatever the config says. Without a model class the stored shape
    decides when it is not square; a square weight is a ``Conv1D`` exactly in the architectures
    that use one, for their projection modules.
    """
    direct = shape == (out_features, in_features)
    transposed = shape == (in_features, out_features)
    if direct and not transposed:
        return False
    if transposed and not direct:
        return True
    if not direct:
        raise AdapterError(
            f"adapter module {module!r}: the delta is {out_features}x{in_features} but the base"
            f" weight is {'x'.join(map(str, shape))}"
        )
    return target.model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_MODULES


class LoraScale:
    """The rank, alpha and scale peft uses for one module, and where they came from."""

    def __init__(
        self, config: dict[str, Any], module: str, *, alpha_key: str = "lora_alpha"
    ) -> None:
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        self.default_r = int(config.get("r", 8))
        self.default_alpha = float(config.get(alpha_key, 8))
        self.r_key = pattern_key(rank_pattern, module)
        self.alpha_key = pattern_key(alpha_pattern, module)
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

    def alternatives(self) -> list[tuple[str, float]]:
        """Wrong scales a faulty merger produces, as factors of the right one, with names.

        Specific causes come first (rsLoRA, patterns), generic factors after; causes that give
        the same factor are named together (with ``r = 4``, doubling is also ``sqrt(r)``).
        """
        s = self.value
        root = math.sqrt(self.r)
        found: list[tuple[str, float]] = [("sign flipped (delta subtracted)", -1.0)]
        if self.rslora:
            found.append(("rsLoRA ignored: alpha/r used instead of alpha/sqrt(r)", 1 / root))
        else:
            found.append(("rsLoRA scaling alpha/sqrt(r) used instead of alpha/r", root))
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
            ("scale off by sqrt(r)", root),
            ("scale off by 1/sqrt(r)", 1 / root),
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


def lora_slack(
    delta: torch.Tensor,
    w: torch.Tensor,
    products: torch.Tensor,
    rank: int,
    scale: float,
    code: str,
) -> torch.Tensor:
    """Bound on a correct merge's pre-rounding error for an additive low-rank delta.

    ``1.5 ulp(delta)``: the delta may be rounded to the stored dtype before the add (0.5 ulp), and
    when computed in the stored dtype its product and scaling round too (up to 1 ulp more);
    ``(γ_r(u32) + γ_r(u_c)) |s| sum_k |B_ik||A_kj|``: the rank-``r`` dot products accumulate in fp32
    in the merge and in the compute dtype in the reference (``products`` bounds the sum by
    Cauchy-Schwarz); ``2 u_c (|W| + |delta|)``: the fp32 add and the reference's own add.
    """
    u_c = compute_roundoff(code)
    slack = ulp(delta, code).mul_(DELTA_ULPS)
    slack.add_(products, alpha=(gamma(rank, U32) + gamma(rank + 1, u_c)) * abs(scale))
    slack.add_(w.abs().add_(delta.abs()), alpha=2 * u_c)
    return slack


class LoraLinear(Edit):
    """LoRA on a ``Linear`` or ``Conv1D`` weight."""

    kind: ClassVar[str] = "lora"
    additive: ClassVar[bool] = True

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

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in ``dtype``: ``(out, r)`` and ``(r, in)``."""
        return self.load(self.b_key, dtype), self.load(self.a_key, dtype)

    def scaled_rows(self, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        """Rows of ``(s * B) @ A`` in stored orientation: the reference delta.

        Scaling the ``(out, r)`` factor first saves a pass over the delta; the extra rounding is
        inside the ``γ`` term of :func:`lora_slack` (``r + 1`` roundings per element at most).
        """
        key = (self.b_key, ("scaled", dtype))
        scaled = self._cache.get(key)
        if scaled is None:
            scaled = self.load(self.b_key, dtype) * self.scale
            self._cache[key] = scaled
        return oriented_rows(scaled, self.load(self.a_key, dtype), rows, self.transposed)

    def delta_rows(self, rows: Rows, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the scaled delta in stored orientation, and the ``sum |B||A|`` bound."""
        b, a = self.factors(dtype)
        return self.scaled_rows(rows, dtype), outer_norms(b, a, rows, self.transposed)

    def value(self, w: torch.Tensor, rows: Rows, code: str) -> torch.Tensor:
        """``W + (s * B) @ A`` without the bound; ``w`` may be the stored block (promoted)."""
        from harness.ulp import compute_dtype

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
        bound = lora_slack(delta, w, products, self.settings.r, self.scale, code)
        if incoming is not None:
            bound.add_(incoming)
        return Step(w + delta, bound)

    def peft_delta(self) -> torch.Tensor:
        """Peft's ``get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) * scaling``.

        Computed into this thread's reusable scratch tensor when it fits (the same ops, so the
        same bits; no fresh pages to fault in per tensor). Valid until the next call.
        """
        import torch

        from harness.parallel import workspace

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
        from harness.parallel import workspace

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

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """Peft's ``Embedding.merge``: the delta is rounded to the stored dtype first."""
        w += self.peft_delta().to(w.dtype)
        return w


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

    def value(self, w: torch.Tensor, rows: Rows, code: str) -> torch.Tensor:
        """The renormalised value (DoRA has no cheaper path)."""
        from harness.ulp import compute_dtype

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


class LoraBias(Edit):
    """``lora_bias=True``: the trained ``lora_B.bias``, scaled, added to the base bias."""

    kind: ClassVar[str] = "lora-bias"
    additive: ClassVar[bool] = True

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


class LoraType:
    """The registry entry for ``peft_type == "LORA"``."""

    peft_type = "LORA"

    def plan(self, adapter: Adapter, index: int, target: Target) -> list[Edit]:
        """One edit per LoRA module (and per ``lora_B.bias`` and trainable-token set)."""
        from harness.deltas.tokens import token_rows

        config = adapter.config
        for key, name in UNSUPPORTED_VARIANTS.items():
            if config.get(key):
                raise UnsupportedAdapterError(
                    f"adapter type LORA with {name} is not verifiable by merge-harness"
                )
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower() == "mica":
            raise UnsupportedAdapterError(
                "adapter type LORA with MiCA (init_lora_weights='mica') is not verifiable by"
                " merge-harness"
            )
        edits: list[Edit] = []
        for module, roles in sorted(adapter.layout.modules.items()):
            unknown = sorted(set(roles) - _LORA_ROLES)
            if unknown:
                raise AdapterError(
                    f"adapter module {module!r}: unexpected tensor {unknown[0]} in a LORA adapter"
                )
            if "trainable_tokens_delta" in roles:
                edits += token_rows(adapter, index, target, module, roles["trainable_tokens_delta"],
                                    config.get("trainable_token_indices"))
            edits += self._module(adapter, index, target, module, roles)
        return edits

    def _module(
        self, adapter: Adapter, index: int, target: Target, module: str, roles: dict[str, str]
    ) -> list[Edit]:
        scale = LoraScale(adapter.config, module)
        edits: list[Edit] = []
        if "lora_A" in roles or "lora_B" in roles:
            if "lora_A" not in roles or "lora_B" not in roles:
                raise AdapterError(
                    f"adapter module {module!r}: lora_A without lora_B or vice versa"
                )
            a_key, b_key, embedding = roles["lora_A"], roles["lora_B"], False
        elif "lora_embedding_A" in roles or "lora_embedding_B" in roles:
            if "lora_embedding_A" not in roles or "lora_embedding_B" not in roles:
                raise AdapterError(
                    f"adapter module {module!r}: lora_embedding_A without lora_embedding_B"
                )
            a_key, b_key, embedding = roles["lora_embedding_A"], roles["lora_embedding_B"], True
        else:
            if "lora_magnitude_vector" in roles or "lora_B.bias" in roles:
                raise AdapterError(f"adapter module {module!r}: DoRA/bias tensors without lora_A")
            return edits
        a_info, b_info = adapter.tensors[a_key], adapter.tensors[b_key]
        if len(a_info.shape) != 2 or len(b_info.shape) != 2:
            raise UnsupportedAdapterError(
                f"adapter type LORA on a convolution ({module!r}) is not verifiable by"
                " merge-harness"
            )
        tensor = module + ".weight"
        base = target.resolve(tensor, module)
        info = target.tensors[base]
        if len(info.shape) != 2:
            raise UnsupportedAdapterError(
                f"adapter type LORA on a {len(info.shape)}-d weight ({module!r}) is not verifiable"
                " by merge-harness"
            )
        out_features, in_features = b_info.shape[0], a_info.shape[1]
        if embedding:
            # Embedding weights are (num_embeddings, dim) and the delta is (B @ A).T: the
            # orientation of a Conv1D.
            if info.shape != (in_features, out_features):
                raise AdapterError(
                    f"adapter module {module!r}: embedding delta is {in_features}x{out_features}"
                    f" but the base weight is {'x'.join(map(str, info.shape))} (resized"
                    " vocabulary?)"
                )
            transposed = True
        else:
            transposed = fan_in_fan_out(target, module, info.shape, out_features, in_features)
        common: dict[str, Any] = dict(a_key=a_key, b_key=b_key, scale=scale, transposed=transposed)
        if "lora_magnitude_vector" in roles:
            edits.append(LoraDora(adapter, module, tensor, base, info, index,
                                  magnitude_key=roles["lora_magnitude_vector"], **common))
        elif embedding:
            edits.append(LoraEmbedding(adapter, module, tensor, base, info, index, **common))
        else:
            edits.append(LoraLinear(adapter, module, tensor, base, info, index, **common))
        if "lora_B.bias" in roles:
            bias = module + ".bias"
            if bias not in target.tensors:
                raise AdapterError(
                    f"adapter module {module!r}: lora_bias=True but the base has no {bias!r}"
                    " (peft cannot merge it either)"
                )
            edits.append(LoraBias(adapter, module, bias, bias, target.tensors[bias], index,
                                  key=roles["lora_B.bias"], scale=scale))
        return edits


_LORA_ROLES = frozenset(
    {
        "lora_A", "lora_B", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
        "lora_magnitude_vector", "trainable_tokens_delta",
    }
)
