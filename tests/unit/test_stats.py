"""Accuracy intervals and paired tests: the numbers behind 'significant forgetting'."""

from __future__ import annotations

import math

import pytest

from patchgap.reports.stats import (
    accuracy,
    bootstrap_ci,
    mcnemar_exact,
    paired_test,
    stratified_mean_diff,
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
