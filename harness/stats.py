"""Sample-size-aware statistics for the benchmark gate (pure Python: no torch, no scipy).

A benchmark score measured on ``n`` items is an estimate, not a fact. Every threshold is decided
on a confidence interval instead of the point value, with three outcomes:

- **pass**: the whole interval is on the good side of the threshold;
- **fail**: the whole interval is on the bad side;
- **inconclusive**: the interval straddles the threshold (too few items to tell).

Intervals used:

- one accuracy (per-item values 0/1): the Wilson score interval;
- a difference of two accuracies on the *same* items (merged vs base, merged vs adapter):
  Tango's score interval for paired proportions, which uses the discordant items (where one
  model is right and the other wrong) and stays honest when the models agree everywhere;
- continuous per-item values (a mean score, a paired difference): Student's t interval.

For the merged-vs-adapter comparison an exact McNemar test (0/1 values) or an exact sign test
(continuous values) on the discordant items is reported alongside: a small p-value says the two
models answer differently on more items than chance allows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from harness.result import Outcome

#: Values within this distance of 0 or 1 count as 0 or 1 when deciding whether a metric is binary.
_BINARY_EPS = 1e-9


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


@dataclass(frozen=True)
class Summary:
    """Sufficient statistics of one model's per-item values (what the lock file records)."""

    n: int
    mean: float
    sd: float
    binary: bool
    #: Items valued 1 (binary metrics only).
    successes: int = 0
    #: The aggregate lm-eval reports when it is not the mean of per-item values (perplexity).
    aggregate: float | None = None

    @property
    def value(self) -> float:
        """The metric's value: the aggregate when given, else the mean."""
        return self.mean if self.aggregate is None else self.aggregate

    def to_json(self) -> dict[str, Any]:
        """JSON view."""
        data: dict[str, Any] = {
            "n": self.n,
            "mean": self.mean,
            "sd": self.sd,
            "binary": self.binary,
            "successes": self.successes,
        }
        if self.aggregate is not None:
            data["aggregate"] = self.aggregate
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Summary:
        """Inverse of :meth:`to_json`."""
        aggregate = data.get("aggregate")
        return cls(
            int(data["n"]),
            float(data["mean"]),
            float(data["sd"]),
            bool(data["binary"]),
            int(data.get("successes", 0)),
            None if aggregate is None else float(aggregate),
        )


@dataclass(frozen=True)
class Paired:
    """Sufficient statistics of ``first - second`` over the items both models answered."""

    n: int
    mean: float
    sd: float
    binary: bool
    counts: PairCounts | None = None
    #: Items where ``first`` scored higher / lower than ``second`` (for the sign test).
    positive: int = 0
    negative: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON view."""
        data: dict[str, Any] = {
            "n": self.n,
            "mean": self.mean,
            "sd": self.sd,
            "binary": self.binary,
            "positive": self.positive,
            "negative": self.negative,
        }
        if self.counts is not None:
            data["counts"] = {
                "both": self.counts.both,
                "first_only": self.counts.first_only,
                "second_only": self.counts.second_only,
                "neither": self.counts.neither,
            }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Paired:
        """Inverse of :meth:`to_json`."""
        raw = data.get("counts")
        counts = None
        if isinstance(raw, Mapping):
            counts = PairCounts(
                int(raw["both"]),
                int(raw["first_only"]),
                int(raw["second_only"]),
                int(raw["neither"]),
            )
        return cls(
            int(data["n"]),
            float(data["mean"]),
            float(data["sd"]),
            bool(data["binary"]),
            counts,
            int(data.get("positive", 0)),
            int(data.get("negative", 0)),
        )


def _is_binary(values: Sequence[float]) -> bool:
    return all(abs(v) < _BINARY_EPS or abs(v - 1.0) < _BINARY_EPS for v in values)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def summarize(values: Sequence[float], aggregate: float | None = None) -> Summary:
    """Summarise one model's per-item values."""
    mean, sd = _mean_sd(values)
    binary = bool(values) and _is_binary(values)
    successes = sum(1 for v in values if abs(v - 1.0) < _BINARY_EPS) if binary else 0
    return Summary(len(values), mean, sd, binary, successes, aggregate)


def pair(first: Mapping[Any, float], second: Mapping[Any, float]) -> Paired:
    """Pair two models' per-item values by item id (items only one model has are ignored)."""
    keys = sorted(set(first) & set(second), key=str)
    a = [first[k] for k in keys]
    b = [second[k] for k in keys]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = _mean_sd(diffs)
    positive = sum(1 for d in diffs if d > _BINARY_EPS)
    negative = sum(1 for d in diffs if d < -_BINARY_EPS)
    if keys and _is_binary(a) and _is_binary(b):
        both = sum(1 for x, y in zip(a, b, strict=True) if x > 0.5 and y > 0.5)
        first_only = sum(1 for x, y in zip(a, b, strict=True) if x > 0.5 >= y)
        second_only = sum(1 for x, y in zip(a, b, strict=True) if y > 0.5 >= x)
        counts = PairCounts(
            both, first_only, second_only, len(keys) - both - first_only - second_only
        )
        return Paired(len(keys), mean, sd, True, counts, positive, negative)
    return Paired(len(keys), mean, sd, False, None, positive, negative)


def value_interval(summary: Summary, confidence: float) -> Interval | None:
    """The interval of a model's metric value, or None when only an aggregate is known."""
    if summary.aggregate is not None or summary.n == 0:
        return None
    if summary.binary:
        interval = wilson(summary.successes, summary.n, confidence)
        return Interval(summary.mean, interval.low, interval.high)
    return mean_interval(summary.n, summary.mean, summary.sd, confidence)


def difference_interval(paired: Paired, confidence: float) -> Interval:
    """The interval of the mean paired difference ``first - second``."""
    if paired.binary and paired.counts is not None:
        return tango_paired(paired.counts, confidence)
    return mean_interval(paired.n, paired.mean, paired.sd, confidence)


def paired_test(paired: Paired) -> float:
    """Exact two-sided p-value that the two models are interchangeable on these items.

    A sign test on the items where they differ: for 0/1 values this is McNemar's exact test on
    the discordant pairs; for continuous values it ignores the size of each difference.
    """
    return binomial_two_sided(paired.positive, paired.positive + paired.negative)


# ------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """One threshold's verdict with the figures that decided it."""

    name: str
    outcome: Outcome
    text: str
    figures: dict[str, Any]


def _good(value: float, higher_is_better: bool) -> float:
    # Map a value onto a scale where larger is always better.
    return value if higher_is_better else -value


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return f"{x:.4g}"


def _span(interval: Interval) -> str:
    return f"[{_fmt(interval.low)}, {_fmt(interval.high)}]"


def decide_floor(
    summary: Summary, floor: float, higher_is_better: bool, confidence: float
) -> Decision:
    """Decide whether the value is on the good side of ``floor``.

    ``floor`` is a minimum when higher is better and a maximum when lower is better.
    """
    side = ">=" if higher_is_better else "<="
    interval = value_interval(summary, confidence)
    figures: dict[str, Any] = {"threshold": floor, "value": summary.value}
    if interval is None:
        ok = _good(summary.value, higher_is_better) >= _good(floor, higher_is_better)
        outcome = Outcome.PASSED if ok else Outcome.FAILED
        text = f"{_fmt(summary.value)} {side if ok else 'not ' + side} {_fmt(floor)} (point value)"
        return Decision("floor", outcome, text, figures)
    figures["interval"] = interval.to_json()
    lo, hi = sorted((_good(interval.low, higher_is_better), _good(interval.high, higher_is_better)))
    target = _good(floor, higher_is_better)
    if lo >= target:
        outcome, verdict = Outcome.PASSED, f"{side} {_fmt(floor)}"
    elif hi < target:
        outcome, verdict = Outcome.FAILED, f"not {side} {_fmt(floor)}"
    else:
        outcome, verdict = Outcome.INCONCLUSIVE, f"straddles {_fmt(floor)}"
    return Decision("floor", outcome, f"{_fmt(summary.value)} {_span(interval)} {verdict}", figures)


def decide_drop(
    paired: Paired | None,
    merged: Summary,
    base: Summary,
    max_drop: float,
    higher_is_better: bool,
    confidence: float,
) -> Decision:
    """Decide whether the loss against the base (in the bad direction) is at most ``max_drop``."""
    sign = 1.0 if higher_is_better else -1.0
    figures: dict[str, Any] = {"threshold": max_drop, "base": base.value}
    if paired is None or merged.aggregate is not None or paired.n == 0:
        point = sign * (base.value - merged.value)
        figures["drop"] = point
        ok = point <= max_drop
        outcome = Outcome.PASSED if ok else Outcome.FAILED
        text = (
            f"drop {_fmt(point)} vs base {_fmt(base.value)} {'<=' if ok else '>'} {_fmt(max_drop)}"
        )
        return Decision("max_drop", outcome, text + " (point value)", figures)
    diff = difference_interval(paired, confidence)  # merged - base
    lows = sorted((-sign * diff.low, -sign * diff.high))
    drop = Interval(-sign * diff.estimate, lows[0], lows[1])
    figures["drop"] = drop.to_json()
    if drop.high <= max_drop:
        outcome, verdict = Outcome.PASSED, f"<= {_fmt(max_drop)}"
    elif drop.low > max_drop:
        outcome, verdict = Outcome.FAILED, f"> {_fmt(max_drop)}"
    else:
        outcome, verdict = Outcome.INCONCLUSIVE, f"straddles {_fmt(max_drop)}"
    text = f"drop {_fmt(drop.estimate)} {_span(drop)} vs base {_fmt(base.value)} {verdict}"
    return Decision("max_drop", outcome, text, figures)


def decide_adapter(
    paired: Paired | None,
    merged: Summary,
    adapter: Summary,
    max_diff: float,
    confidence: float,
) -> Decision:
    """Whether the merged model is within ``max_diff`` of the unmerged adapter model.

    Either direction counts. An equivalence test: pass when the whole interval of the paired
    difference lies inside ``[-max_diff, max_diff]``, fail when it lies entirely outside.
    """
    figures: dict[str, Any] = {"threshold": max_diff, "adapter": adapter.value}
    if paired is None or merged.aggregate is not None or paired.n == 0:
        gap = merged.value - adapter.value
        figures["difference"] = gap
        ok = abs(gap) <= max_diff
        outcome = Outcome.PASSED if ok else Outcome.FAILED
        text = (
            f"differs from adapter {_fmt(adapter.value)} by {_fmt(gap)}"
            f" {'within' if ok else 'beyond'} ±{_fmt(max_diff)} (point value)"
        )
        return Decision("max_adapter_diff", outcome, text, figures)
    interval = difference_interval(paired, confidence)
    figures["difference"] = interval.to_json()
    p_value = paired_test(paired)
    figures["p_value"] = round(p_value, 6)
    figures["discordant"] = paired.positive + paired.negative
    if -max_diff <= interval.low and interval.high <= max_diff:
        outcome, verdict = Outcome.PASSED, f"within ±{_fmt(max_diff)}"
    elif interval.low > max_diff or interval.high < -max_diff:
        outcome, verdict = Outcome.FAILED, f"beyond ±{_fmt(max_diff)}"
    else:
        outcome, verdict = Outcome.INCONCLUSIVE, f"straddles ±{_fmt(max_diff)}"
    test = "McNemar" if paired.binary else "sign test"
    text = (
        f"vs adapter {_fmt(interval.estimate)} {_span(interval)} {verdict} ({test} p={p_value:.3g})"
    )
    return Decision("max_adapter_diff", outcome, text, figures)


def combine_outcomes(decisions: Sequence[Decision]) -> Outcome:
    """Fail if any threshold failed, else inconclusive if any was, else pass."""
    outcomes = {d.outcome for d in decisions}
    if Outcome.FAILED in outcomes:
        return Outcome.FAILED
    if Outcome.INCONCLUSIVE in outcomes:
        return Outcome.INCONCLUSIVE
    return Outcome.PASSED
