"""Confidence intervals and exact tests (pure Python: no torch, no scipy).

- one accuracy (per-item values 0/1): the Wilson score interval;
- a difference of two accuracies on the *same* items: Tango's score interval for paired
  proportions, which uses the discordant items and stays honest when the models agree
  everywhere;
- continuous per-item values: Student's t interval (regularised incomplete beta by Lentz's
  continued fraction);
- the exact two-sided binomial test behind McNemar's and the sign test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval around a point estimate."""

    estimate: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        """JSON view (rounded for reports)."""
        return {"estimate": _r(self.estimate), "low": _r(self.low), "high": _r(self.high)}


def _r(value: float) -> float:
    return value if math.isinf(value) or math.isnan(value) else round(value, 6)


def z_value(confidence: float) -> float:
    """The two-sided standard normal quantile for ``confidence`` (1.96 for 0.95)."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval for a proportion ``successes / n``.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to a point
    at 0 or n successes, so 5 of 5 correct is not mistaken for certainty.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Interval(math.nan, 0.0, 1.0)
    z = z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return Interval(p, max(0.0, center - half), min(1.0, center + half))


@dataclass(frozen=True)
class PairCounts:
    """Two models' 0/1 answers on the same items: a 2x2 table of agreement."""

    both: int
    first_only: int
    second_only: int
    neither: int

    @property
    def n(self) -> int:
        """Number of paired items."""
        return self.both + self.first_only + self.second_only + self.neither


def tango_score(counts: PairCounts, delta: float) -> float:
    """Tango's score statistic for the hypothesis ``p_first - p_second == delta`` (paired 0/1).

    ``(b - c - n*delta) / sqrt(n * (2*q + delta*(1 - delta)))`` with ``q`` the maximum-likelihood
    estimate of the "second only" cell under the hypothesis (Tango 1998).
    """
    n = counts.n
    b, c = counts.first_only, counts.second_only
    w = -b - c + (2 * n - b + c) * delta
    q = (math.sqrt(max(0.0, w * w + 8.0 * n * c * delta * (1.0 - delta))) - w) / (4.0 * n)
    variance = n * (2.0 * q + delta * (1.0 - delta))
    numerator = b - c - n * delta
    if variance <= 0.0:
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def tango_paired(counts: PairCounts, confidence: float = 0.95) -> Interval:
    """Tango's asymptotic score interval for ``p_first - p_second`` on paired 0/1 outcomes.

    The set of differences the score test does not reject; recommended for paired proportions
    (Fagerland, Lydersen and Laake 2014). It uses the discordant items and stays sample-size
    aware when the two models agree on every item: 0 discordant of ``n`` still leaves a
    half-width of ``z^2 / (n + z^2)`` (0.39 for 6 items, 0.019 for 200).
    """
    n = counts.n
    if n == 0:
        return Interval(math.nan, -1.0, 1.0)
    z = z_value(confidence)
    estimate = (counts.first_only - counts.second_only) / n

    def root(low: float, high: float, target: float) -> float:
        # The statistic decreases in delta: bisect for tango_score == target.
        for _ in range(100):
            mid = (low + high) / 2.0
            if tango_score(counts, mid) > target:
                low = mid
            else:
                high = mid
        return (low + high) / 2.0

    lower = -1.0 if tango_score(counts, -1.0) <= z else root(-1.0, estimate, z)
    upper = 1.0 if tango_score(counts, 1.0) >= -z else root(estimate, 1.0, -z)
    return Interval(estimate, lower, upper)


def _betacf(a: float, b: float, x: float) -> float:
    # Lentz's continued fraction for the regularised incomplete beta function.
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t cumulative distribution function."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The inverse of :func:`t_cdf` (bisection; exact to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, abs(mid)):
            break
    return (low + high) / 2.0


def mean_interval(n: int, mean: float, sd: float, confidence: float = 0.95) -> Interval:
    """Student's t interval for a mean of ``n`` values with sample standard deviation ``sd``."""
    if n < 2:
        return Interval(mean if n else math.nan, -math.inf, math.inf)
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def binomial_two_sided(k: int, m: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``m`` fair coin flips (sign/McNemar test)."""
    if m == 0:
        return 1.0
    low = min(k, m - k)
    tail = sum(math.comb(m, i) for i in range(low + 1)) / 2.0**m
    return min(1.0, 2.0 * tail)


# ------------------------------------------------------------------------- evidence
