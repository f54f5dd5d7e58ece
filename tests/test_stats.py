"""The statistics of the benchmark gate: intervals, paired tests and direction-aware decisions."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.evals.intervals import (
    PairCounts,
    binomial_two_sided,
    mean_interval,
    t_quantile,
    tango_paired,
    tango_score,
    wilson,
)
from harness.evals.stats import (
    Paired,
    Summary,
    combine_outcomes,
    decide_adapter,
    decide_drop,
    decide_floor,
    pair,
    summarize,
)
from harness.run.result import Outcome


def test_wilson_matches_published_values():
    # Newcombe (1998) Table I, Wilson score method: 81/263 -> 0.2553 to 0.3662 and
    # 15/148 -> 0.0624 to 0.1605.
    low, high = wilson(81, 263).low, wilson(81, 263).high
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    interval = wilson(15, 148)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.0624, 0.1605)


def test_wilson_never_collapses_at_the_edges():
    assert wilson(5, 5).low < 0.6 and wilson(5, 5).high == 1.0
    assert wilson(0, 5).low == 0.0 and wilson(0, 5).high > 0.4
    assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)


def test_tango_interval_limits_are_where_the_score_test_just_rejects():
    counts = PairCounts(12, 5, 9, 2)
    interval = tango_paired(counts)
    z = 1.959963984540054
    assert interval.estimate == pytest.approx(-4 / 28)
    assert tango_score(counts, interval.low) == pytest.approx(z, abs=1e-6)
    assert tango_score(counts, interval.high) == pytest.approx(-z, abs=1e-6)
    assert interval.low < interval.estimate < interval.high


def test_tango_interval_does_not_collapse_when_models_agree():
    # No discordant item among n: the limits are -/+ z^2 / (n + z^2).
    z2 = 1.959963984540054**2
    for n in (6, 200):
        interval = tango_paired(PairCounts(n // 2, 0, 0, n - n // 2))
        assert interval.high == pytest.approx(z2 / (n + z2), abs=1e-6)
        assert interval.low == pytest.approx(-z2 / (n + z2), abs=1e-6)


def test_tango_interval_is_tighter_when_models_agree():
    agree = tango_paired(PairCounts(30, 1, 1, 28))
    independent = tango_paired(PairCounts(15, 16, 16, 13))
    assert agree.high - agree.low < 0.5 * (independent.high - independent.low)


def test_t_quantile_against_known_values():
    assert t_quantile(0.975, 10) == pytest.approx(2.228138851986, abs=1e-9)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047361747, abs=1e-8)
    assert t_quantile(0.025, 3) == pytest.approx(-3.18244630528371, abs=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)


def test_mean_interval_needs_two_values():
    one = mean_interval(1, 0.5, 0.0)
    assert math.isinf(one.low) and math.isinf(one.high)


def test_paired_interval_covers_the_true_difference():
    # Two correlated "models" answering 60 items; the 95 % interval should cover the true
    # difference of accuracies in about 95 % of trials (allow 88 % for 300 trials).
    rng = random.Random(7)
    true_first, true_second = 0.7, 0.6
    hits = 0
    trials = 300
    for _ in range(trials):
        first, second = {}, {}
        for i in range(60):
            u = rng.random()
            first[i] = 1.0 if u < true_first else 0.0
            # correlated: mostly the same latent draw
            v = u if rng.random() < 0.7 else rng.random()
            second[i] = 1.0 if v < true_second else 0.0
        paired = pair(first, second)
        assert paired.counts is not None
        interval = tango_paired(paired.counts)
        hits += interval.low <= true_first - true_second <= interval.high
    assert hits / trials >= 0.88


@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_newcombe_interval_contains_estimate_and_stays_in_range(a, b, c, d):
    interval = tango_paired(PairCounts(a, b, c, d))
    assert -1.0 <= interval.low <= 1.0 and -1.0 <= interval.high <= 1.0
    if a + b + c + d:
        assert interval.low <= interval.estimate + 1e-12 <= interval.high + 2e-12


def test_sign_test_is_exact():
    assert binomial_two_sided(0, 0) == 1.0
    assert binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert binomial_two_sided(5, 10) == 1.0


def test_summarize_and_pair_detect_binary_values():
    summary = summarize([1.0, 0.0, 1.0, 1.0])
    assert summary.binary and summary.successes == 3 and summary.mean == 0.75
    continuous = summarize([0.5, 0.25])
    assert not continuous.binary
    paired = pair({1: 1.0, 2: 0.0, 3: 1.0, 9: 1.0}, {1: 1.0, 2: 1.0, 3: 0.0})
    assert paired.n == 3 and paired.counts == PairCounts(1, 1, 1, 0)
    assert Paired.from_json(paired.to_json()) == paired
    assert Summary.from_json(summary.to_json()) == summary


def test_floor_is_direction_aware():
    accurate = summarize([1.0] * 90 + [0.0] * 10)
    assert decide_floor(accurate, 0.7, True, 0.95).outcome is Outcome.PASSED
    assert decide_floor(accurate, 0.97, True, 0.95).outcome is Outcome.FAILED
    assert decide_floor(accurate, 0.9, True, 0.95).outcome is Outcome.INCONCLUSIVE
    # Lower is better: the threshold is a ceiling.
    errors = summarize([1.0] * 10 + [0.0] * 90)
    assert decide_floor(errors, 0.3, False, 0.95).outcome is Outcome.PASSED
    assert decide_floor(errors, 0.03, False, 0.95).outcome is Outcome.FAILED
    # Aggregate-only metrics (perplexity) are judged on the point value.
    perplexity = Summary(50, math.nan, math.nan, False, aggregate=12.5)
    assert decide_floor(perplexity, 20.0, False, 0.95).outcome is Outcome.PASSED
    assert decide_floor(perplexity, 10.0, False, 0.95).outcome is Outcome.FAILED


def test_drop_against_base():
    base = {i: 1.0 for i in range(100)}
    worse = {i: (1.0 if i < 60 else 0.0) for i in range(100)}
    decision = decide_drop(
        pair(worse, base),
        summarize(list(worse.values())),
        summarize(list(base.values())),
        0.1,
        True,
        0.95,
    )
    assert decision.outcome is Outcome.FAILED
    assert decision.figures["drop"]["estimate"] == pytest.approx(0.4)
    same = decide_drop(
        pair(base, base),
        summarize(list(base.values())),
        summarize(list(base.values())),
        0.1,
        True,
        0.95,
    )
    assert same.outcome is Outcome.PASSED
    # Lower is better: an increase is a drop.
    up = decide_drop(
        pair(base, worse),
        summarize(list(base.values())),
        summarize(list(worse.values())),
        0.1,
        False,
        0.95,
    )
    assert up.outcome is Outcome.FAILED


def test_adapter_equivalence_and_sample_size():
    same = {i: float(i % 2) for i in range(200)}
    decision = decide_adapter(
        pair(same, same), summarize(list(same.values())), summarize(list(same.values())), 0.05, 0.95
    )
    assert decision.outcome is Outcome.PASSED and decision.figures["p_value"] == 1.0
    few = {i: float(i % 2) for i in range(6)}
    small = decide_adapter(
        pair(few, few), summarize(list(few.values())), summarize(list(few.values())), 0.05, 0.95
    )
    assert small.outcome is Outcome.INCONCLUSIVE
    flipped = {i: 1.0 - v for i, v in same.items()}
    far = decide_adapter(
        pair(same, flipped),
        summarize(list(same.values())),
        summarize(list(flipped.values())),
        0.05,
        0.95,
    )
    # Same accuracy overall, but every answer differs: the interval is centred on 0 and wide,
    # and the sign test does not flag it (balanced discordance), so it is inconclusive.
    assert far.outcome is Outcome.INCONCLUSIVE


def test_combine_outcomes():
    assert combine_outcomes([]) is Outcome.PASSED
    dummy = decide_floor(summarize([1.0] * 50), 0.5, True, 0.95)
    assert combine_outcomes([dummy]) is Outcome.PASSED
