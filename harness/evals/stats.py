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
from typing import Any

from harness.evals.intervals import (
    Interval,
    PairCounts,
    binomial_two_sided,
    mean_interval,
    tango_paired,
    wilson,
)
from harness.run.result import Outcome

#: Values within this distance of 0 or 1 count as 0 or 1 when deciding whether a metric is binary.
_BINARY_EPS = 1e-9


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
