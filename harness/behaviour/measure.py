"""Measuring behaviour: the merged model's outputs against the reference, within rounding noise.

The models (M, A, R and the twin T) are described in ``behaviour.models``. On a probe input
each model's deviation from R is measured over the non-padded positions (max and mean
``|Δlogit|``, KL divergence, top-1/top-k agreement). A merge is correct when M is no
further from R than rounding noise, and A's and T's deviations *are* rounding noise. So the
check passes a probe when::

    max|M-R|  <= C_MAX  * max(max|A-R|,  max|T-R|,  noise_max)  + eps(C) * max|R|
    mean|M-R| <= C_MEAN * max(mean|A-R|, mean|T-R|, noise_mean) + eps(C) * max|R|

``noise_*`` are the larger of A's and T's deviations on a fixed full-size calibration probe (the
noise on one short input can be very small by chance; the calibration floor keeps the ratio
meaningful), and the last term is one unit of the comparison dtype at the logit scale (so equal
outputs always pass). T runs on a probe only when M fails without it: T can only raise the
bound, so the verdict is the same. ``C_MAX`` and ``C_MEAN`` were calibrated on thousands of
probes of correct merges (see ``CALIBRATION``); they are printed with every result. Hypothesis
draws the probes (``--merge-examples``, derandomised) and shrinks a failure to a minimal input,
which the message shows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.behaviour.batch import Ran, outputs, routed, run_routed
from harness.behaviour.models import (
    TOLERANCE,
    adapter_model,
    merged_model,
    reference_model,
    setup,
    twin_model,
)
from harness.behaviour.probe import ProbeInput
from harness.behaviour.routing import Bound, Rerouting, count, rerouted, share
from harness.dtypes import MANTISSA_BITS
from harness.forward.stream import StreamedModel
from harness.run.context import Context, Key

if TYPE_CHECKING:
    import torch

#: M's outputs on the calibration probe (``loads`` and the tolerance share them).
MERGED_CALIBRATION: Key[torch.Tensor] = Key("behaviour:merged-calibration")

#: Allowed ratio of M's max |Δlogit| to the noise's (see CALIBRATION).
C_MAX = 11.0
#: Allowed ratio of M's mean |Δlogit| to the noise's (see CALIBRATION).
C_MEAN = 9.0
#: How the constants were obtained (printed in the details of every result).
CALIBRATION = (
    "C_MAX, C_MEAN: at least 1.5x the largest ratios seen on correct tiny merges (6"
    " architectures; fp32, bf16, fp16; LoRA, rsLoRA, DoRA, patterns, modules_to_save), each"
    " merge's probes measured together in one streamed pass per model: 6.42, 2.89 on 4000"
    " probes of 451 merges compared"
    " in the stored dtype (benchmarks/behaviour_calibration.py --merges 400 --seed 1 --compare"
    " stored; the default for bf16 on CPUs with native bf16); 5.66, 3.44 on 1500 probes of 169"
    " merges in the fp32 CPU default (--merges 150 --probes 10 --seed 1)"
)
#: k of the top-k agreement figure.
TOP_K = 5
#: Outputs that are probability logits (KL and top-k apply); hidden states are compared by value.
_PROBABILISTIC = frozenset(
    {"CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "MASKED_LM", "QUESTION_ANS", "SEQ_2_SEQ_LM"}
)

# ---- measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Deviation:
    """How far one model's outputs are from the reference's on one probe."""

    max_abs: float
    mean_abs: float
    kl_mean: float | None = None
    kl_max: float | None = None
    top1: float | None = None
    topk: float | None = None

    def to_json(self) -> dict[str, float | None]:
        """JSON-able figures."""
        return {k: round_figure(v) for k, v in self.__dict__.items()}


def round_figure(value: float | None) -> float | None:
    """Four significant digits for reports (non-finite values kept as they are)."""
    if value is None:
        return None
    if not math.isfinite(value):
        return value
    return float(f"{value:.4g}")


def deviation(values: torch.Tensor, reference: torch.Tensor, probabilistic: bool) -> Deviation:
    """|Δ| statistics, and for logits KL(R || x) and top-1 / top-k agreement, over rows."""
    import torch

    diff = (values - reference).abs()
    finite = bool(torch.isfinite(values).all())
    max_abs = float(diff.max()) if finite else math.inf
    mean_abs = float(diff.mean()) if finite else math.inf
    if not probabilistic or not finite:
        return Deviation(max_abs, mean_abs)
    log_r = torch.log_softmax(reference, dim=-1)
    log_x = torch.log_softmax(values, dim=-1)
    # KL(R || x) per row: sum_j p_R (log p_R - log p_x)
    kl = (log_r.exp() * (log_r - log_x)).sum(dim=-1).clamp_min(0.0)
    k = min(TOP_K, reference.shape[-1])
    top_r = reference.topk(k, dim=-1).indices
    top_x = values.topk(k, dim=-1).indices
    top1 = float((top_r[:, 0] == top_x[:, 0]).double().mean())
    # fraction of R's top-k tokens that x also ranks in its top-k
    overlap = (top_r.unsqueeze(-1) == top_x.unsqueeze(-2)).any(-1).double().mean()
    return Deviation(max_abs, mean_abs, float(kl.mean()), float(kl.max()), top1, float(overlap))


def deviation_at(
    values: torch.Tensor,
    reference: torch.Tensor,
    flipped: torch.Tensor | None,
    probabilistic: bool,
) -> Deviation:
    """:func:`deviation` over the rows not ``flipped`` (routed differently from R).

    ``flipped`` None (no routing known) keeps every row; no row left gives a zero deviation.
    """
    if flipped is None or not bool(flipped.any()):
        return deviation(values, reference, probabilistic)
    kept = ~flipped
    if not bool(kept.any()):
        return Deviation(0.0, 0.0)
    return deviation(values[kept], reference[kept], probabilistic)


@dataclass(frozen=True)
class Tolerance:
    """The pass rule: M's deviation within ``c`` times A's (floored by calibration) plus a ULP."""

    c_max: float
    c_mean: float
    noise_max: float
    noise_mean: float
    eps: float
    #: which model's deviation on which probe set the noise floor
    source: str = "the adapter model on the calibration probe"
    #: how many positions may be routed differently (None: a model without routers read)
    routing: Bound | None = None

    def limits(self, noise: Deviation, scale: float) -> tuple[float, float]:
        """Allowed max and mean |Δ| of M on a probe whose own rounding noise is ``noise``."""
        return (
            self.max_allowed(noise.max_abs, scale),
            self.c_mean * max(noise.mean_abs, self.noise_mean) + self.eps * scale,
        )

    def max_allowed(self, noise_max: float, scale: float) -> float:
        """Allowed max |Δ| where the noise's max |Δ| is ``noise_max`` and R's max |R| ``scale``."""
        return self.c_max * max(noise_max, self.noise_max) + self.eps * scale

    def describe(self) -> str:
        """The rule with its figures."""
        return (
            f"allowed: max|M-R| <= {self.c_max:g} x max(max|A-R|, max|T-R|, {self.noise_max:.3g})"
            f" + eps x max|R|, mean|M-R| <= {self.c_mean:g} x max(mean|A-R|, mean|T-R|,"
            f" {self.noise_mean:.3g}) + eps x max|R| (eps = {self.eps:.3g}; T the twin, run on a"
            f" probe only where it can change the verdict); noise floor from {self.source}"
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able figures (``routing`` only for a model whose routers were read)."""
        found: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if isinstance(v, Bound):
                found[k] = v.to_json()
            elif v is not None:
                found[k] = v if isinstance(v, str) else float(v)
        return found


@dataclass(frozen=True)
class Figures:
    """One probe's measurement and verdict."""

    probe: ProbeInput
    merged: Deviation
    adapter: Deviation
    scale: float
    allowed_max: float
    allowed_mean: float
    #: the twin's deviation, measured only when M exceeded the allowance without it
    twin: Deviation | None = None
    #: positions routed differently from R (None: a model without routers read)
    routing: Rerouting | None = None

    @property
    def noise(self) -> Deviation:
        """The probe's own rounding noise: the larger of A's and the twin's deviations."""
        if self.twin is None:
            return self.adapter
        return Deviation(
            max(self.adapter.max_abs, self.twin.max_abs),
            max(self.adapter.mean_abs, self.twin.mean_abs),
        )

    @property
    def ok(self) -> bool:
        """Whether M is within tolerance on this probe (NaN never is)."""
        routed = self.routing is None or self.routing.ok
        return (
            self.merged.max_abs <= self.allowed_max
            and self.merged.mean_abs <= self.allowed_mean
            and routed
        )

    @property
    def ratio(self) -> float:
        """How much of the |Δ| allowance M uses (>1 fails), or of the routing one when exceeded."""
        ratios = [
            ratio_of(self.merged.max_abs, self.allowed_max),
            ratio_of(self.merged.mean_abs, self.allowed_mean),
        ]
        # rerouted positions count only when too many: one near-tie on a short probe uses its
        # whole routing allowance, which says nothing about the |Δ| margin of a passing probe
        if self.routing is not None and not self.routing.ok:
            ratios.append(ratio_of(self.routing.merged, self.routing.allowed))
        return max(ratios)

    def explain(self) -> str:
        """The figures of this probe in one line."""
        return (
            f"max|M-R| {self.merged.max_abs:.3g} (allowed {self.allowed_max:.3g}; A"
            f" {self.adapter.max_abs:.3g}{self._twin('max_abs')}), mean|M-R|"
            f" {self.merged.mean_abs:.3g} (allowed {self.allowed_mean:.3g}; A"
            f" {self.adapter.mean_abs:.3g}{self._twin('mean_abs')}), logit scale"
            f" {self.scale:.3g}"
            + _agreement(self.merged, self.adapter)
            + ("" if self.routing is None else f"; {self.routing.describe()}")
        )

    def _twin(self, figure: str) -> str:
        return "" if self.twin is None else f", twin {getattr(self.twin, figure):.3g}"


def _agreement(merged: Deviation, adapter: Deviation) -> str:
    if merged.top1 is None or adapter.top1 is None:
        return ""
    return (
        f", top-1 agreement {merged.top1:.1%} (A {adapter.top1:.1%}), KL"
        f" {merged.kl_mean or 0:.2g} (A {adapter.kl_mean or 0:.2g})"
    )


def ratio_of(value: float, allowed: float) -> float:
    """How much of ``allowed`` ``value`` uses (NaN uses infinitely much)."""
    if math.isnan(value):
        return math.inf
    if allowed <= 0:
        return 0.0 if value <= 0 else math.inf
    return value / allowed


def merged_calibration(ctx: Context) -> torch.Tensor:
    """M's outputs on the calibration probe (computed once: ``loads`` and the tolerance share)."""
    s = setup(ctx)
    return ctx.memo(
        MERGED_CALIBRATION,
        lambda: outputs(merged_model(ctx), s.space.calibration_probe(), s.task, s.space),
    )


def tolerance(ctx: Context) -> Tolerance:
    """The calibrated tolerance of this run (its noise floor measured once per context).

    The floor is the larger of two deviations from R on the calibration probe: A's (its
    rounding noise in the compare dtype; zero in an upcast comparison, where A is R) and the
    twin's, a correct merge of A stored in the stored dtype. The twin carries the one rounding
    A never does, that of the merged weights themselves: with an adapter much larger than the
    weights it merges into, that rounding can exceed A's compute noise even in fp32. (The
    equivalence search measures R's and A's calibration outputs in its first pass, beside its
    first probes: :meth:`Comparer.measure_all`.)
    """

    def measure() -> Tolerance:
        s = setup(ctx)
        calibration = s.space.calibration_probe()
        ref = routed(reference_model(ctx), calibration, s.task, s.space)
        adapter = None if s.upcast else routed(adapter_model(ctx), calibration, s.task, s.space)
        return calibrated(ctx, ref, adapter)

    result: Tolerance = ctx.memo(TOLERANCE, measure)
    return result


def calibrated(ctx: Context, ref: Ran, adapter: Ran | None) -> Tolerance:
    """The tolerance from R's and A's outputs on the calibration probe (the twin runs here).

    Outputs are float64. For an MoE model the positions each model routed differently from R
    are left out of its deviation, and the larger share of them sets the routing bound.
    """
    s = setup(ctx)
    probabilistic = s.task in _PROBABILISTIC
    calibration = s.space.calibration_probe()
    runs = [routed(twin_model(ctx), calibration, s.task, s.space)]
    source = f"a correct merge stored in {s.stored} (the twin)"
    if adapter is not None:
        runs.append(adapter)
        source = f"the larger of the adapter model's and {source}'s"
    source += " deviation on the calibration probe"
    flips = [rerouted(run.routes, ref.routes) for run in runs]
    noises = [
        deviation_at(run.values, ref.values, flipped, probabilistic)
        for run, flipped in zip(runs, flips, strict=True)
    ]
    bound = None
    if ref.routes is not None and ref.routes.shape[-1] > 0:
        bound = Bound(max(share(f) for f in flips))

    def largest(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return max(finite, default=0.0)

    return Tolerance(
        C_MAX,
        C_MEAN,
        largest([n.max_abs for n in noises]),
        largest([n.mean_abs for n in noises]),
        2.0 ** -MANTISSA_BITS[s.compare],
        source,
        bound,
    )


class Comparer:
    """Runs M, A and R on probes and judges each against the calibrated tolerance.

    :meth:`measure_all` runs a whole list of probes in one forward pass per model (one read of
    each model's weights); figures are remembered per probe, so a probe seen before (hypothesis
    repeats some while shrinking) costs nothing.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.setup = setup(ctx)
        self.merged = merged_model(ctx)
        self.adapter = adapter_model(ctx)
        self.reference = reference_model(ctx)
        self.probabilistic = self.setup.task in _PROBABILISTIC
        self.calibration = self.setup.space.calibration_probe()
        self.seen: dict[ProbeInput, Figures] = {}

    @property
    def tolerance(self) -> Tolerance:
        """The calibrated tolerance (measured by its own passes if no search measured it)."""
        return tolerance(self.ctx)

    def run(self, model: StreamedModel, probe: ProbeInput) -> torch.Tensor:
        """One model's outputs on ``probe`` (float64, non-padded positions)."""
        return outputs(model, probe, self.setup.task, self.setup.space)

    def run_all(self, model: StreamedModel, probes: Sequence[ProbeInput]) -> list[Ran]:
        """One model's outputs (and routing) on each of ``probes``, in one pass (model dtype)."""
        return run_routed(model, probes, self.setup.task, self.setup.space)

    def measure(self, probe: ProbeInput) -> Figures:
        """M's and A's deviations from R on ``probe``, and the verdict."""
        return self.measure_all([probe])[0]

    def measure_all(self, probes: Sequence[ProbeInput]) -> list[Figures]:
        """Figures for each of ``probes``: one pass of M, R (and A), the twin only if needed."""
        todo = list(dict.fromkeys(p for p in probes if p not in self.seen))
        if todo:
            # the first pass of R and A also measures the calibration probe, if not done yet
            calibrate = not self.ctx.known(TOLERANCE)
            extra = [self.calibration] if calibrate else []
            # outputs stay in their models' dtypes until each probe is measured (float64 copies of
            # a whole pass's logits would double what the pass holds)
            refs = self.run_all(self.reference, extra + todo)
            # A is R in an upcast comparison: its deviation is zero without a second pass
            upcast = self.adapter is self.reference
            adapter = refs if upcast else self.run_all(self.adapter, extra + todo)
            if calibrate:
                ref_c, refs = refs[0], refs[1:]
                adapter_c, adapter = adapter[0], adapter[1:]
                self.ctx.seed(
                    TOLERANCE,
                    calibrated(self.ctx, ref_c.widened(), None if upcast else adapter_c.widened()),
                )
            merged = self.run_all(self.merged, todo)
            judged = [
                self._judge(p, r, m, a)
                for p, r, m, a in zip(todo, refs, merged, adapter, strict=True)
            ]
            # Only a larger noise can turn a failing verdict: measure the twin's on those probes
            # (on a correct merge this is rare, so the search costs two or three passes a batch)
            retry = [
                i for i, f in enumerate(judged) if not f.ok and math.isfinite(f.merged.max_abs)
            ]
            if retry:
                twins = self.run_all(twin_model(self.ctx), [todo[i] for i in retry])
                for i, twin in zip(retry, twins, strict=True):
                    judged[i] = self._with_twin(judged[i], twin, refs[i])
            self.seen.update(zip(todo, judged, strict=True))
        return [self.seen[p] for p in probes]

    def _judge(self, probe: ProbeInput, ref: Ran, merged: Ran, adapter: Ran) -> Figures:
        import torch

        r = ref.values.to(torch.float64)
        m_flips = rerouted(merged.routes, ref.routes)
        a_flips = rerouted(adapter.routes, ref.routes)
        m = deviation_at(merged.values.to(r.dtype), r, m_flips, self.probabilistic)
        a = deviation_at(adapter.values.to(r.dtype), r, a_flips, self.probabilistic)
        scale = float(r.abs().max()) if r.numel() else 0.0
        routing = None
        bound = self.tolerance.routing
        if bound is not None and m_flips is not None:
            positions = int(m_flips.numel())
            a_count = count(a_flips)
            routing = Rerouting(
                positions, count(m_flips), a_count, bound.allowed(positions, a_count)
            )
        return Figures(probe, m, a, scale, *self.tolerance.limits(a, scale), routing=routing)

    def _with_twin(self, figures: Figures, twin: Ran, ref: Ran) -> Figures:
        import torch

        r = ref.values.to(torch.float64)
        flips = rerouted(twin.routes, ref.routes)
        t = deviation_at(twin.values.to(r.dtype), r, flips, self.probabilistic)
        routing = figures.routing
        bound = self.tolerance.routing
        if routing is not None and bound is not None:
            t_count = count(flips)
            allowed = bound.allowed(routing.positions, max(routing.adapter, t_count))
            routing = dataclasses.replace(routing, twin=t_count, allowed=allowed)
        figures = dataclasses.replace(figures, twin=t, routing=routing)
        allowed_max, allowed_mean = self.tolerance.limits(figures.noise, figures.scale)
        return dataclasses.replace(figures, allowed_max=allowed_max, allowed_mean=allowed_mean)
