"""Accuracy intervals and paired tests: the numbers behind 'significant forgetting'."""

from __future__ import annotations

import math

import pytest

from patchgap.reports.stats import (
    accuracy,
    bootstrap_ci,
    mcnemar_exact,
    paired_mean_diff,
    paired_test,
    required_n,
    sample_sd,
    stratified_mean_diff,
    stratified_paired_mean,
    wilson,
)


def test_wilson_matches_known_values_and_stays_in_bounds() -> None:
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3)
    assert high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 10)[1] > 0.2  # zero successes out of ten is not certainty


def test_accuracy_counts_and_interval_contains_point() -> None:
    acc = accuracy([True, False, True, True])
    assert (acc.correct, acc.n, acc.acc) == (3, 4, 0.75)
    assert acc.low < acc.acc < acc.high
    boot = accuracy([1, 0, 1, 1] * 10, method="bootstrap")
    assert boot.low <= 0.75 <= boot.high
    with pytest.raises(ValueError, match="unknown interval"):
        accuracy([1], method="normal")


def test_bootstrap_is_seeded() -> None:
    vals = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert bootstrap_ci(vals, seed=3) == bootstrap_ci(vals, seed=3)


def test_mcnemar_exact_binomial() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # 10 vs 0 discordant: 2 * 0.5**10
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5**10)
    # symmetric, and finite for thousands of pairs
    assert mcnemar_exact(1200, 1000) == pytest.approx(mcnemar_exact(1000, 1200))
    assert 0 < mcnemar_exact(1200, 1000) < 0.01
    assert math.isfinite(mcnemar_exact(5000, 5000))


def test_paired_test_detects_a_clear_drop_and_not_noise() -> None:
    a = [1] * 80 + [0] * 20
    b = [0] * 40 + [1] * 40 + [0] * 20  # b lost 40 items a had right
    res = paired_test(a, b)
    assert res.diff == pytest.approx(0.4)
    assert (res.a_only, res.b_only) == (40, 0)
    assert res.significant and res.p_mcnemar < 1e-9
    assert res.diff_low > 0
    same = paired_test(a, a)
    assert same.diff == 0 and same.p_mcnemar == 1.0 and not same.significant
    with pytest.raises(ValueError, match="length"):
        paired_test([1], [1, 0])


def test_stratified_mean_weighs_benchmarks_equally() -> None:
    pairs = {"small": ([1, 1], [0, 0]), "large": ([1] * 100, [1] * 100)}
    res = stratified_mean_diff(pairs, reps=200)
    assert res["diff"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2, not item-weighted 2/102
    assert res["benchmarks"] == 2


def test_paired_mean_diff_resolves_a_shift_that_the_spread_would_hide() -> None:
    import random

    rng = random.Random(0)
    base = [rng.gauss(-10.0, 5.0) for _ in range(200)]  # items differ a lot from each other
    tuned = [b - 0.2 + rng.gauss(0.0, 0.3) for b in base]  # every item loses ~0.2 nats
    res = paired_mean_diff(tuned, base, reps=500)
    assert res.n == 200 and res.diff == pytest.approx(res.mean_a - res.mean_b)
    assert res.low < res.diff < res.high < 0  # pairing removes the between-item spread
    assert res.significant and res.p_bootstrap < 0.01
    assert res.sd_diff == pytest.approx(0.3, abs=0.06)  # the noise of the differences only
    same = paired_mean_diff(base, base, reps=200)
    assert (same.diff, same.low, same.high, same.p_bootstrap) == (0.0, 0.0, 0.0, 1.0)
    assert paired_mean_diff(tuned, base, reps=300, seed=4) == paired_mean_diff(
        tuned, base, reps=300, seed=4
    )
    assert paired_mean_diff([], []).n == 0
    with pytest.raises(ValueError, match="length"):
        paired_mean_diff([1.0], [1.0, 2.0])


def test_stratified_paired_mean_weighs_benchmarks_equally() -> None:
    pairs = {"small": ([1.0, 1.5], [0.0, 0.5]), "large": ([2.0] * 100, [2.0] * 100)}
    res = stratified_paired_mean(pairs, reps=200)
    assert res["diff"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2
    assert res["benchmarks"] == 2 and res["low"] == res["high"] == pytest.approx(0.5)
    assert res["p_bootstrap"] == 0.0
    assert stratified_paired_mean({})["p_bootstrap"] == 1.0
    with pytest.raises(ValueError, match="small"):
        stratified_paired_mean({"small": ([1.0], [1.0, 2.0])})


def test_required_n_is_the_normal_approximation_and_shrinks_with_the_noise() -> None:
    # (1.96 + 0.84)^2 = 7.85: one SD of effect needs 8 items at 80% power, alpha 0.05
    assert required_n(1.0, 1.0) == 8
    # a 1-point change of 0/1 outcomes whose paired differences have SD 0.2: 3,140 items
    assert required_n(0.2, 0.01) == pytest.approx(3140, abs=2)
    assert required_n(0.1, 0.01) < required_n(0.2, 0.01)
    assert required_n(0.5, -0.1) == required_n(0.5, 0.1)
    assert required_n(0.0, 0.1) == 1 and required_n(1.0, 0.0) is None
    assert sample_sd([1.0]) == 0.0 and sample_sd([1.0, 3.0]) == pytest.approx(math.sqrt(2))
