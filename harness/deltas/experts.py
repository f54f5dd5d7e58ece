"""LoRA on ``nn.Parameter`` targets (``target_parameters``): fused MoE experts and routers.

peft 0.21's ``lora.ParamWrapper`` adapts one parameter of a module. For a 3-d expert stack of
shape ``(E, d1, d2)`` it holds ``lora_A`` as ``(r*E, in)`` (expert-major: rows ``e*r..e*r+r`` are
expert ``e``'s) and ``lora_B`` as ``(out, r*E)`` (rank-major: column ``k*E + e`` is expert ``e``'s
``k``-th), and ``get_delta_weight`` computes

* ``einsum("o r e, e r i -> e o i", B, A) * s`` when the stack is stored ``(E, out, in)``
  (Qwen3-MoE, Mixtral, OLMoE...: peft swaps its in/out features), or
* ``einsum("o r e, e r i -> e i o", B, A) * s`` when it is stored ``(E, in, out)`` (experts with
  ``is_transposed``, such as gpt-oss),

casts it to the parameter's dtype (one rounding) and adds it in that dtype (a second). A 2-d
parameter (Mixtral's router ``gate.weight``) gets ``B @ A * s``, rounded and added the same way.
Several parameters of one module nest: the first declared is the innermost wrapper, its keys
carry one ``base_layer`` per wrapper around it.

Edits are per *stored* tensor (see :mod:`harness.deltas.layouts`): a fused stack is one edit
whose rows are experts; a per-expert layout gives one edit per expert and fused part, each
verified exactly against that expert's own factors, so a merge that skips experts is seen
expert by expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from harness.architectures import TRANSPOSED_EXPERT_MODEL_TYPES
from harness.deltas.base import Edit, Rows, Step, Target, outer_norms
from harness.deltas.layouts import Piece, StoredLayout
from harness.deltas.lowrank import LoraLinear, LoraScale, lora_slack
from harness.errors import AdapterError, UnsupportedAdapterError
from harness.ulp import compute_dtype

if TYPE_CHECKING:
    import torch

    from harness.io.adapter import Adapter
    from harness.io.safetensors import TensorInfo


def expert_factors(
    b: torch.Tensor, a: torch.Tensor, experts: int, expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``expert``'s ``(B_e, A_e)``: ``(out, r)`` and ``(r, in)`` from peft's layouts."""
    rank = a.shape[0] // experts
    a_e = a.reshape(experts, rank, a.shape[-1])[expert]  # (r, in)
    b_e = b.reshape(b.shape[0], rank, experts)[:, :, expert]  # (out, r)
    return b_e, a_e


def peft_expert_delta(
    b: torch.Tensor, a: torch.Tensor, experts: int, scale: float, swapped: bool,
    only: int | None = None,
) -> torch.Tensor:
    """``ParamWrapper.get_delta_weight`` for a 3-d stack (before the cast): ``(E, d1, d2)``.

    With ``only``, the same einsum on that one expert's slices: ``(1, d1, d2)``.
    """
    import torch

    rank = a.shape[0] // experts
    a3 = a.reshape(experts, rank, a.shape[-1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], rank, experts)  # (out, r, E)
    if only is not None:
        a3, b3 = a3[only:only + 1], b3[:, :, only:only + 1]
    if swapped:
        return torch.einsum("o r e, e r i -> e o i", b3, a3) * scale
    return torch.einsum("o r e, e r i -> e i o", b3, a3) * scale


def _check_rank(edit: Any) -> None:
    """``lora_A`` holds ``r`` rows and ``lora_B`` ``r`` columns per expert."""
    rank_a = edit.adapter.tensors[edit.a_key].shape[0]
    rank_b = edit.adapter.tensors[edit.b_key].shape[-1]
    if rank_a != rank_b or rank_a != edit.settings.r * edit.experts:
        source = f"rank_pattern[{edit.settings.r_key!r}]" if edit.settings.r_key else "r"
        raise AdapterError(
            f"adapter parameter {edit.parameter!r}: lora_A has {rank_a} rows and lora_B"
            f" {rank_b} columns, but {edit.experts} expert(s) at {source}={edit.settings.r}"
            f" need {edit.settings.r * edit.experts}"
        )


class _ParamEdit(LoraLinear):
    """Shared by parameter targets: peft rounds the delta to the stored dtype, then adds."""

    def __init__(self, *args: Any, parameter: str, experts: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The transformers 5 parameter adapted (``model.layers.0.mlp.experts.gate_up_proj``).
        self.parameter = parameter
        #: Experts in the parameter (1 for a 2-d parameter).
        self.experts = experts

    def check(self) -> None:
        """``lora_A`` holds ``r`` rows and ``lora_B`` ``r`` columns per expert."""
        _check_rank(self)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """``param.data += get_delta_weight(...)``: the delta rounded to ``w``'s dtype first."""
        w += self.peft_delta().to(w.dtype)
        return w


class ParamLora(_ParamEdit):
    """LoRA on a 2-d parameter (a router's ``weight``): ``B @ A * s``, rounded, added."""

    kind: ClassVar[str] = "lora-param"

    def describe(self) -> str:
        """``lora-param r=8 ... (target_parameters)``."""
        return f"{self.kind} {self.settings.describe()} (target_parameters)"


class ExpertLora(_ParamEdit):
    """One expert's delta (or the rows of one fused part of it) on a per-expert stored tensor."""

    kind: ClassVar[str] = "lora-expert"

    def __init__(self, *args: Any, expert: int, rows: slice, swapped: bool,
                 **kwargs: Any) -> None:
        super().__init__(*args, transposed=not swapped, **kwargs)
        self.expert = expert
        self.rows = rows
        self.swapped = swapped

    def describe(self) -> str:
        """``lora-expert r=8 ... expert 3/8 rows 0:24 of <parameter>``."""
        return (
            f"{self.kind} {self.settings.describe()} expert {self.expert}/{self.experts} rows"
            f" {self.rows.start}:{self.rows.stop} of {self.parameter}"
        )

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's ``(B_e, A_e)``, cut to the stored part's rows.

        Stored ``(out, in)`` (swapped) the part's rows are rows of ``B_e``; stored ``(in, out)``
        they are columns of ``A_e`` (the delta is transposed).
        """
        b_e, a_e = expert_factors(self.held(self.b_key, dtype), self.held(self.a_key, dtype),
                                  self.experts, self.expert)
        if self.swapped:
            return b_e[self.rows], a_e
        return b_e, a_e[:, self.rows]

    def peft_delta(self) -> torch.Tensor:
        """The einsum of peft restricted to this expert, then the stored part's rows."""
        dtype = _adapter_dtype(self.adapter, self.a_key)
        delta = peft_expert_delta(self.load(self.b_key, dtype), self.load(self.a_key, dtype),
                                  self.experts, self.scale, self.swapped, only=self.expert)
        return delta[0][self.rows]


class FusedExpertLora(Edit):
    """LoRA on a stored ``(E, d1, d2)`` expert stack: the oracle's rows are experts."""

    kind: ClassVar[str] = "lora-experts"
    additive: ClassVar[bool] = True
    scale: float

    def __init__(self, *args: Any, a_key: str, b_key: str, scale: LoraScale, parameter: str,
                 experts: int, swapped: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.a_key, self.b_key = a_key, b_key
        self.settings = scale
        self.scale = scale.value
        self.rank = scale.r
        self.parameter = parameter
        self.experts = experts
        self.swapped = swapped
        self.transposed = not swapped

    def check(self) -> None:
        """``lora_A`` holds ``r`` rows and ``lora_B`` ``r`` columns per expert."""
        _check_rank(self)

    def describe(self) -> str:
        """``lora-experts r=8 ... 8 experts``."""
        return f"{self.kind} {self.settings.describe()} {self.experts} experts"

    def alternatives(self) -> list[tuple[str, float]]:
        """See :meth:`LoraScale.alternatives`."""
        return self.settings.alternatives()

    def expert_delta(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's scaled delta ``(d1, d2)`` and its ``sum |B||A|`` bound."""
        b_e, a_e = expert_factors(self.load(self.b_key, dtype), self.load(self.a_key, dtype),
                                  self.experts, expert)
        if self.swapped:
            # (d1, r) @ (r, d2)
            return (b_e * self.scale) @ a_e, outer_norms(b_e, a_e, slice(None), False)
        # ((d2, r) @ (r, d1)).T
        return ((b_e * self.scale) @ a_e).T, outer_norms(b_e, a_e, slice(None), True)

    def _deltas(self, rows: Rows, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        numbers = range(*rows.indices(self.experts)) if isinstance(rows, slice) else rows.tolist()
        pairs = [self.expert_delta(int(e), dtype) for e in numbers]
        return torch.stack([d for d, _ in pairs]), torch.stack([p for _, p in pairs])

    def reference(
        self, w: torch.Tensor, incoming: torch.Tensor | None, rows: Rows, code: str
    ) -> Step:
        """``W[e] + s * B_e @ A_e`` per expert with :func:`lora_slack`."""
        delta, products = self._deltas(rows, w.dtype)
        bound = lora_slack(delta, w, products, self.settings.r, self.scale, code)
        if incoming is not None:
            bound.add_(incoming)
        return Step(w + delta, bound)

    def value(self, w: torch.Tensor, rows: Rows, code: str) -> torch.Tensor:
        """``W[e] + s * B_e @ A_e`` without the bound."""
        delta, _ = self._deltas(rows, compute_dtype(code))
        return delta.add_(w)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """``param.data += get_delta_weight(...)`` with peft's einsum, rounded to ``w``'s dtype."""
        dtype = _adapter_dtype(self.adapter, self.a_key)
        delta = peft_expert_delta(self.load(self.b_key, dtype), self.load(self.a_key, dtype),
                                  self.experts, self.scale, self.swapped)
        w += delta.to(w.dtype)
        return w


def _adapter_dtype(adapter: Adapter, key: str) -> torch.dtype:
    import torch

    return torch.float64 if adapter.tensors[key].dtype == "F64" else torch.float32


# ---- planning ----------------------------------------------------------------------------


def _matches(key: str, targets: list[str]) -> bool:
    """The test of peft: the full parameter name is a target or ends with ``.<target>``."""
    return any(key == t or key.endswith("." + t) for t in targets)


def parameter_modules(adapter: Adapter, layout: StoredLayout) -> dict[str, tuple[str, list[str]]]:
    """Adapter module (with its ``base_layer`` nesting) -> its container and candidate names.

    The candidates are the ``target_parameters`` that name a stored parameter of the container
    (bare names such as ``down_proj`` match any container, so only parameters the base holds
    count); which one a nesting depth holds is decided by the factors' shapes (the declaration
    order peft nests by is not in the checkpoint), and a tie is refused rather than guessed.
    """
    targets = [str(t) for t in adapter.config.get("target_parameters") or []]
    if not targets:
        return {}
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    found: dict[str, tuple[str, list[str]]] = {}
    for module, roles in adapter.layout.modules.items():
        if "lora_A" not in roles:
            continue
        container = ".".join(p for p in module.split(".") if p != "base_layer")
        candidates = [
            n for n in names
            if _matches(f"{container}.{n}", targets) and layout.shape(f"{container}.{n}")
        ]
        if candidates:
            found[module] = (container, candidates)
    return found


def _orientation(parameter: str, shape: tuple[int, ...], out: int, inp: int,
                 model_type: str) -> bool:
    """Whether a 3-d stack ``(E, d1, d2)`` is adapted swapped (``delta_e = B_e @ A_e``)."""
    d1, d2 = shape[1], shape[2]
    direct, flipped = (out, inp) == (d1, d2), (out, inp) == (d2, d1)
    if direct and flipped:
        return model_type not in TRANSPOSED_EXPERT_MODEL_TYPES
    if direct or flipped:
        return direct
    raise AdapterError(
        f"adapter parameter {parameter!r}: lora_B x lora_A is {out}x{inp} per expert but the"
        f" experts are {d1}x{d2}"
    )


def _fits(adapter: Adapter, roles: dict[str, str], shape: tuple[int, ...]) -> bool:
    out, rank_e = adapter.tensors[roles["lora_B"]].shape
    rank_a, inp = adapter.tensors[roles["lora_A"]].shape
    if rank_e != rank_a:
        return False
    if len(shape) == 2:
        return (out, inp) == shape
    if len(shape) == 3 and rank_a % shape[0] == 0:
        return (out, inp) in ((shape[1], shape[2]), (shape[2], shape[1]))
    return False


def plan_parameters(adapter: Adapter, index: int, target: Target) -> tuple[list[Edit], set[str]]:
    """The edits of every ``target_parameters`` LoRA, and the adapter modules they cover."""
    if not adapter.config.get("target_parameters"):
        return [], set()  # without reading the layout (it imports transformers)
    layout = target.layout
    edits: list[Edit] = []
    covered: set[str] = set()
    for module, (container, names) in sorted(parameter_modules(adapter, layout).items()):
        roles = adapter.layout.modules[module]
        if "lora_B" not in roles:
            raise AdapterError(f"adapter module {module!r}: lora_A without lora_B")
        fitting = []
        for name in names:
            shape = layout.shape(f"{container}.{name}")
            if shape is not None and _fits(adapter, roles, shape):
                fitting.append((f"{container}.{name}", shape))
        if not fitting:
            raise AdapterError(
                f"adapter module {module!r}: no parameter of {container!r} named by"
                f" target_parameters ({', '.join(names)}) is stored in the base with"
                " the adapter's shapes"
            )
        if len(fitting) > 1:
            raise UnsupportedAdapterError(
                f"adapter module {module!r}: the factors fit {', '.join(p for p, _ in fitting)}"
                " alike; merge-harness cannot tell which parameter this nesting level adapts"
            )
        parameter, shape = fitting[0]
        edits += _parameter_edits(adapter, index, target, module, roles, parameter, shape,
                                  layout)
        covered.add(module)
    return edits, covered


def _parameter_edits(
    adapter: Adapter, index: int, target: Target, module: str, roles: dict[str, str],
    parameter: str, shape: tuple[int, ...], layout: StoredLayout,
) -> list[Edit]:
    scale = LoraScale(adapter.config, parameter)
    common: dict[str, Any] = dict(a_key=roles["lora_A"], b_key=roles["lora_B"], scale=scale)
    pieces = layout.pieces(parameter)
    if len(shape) == 2:
        [piece] = pieces
        info = target.tensors[piece.stored]
        return [ParamLora(adapter, module, piece.stored, piece.stored, info, index,
                          transposed=False, parameter=parameter, **common)]
    experts = shape[0]
    out = adapter.tensors[roles["lora_B"]].shape[0]
    inp = adapter.tensors[roles["lora_A"]].shape[1]
    swapped = _orientation(parameter, shape, out, inp, target.model_type)
    if len(pieces) == 1 and pieces[0].expert is None:
        stored = pieces[0].stored
        return [FusedExpertLora(adapter, module, stored, stored, target.tensors[stored], index,
                                parameter=parameter, experts=experts, swapped=swapped,
                                **common)]
    _complete(parameter, pieces, experts)
    return [
        ExpertLora(adapter, module, p.stored, p.stored, _info(target, p), index,
                   parameter=parameter, experts=experts, expert=int(p.expert or 0),
                   rows=p.rows, swapped=swapped, **common)
        for p in pieces
    ]


def _info(target: Target, piece: Piece) -> TensorInfo:
    return target.tensors[piece.stored]


def _complete(parameter: str, pieces: list[Piece], experts: int) -> None:
    """Every expert holds every part: a per-expert layout with holes is not the parameter."""
    parts = {(p.rows.start, p.rows.stop) for p in pieces}
    have = {(p.expert, p.rows.start, p.rows.stop) for p in pieces}
    missing = sorted(e for e in range(experts) for r in parts if (e, *r) not in have)
    if missing:
        raise AdapterError(
            f"parameter {parameter!r}: the base stores no tensor for expert(s)"
            f" {sorted(set(missing))[:8]} of {experts}"
        )
