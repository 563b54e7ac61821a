"""Seed-aware statistics on synthetic data whose answer is known: the hierarchical bootstrap
recovers a planted difference and the seed SD, TOST separates equal from different arms, and
the frontier gap finds the planted forgetting difference at matched gain."""

from __future__ import annotations

import numpy as np
import pytest

from patchgap.reports.seeds import (
    Arm,
    contrast,
    equivalence,
    frontier_gap,
    seed_effect,
    shared_items,
)


def _arm(mean: float, seed_sd: float, item_sd: float, seeds: int, items: int, rng) -> dict:
    item_effects = np.linspace(-1, 1, items) * item_sd  # the same items in every arm
    out = {}
    for s in range(seeds):
        offset = rng.normal(0, seed_sd)
        noise = rng.normal(0, item_sd * 0.1, items)
        out[f"s{s}"] = {f"q{i}": mean + offset + item_effects[i] + noise[i] for i in range(items)}
    return out


def test_seed_effect_recovers_a_planted_difference_and_the_seed_sd() -> None:
    rng = np.random.default_rng(1)
    a = _arm(0.30, 0.02, 0.5, seeds=6, items=200, rng=rng)
    b = _arm(0.10, 0.02, 0.5, seeds=6, items=200, rng=rng)
    e = seed_effect(a, b, reps=500)
    assert e.low < 0.20 < e.high
    assert e.diff == pytest.approx(0.20, abs=0.04)
    assert e.p_bootstrap < 0.01
    assert e.seeds_a == 6 and e.items == 200
    assert 0.005 < e.sd_seeds_a < 0.05  # planted 0.02


def test_seed_variance_widens_the_interval() -> None:
    # the same item structure, but large seed-to-seed spread: the interval must reflect it
    rng = np.random.default_rng(2)
    calm_a, calm_b = (_arm(0.0, 0.001, 0.5, 4, 100, rng) for _ in range(2))
    wild_a, wild_b = (_arm(0.0, 0.2, 0.5, 4, 100, rng) for _ in range(2))
    calm, wild = seed_effect(calm_a, calm_b, reps=400), seed_effect(wild_a, wild_b, reps=400)
    assert (wild.high - wild.low) > 10 * (calm.high - calm.low)
    assert wild.p_bootstrap > 0.05  # no planted difference


def test_equivalence_is_shown_for_equal_arms_and_refused_for_different_ones() -> None:
    rng = np.random.default_rng(3)
    a = _arm(0.0, 0.005, 0.3, 5, 300, rng)
    same = _arm(0.0, 0.005, 0.3, 5, 300, rng)
    far = _arm(0.1, 0.005, 0.3, 5, 300, rng)
    assert equivalence(a, same, margin=0.05, reps=500).equivalent
    res = equivalence(a, far, margin=0.05, reps=500)
    assert not res.equivalent
    assert res.p > 0.05
    with pytest.raises(ValueError, match="margin"):
        equivalence(a, same, margin=0.0)


def test_missing_items_are_named() -> None:
    a = {"s0": {"q0": 1.0, "q1": 2.0}, "s1": {"q0": 1.0, "q1": 2.0}}
    b = {"s0": {"q0": 0.0, "q1": 0.0}, "s1": {"q0": 0.0}}
    assert shared_items(a, b) == ["q0"]
    assert seed_effect(a, b, reps=50).items == 1
    with pytest.raises(ValueError, match="share no items"):
        seed_effect(a, {"s0": {"x": 0.0}}, reps=10)


def _frontier(slope: float, seeds: int, rng, steps=(0, 10, 20, 40)) -> Arm:
    """Gain grows with steps; forgetting = slope * gain (+ seed and item noise)."""
    gain, forgetting = {}, {}
    for s in range(seeds):
        g_curve, f_curve = {}, {}
        for k, step in enumerate(steps):
            g = 0.1 * k + rng.normal(0, 0.005)
            g_curve[step] = {f"h{i}": g + rng.normal(0, 0.05) for i in range(80)}
            f_curve[step] = {f"d{i}": slope * g + rng.normal(0, 0.05) for i in range(80)}
        gain[f"s{s}"], forgetting[f"s{s}"] = g_curve, f_curve
    return Arm(gain=gain, forgetting=forgetting)


def test_frontier_gap_finds_the_planted_gap_at_matched_gain() -> None:
    rng = np.random.default_rng(4)
    low_forgetting = _frontier(1.0, 3, rng)  # D_R: forgets gain * 1
    high_forgetting = _frontier(2.0, 3, rng)  # D: forgets gain * 2
    gap = frontier_gap(low_forgetting, high_forgetting, n_levels=4, reps=300)
    # at matched gain g, the planted gap is (2 - 1) * g; levels span [0, 0.3]
    for lvl, g, lo, hi in zip(gap.levels, gap.gap, gap.low, gap.high, strict=True):
        assert g == pytest.approx(lvl, abs=0.03)
        assert lo - 0.02 <= lvl <= hi + 0.02
    assert gap.mean_gap == pytest.approx(np.mean(gap.levels), abs=0.02)
    assert gap.p_bootstrap < 0.01
    # the same frontier twice: no gap
    same = frontier_gap(low_forgetting, _frontier(1.0, 3, rng), n_levels=4, reps=300)
    assert same.mean_low < 0 < same.mean_high


def test_frontiers_that_do_not_overlap_in_gain_are_refused() -> None:
    rng = np.random.default_rng(5)
    a = _frontier(1.0, 2, rng)
    b = Arm(
        gain={
            s: {k: {i: v + 5.0 for i, v in c.items()} for k, c in cur.items()}
            for s, cur in a.gain.items()
        },
        forgetting=a.forgetting,
    )
    with pytest.raises(ValueError, match="do not overlap"):
        frontier_gap(a, b, reps=10)


def test_contrast_of_four_arms_matches_the_hand_computed_value() -> None:
    rng = np.random.default_rng(6)
    arms = [_arm(m, 0.01, 0.2, 3, 60, rng) for m in (0.5, 0.3, 0.4, 0.35)]
    weights = [1 / 4, -1 / 4, -1 / 2, 1 / 2]
    c = contrast(arms, weights, reps=400)
    means = [np.mean([np.mean(list(v.values())) for v in arm.values()]) for arm in arms]
    assert c.value == pytest.approx(sum(w * m for w, m in zip(weights, means, strict=True)))
    assert c.low < c.value < c.high
    # planted: (0.5 - 0.3) / 4 - (0.4 - 0.35) / 2 = 0.025, resolved from 0 by 0.01-SD seeds
    assert c.low < 0.025 < c.high and c.low > 0
    one = contrast(arms[:1], [1.0], reps=400)
    assert one.value == pytest.approx(means[0]) and one.seeds == [3] and one.items == 60
    with pytest.raises(ValueError, match="weight"):
        contrast(arms, [1.0], reps=10)
