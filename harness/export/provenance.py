"""Provenance: was the export made from the merged model, the base, or a model merged twice.

With ``B`` the base, ``M`` the merged model and ``G`` the export's decoded values, the
retention ratio of a tensor is the least-squares slope of ``G - B`` on ``M - B``::

    r = <G - B, M - B> / ||M - B||^2

``r`` is 1 for a faithful export (quantization noise averages out), 0 for an export of the base
and 2 for an export of a model that received the adapter twice. Its standard error is the
heteroskedasticity-robust one of a regression through the origin, from the residuals
``e = (G - B) - r (M - B)``: ``sum(e^2 d^2) / (sum d^2)^2`` with ``d = M - B``, computed from five
running sums so that the tensors stream through once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from harness.evals.intervals import Interval, z_value

#: Targets a retention interval is judged against, and what each one means.
VERDICTS: dict[float, str] = {
    0.0: "converted from the base",
    1.0: "the merged model",
    2.0: "merged twice",
}
#: An interval lying within this distance of a target is that target.
BAND = 0.2


@dataclass
class Retention:
    """Running sums of the regression of ``G - B`` on ``d = M - B``, kept as ``u = G - M``.

    ``G - B = d + u``, so ``r = 1 + <u, d> / <d, d>`` and the residual is ``u - (r - 1) d``.
    Keeping ``u`` (zero for an exact export) instead of ``G - B`` spares the sums a
    cancellation: an exact export has exactly ``r = 1`` and a zero-width interval.
    """

    dd: float = 0.0
    ud: float = 0.0
    u2d2: float = 0.0
    ud3: float = 0.0
    d4: float = 0.0

    def add(self, u: np.ndarray, d: np.ndarray) -> None:
        """Accumulate elements: ``u = G - M`` and ``d = M - B`` (same shape, float32)."""
        u = np.ascontiguousarray(u, dtype=np.float32).ravel()
        d = np.ascontiguousarray(d, dtype=np.float32).ravel()
        d2 = d * d
        ud = u * d
        # float32 dot products (BLAS) per chunk, accumulated in float64 across chunks.
        self.dd += float(np.dot(d, d))
        self.ud += float(np.dot(u, d))
        self.u2d2 += float(np.dot(ud, ud))
        self.ud3 += float(np.dot(ud, d2))
        self.d4 += float(np.dot(d2, d2))

    def merge(self, other: Retention) -> None:
        """Add another part's sums."""
        self.dd += other.dd
        self.ud += other.ud
        self.u2d2 += other.u2d2
        self.ud3 += other.ud3
        self.d4 += other.d4

    @property
    def changed(self) -> bool:
        """Whether the merge changed any element (``M != B`` somewhere)."""
        return self.dd > 0.0

    def interval(self, confidence: float = 0.95) -> Interval:
        """The ratio with its confidence interval (nan when the merge changed nothing)."""
        if not self.changed:
            return Interval(math.nan, math.nan, math.nan)
        excess = self.ud / self.dd
        residual = self.u2d2 - 2.0 * excess * self.ud3 + excess * excess * self.d4
        half = z_value(confidence) * math.sqrt(max(residual, 0.0)) / self.dd
        ratio = 1.0 + excess
        return Interval(ratio, ratio - half, ratio + half)


def verdict(interval: Interval) -> float | None:
    """The target (0, 1 or 2) the interval lies within :data:`BAND` of, or None."""
    for target in VERDICTS:
        if interval.low >= target - BAND and interval.high <= target + BAND:
            return target
    return None


def decided(interval: Interval) -> bool:
    """Whether the interval is narrow enough to tell the targets apart."""
    return interval.high - interval.low <= 2 * BAND


def describe(interval: Interval, confidence: float) -> str:
    """``1.0003 (95% CI 0.9991..1.0015)``."""
    return (
        f"{interval.estimate:.4g} ({confidence:.0%} CI {interval.low:.4g}..{interval.high:.4g})"
    )


@dataclass
class Judgement:
    """What the per-tensor retention ratios say about the export as a whole."""

    #: The pooled ratio: the inverse-variance weighted mean of the decided tensors' ratios.
    interval: Interval
    #: Target (0, 1, 2; None: none of them) -> the tensors whose interval lies at it.
    targets: dict[float | None, list[str]] = field(default_factory=dict)
    #: Tensors whose interval is too wide to tell the targets apart.
    undecided: list[str] = field(default_factory=list)
    #: Every changed tensor's interval.
    tensors: dict[str, Interval] = field(default_factory=dict)

    @property
    def verdict(self) -> float | None:
        """The one target every decided tensor shares (None: none, or they disagree)."""
        found = list(self.targets)
        return found[0] if len(found) == 1 else None

    @property
    def mixed(self) -> bool:
        """Whether decided tensors point at different targets."""
        return len(self.targets) > 1


def judge(retentions: dict[str, Retention], confidence: float = 0.95) -> Judgement:
    """Judge every changed tensor, then the export.

    Tensors are judged one by one, and pooled by their inverse variance rather than by summing
    their statistics: one grossly damaged block (a values problem, which the values check
    reports) widens its own tensor's interval without pulling the others' verdict.
    """
    judgement = Judgement(Interval(math.nan, math.nan, math.nan))
    z = z_value(confidence)
    weights = 0.0
    weighted = 0.0
    for name, retention in retentions.items():
        if not retention.changed:
            continue
        interval = retention.interval(confidence)
        judgement.tensors[name] = interval
        if not decided(interval):
            judgement.undecided.append(name)
            continue
        judgement.targets.setdefault(verdict(interval), []).append(name)
        # A tensor re-encoded exactly has a zero-width interval: floor its error.
        error = max((interval.high - interval.low) / (2 * z), 1e-6)
        weights += 1.0 / error**2
        weighted += interval.estimate / error**2
    if weights:
        estimate = weighted / weights
        half = z / math.sqrt(weights)
        judgement.interval = Interval(estimate, estimate - half, estimate + half)
    return judgement
