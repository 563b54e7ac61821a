"""Statistics over SFT seeds and items together: the hierarchical bootstrap of a difference
between two arms (and of any weighted sum of arm means), the equivalence test (two one-sided
tests against a stated margin), and the gap between two gain-vs-forgetting frontiers at matched
gain.

An arm is several SFT runs (seeds) of one training set, each scored on the same items. The
per-item standard deviation between two nearly identical models says nothing about training
randomness, so every interval here resamples seeds within each arm (independently: seeds of
two arms are separate runs) and items (once per replicate, shared by every arm and seed, which
keeps the item pairing). The seed-to-seed SD is reported beside each effect.

Values are per-item numbers already oriented by the caller (for example, drift NLL of the tuned
model minus pi0's on the same item, so that positive means "forgot").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from patchgap.reports.stats import sample_sd

#: Per seed label: item id -> value.
SeedValues = Mapping[str, Mapping[str, float]]

#: Per seed label, per checkpoint (SFT step): item id -> value.
SeedCurves = Mapping[str, Mapping[int, Mapping[str, float]]]


@dataclass(frozen=True)
class SeedEffect:
    """``diff`` = mean(a) - mean(b) (seed means, then their mean), its interval over seeds and
    items, the two-sided bootstrap p, and each arm's seed-to-seed SD of its item mean."""

    diff: float
    low: float
    high: float
    p_bootstrap: float
    sd_seeds_a: float
    sd_seeds_b: float
    seeds_a: int
    seeds_b: int
    items: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _matrix(arm: SeedValues, items: Sequence[str], what: str) -> np.ndarray:
    """seeds x items array; every seed must have scored every item."""
    if not arm:
        raise ValueError(f"{what}: no seeds")
    rows = []
    for seed_label in sorted(arm):
        per_item = arm[seed_label]
        missing = [i for i in items if i not in per_item]
        if missing:
            raise ValueError(
                f"{what}: seed {seed_label!r} has no value for {len(missing)} item(s), "
                f"e.g. {missing[0]!r}"
            )
        rows.append([float(per_item[i]) for i in items])
    return np.asarray(rows, dtype=float)


def shared_items(*arms: SeedValues) -> list[str]:
    """The items every seed of every arm scored, sorted (the pairing set)."""
    sets = [set(v) for arm in arms for v in arm.values()]
    return sorted(set.intersection(*sets)) if sets else []


def _p_two_sided(samples: np.ndarray) -> float:
    below = float(np.mean(samples <= 0))
    above = float(np.mean(samples >= 0))
    return min(1.0, 2 * min(below, above))


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _replicate_means(m: np.ndarray, item_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One resampled arm mean per replicate: seeds drawn with replacement, then the shared item
    draw of that replicate. ``item_idx`` is reps x n_items."""
    reps = item_idx.shape[0]
    n_seeds = m.shape[0]
    seed_idx = rng.integers(0, n_seeds, size=(reps, n_seeds))
    out = np.empty(reps)
    for r in range(reps):
        out[r] = m[seed_idx[r]][:, item_idx[r]].mean()
    return out


def _arm_samples(arms: Sequence[np.ndarray], reps: int, seed: int) -> list[np.ndarray]:
    """Bootstrap means of each arm (seeds x items arrays of the same item columns)."""
    rng = np.random.default_rng(seed)
    n_items = arms[0].shape[1]
    item_idx = rng.integers(0, n_items, size=(reps, n_items))
    return [_replicate_means(m, item_idx, rng) for m in arms]


def _paired_arms(
    a: SeedValues, b: SeedValues, reps: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both arms as seeds x shared-items arrays, and the bootstrap samples of their difference."""
    items = shared_items(a, b)
    if not items:
        raise ValueError(f"{what}: the two arms share no items")
    ma, mb = _matrix(a, items, "arm a"), _matrix(b, items, "arm b")
    sa, sb = _arm_samples([ma, mb], reps, seed)
    return ma, mb, sa - sb


def seed_effect(
    a: SeedValues, b: SeedValues, reps: int = 2000, seed: int = 0, level: float = 0.95
) -> SeedEffect:
    """Hierarchical bootstrap of mean(a) - mean(b) over the items both arms scored."""
    ma, mb, diffs = _paired_arms(a, b, reps, seed, "seed_effect")
    low, high = _interval(diffs, level)
    return SeedEffect(
        diff=float(ma.mean() - mb.mean()),
        low=low,
        high=high,
        p_bootstrap=_p_two_sided(diffs),
        sd_seeds_a=sample_sd(ma.mean(axis=1).tolist()),
        sd_seeds_b=sample_sd(mb.mean(axis=1).tolist()),
        seeds_a=ma.shape[0],
        seeds_b=mb.shape[0],
        items=ma.shape[1],
    )


@dataclass(frozen=True)
class Contrast:
    """``value`` = sum of ``weight * mean(arm)`` over several arms (seed means, then their mean),
    its interval over seeds and items, the two-sided bootstrap p, and each arm's seed SD."""

    value: float
    low: float
    high: float
    p_bootstrap: float
    weights: list[float]
    sd_seeds: list[float]
    seeds: list[int]
    items: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def contrast(
    arms: Sequence[SeedValues],
    weights: Sequence[float],
    reps: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Contrast:
    """Hierarchical bootstrap of a weighted sum of arm means over the items every arm scored
    (one draw of items per replicate shared by all arms, seeds drawn within each arm). One arm
    with weight 1 gives the interval of that arm's mean; a difference of differences compares
    two pairs of arms."""
    if not arms or len(arms) != len(weights):
        raise ValueError(f"contrast: {len(arms)} arm(s) but {len(weights)} weight(s)")
    items = shared_items(*arms)
    if not items:
        raise ValueError("contrast: the arms share no items")
    mats = [_matrix(arm, items, f"arm {k}") for k, arm in enumerate(arms)]
    samples = _arm_samples(mats, reps, seed)
    stat = sum(float(w) * s for w, s in zip(weights, samples, strict=True))
    low, high = _interval(np.asarray(stat), level)
    return Contrast(
        value=float(sum(float(w) * m.mean() for w, m in zip(weights, mats, strict=True))),
        low=low,
        high=high,
        p_bootstrap=_p_two_sided(np.asarray(stat)),
        weights=[float(w) for w in weights],
        sd_seeds=[sample_sd(m.mean(axis=1).tolist()) for m in mats],
        seeds=[m.shape[0] for m in mats],
        items=len(items),
    )


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided tests of |mean(a) - mean(b)| < ``margin``: equivalent when the
    (1 - 2 alpha) interval lies inside (-margin, margin), i.e. both one-sided p < alpha."""

    diff: float
    low: float
    high: float
    margin: float
    p_lower: float
    p_upper: float
    equivalent: bool

    @property
    def p(self) -> float:
        return max(self.p_lower, self.p_upper)

    def as_dict(self) -> dict[str, float | bool]:
        return {**asdict(self), "p": self.p}


def equivalence(
    a: SeedValues,
    b: SeedValues,
    margin: float,
    alpha: float = 0.05,
    reps: int = 2000,
    seed: int = 0,
) -> Equivalence:
    """TOST on the hierarchical bootstrap of mean(a) - mean(b). Unlike "the interval contains
    0", a more precise comparison makes equivalence easier to show, not harder."""
    if not margin > 0:
        raise ValueError(f"equivalence: margin must be positive, got {margin}")
    ma, mb, diffs = _paired_arms(a, b, reps, seed, "equivalence")
    low, high = _interval(diffs, 1 - 2 * alpha)
    p_lower = float(np.mean(diffs <= -margin))  # H0: diff <= -margin
    p_upper = float(np.mean(diffs >= margin))  # H0: diff >= +margin
    return Equivalence(
        diff=float(ma.mean() - mb.mean()),
        low=low,
        high=high,
        margin=margin,
        p_lower=p_lower,
        p_upper=p_upper,
        equivalent=p_lower < alpha and p_upper < alpha,
    )


@dataclass(frozen=True)
class Arm:
    """One arm's frontier data: per seed, per checkpoint, per-item gain and forgetting values
    (gain items and forgetting items are separate sets, e.g. held-out NLL and drift NLL)."""

    gain: SeedCurves
    forgetting: SeedCurves


def _curve_tensor(curves: SeedCurves, steps: Sequence[int], items: Sequence[str]) -> np.ndarray:
    """seeds x steps x items."""
    out = []
    for seed_label in sorted(curves):
        per_step = curves[seed_label]
        rows = []
        for step in steps:
            if step not in per_step:
                raise ValueError(f"seed {seed_label!r} has no checkpoint at step {step}")
            rows.append([float(per_step[step][i]) for i in items])
        out.append(rows)
    return np.asarray(out, dtype=float)


def _common(curves: Sequence[SeedCurves]) -> tuple[list[int], list[str]]:
    steps = sorted(set.intersection(*[set(c) for cur in curves for c in cur.values()]))
    items = sorted(
        set.intersection(*[set(v) for cur in curves for c in cur.values() for v in c.values()])
    )
    return steps, items


def _at_gain(gain: np.ndarray, forgetting: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Forgetting interpolated at each gain level along one curve (points sorted by gain)."""
    order = np.argsort(gain)
    return np.interp(levels, gain[order], forgetting[order])


@dataclass(frozen=True)
class FrontierGap:
    """Forgetting of arm b minus arm a at matched gain, per gain level and on average over the
    gain range both frontiers cover: positive = a forgets less than b at equal gain."""

    levels: list[float]
    gap: list[float]
    low: list[float]
    high: list[float]
    mean_gap: float
    mean_low: float
    mean_high: float
    p_bootstrap: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_curve(
    g: np.ndarray, f: np.ndarray, gi: np.ndarray, fi: np.ndarray, si: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean gain and forgetting per checkpoint over the drawn seeds and items."""
    return g[si][:, :, gi].mean(axis=(0, 2)), f[si][:, :, fi].mean(axis=(0, 2))


def frontier_gap(
    a: Arm, b: Arm, n_levels: int = 5, reps: int = 1000, seed: int = 0, level: float = 0.95
) -> FrontierGap:
    """Compare two gain-vs-forgetting frontiers at matched gain, with intervals over seeds and
    items. Each arm's frontier is its seed-mean (gain, forgetting) per checkpoint, linearly
    interpolated; the gain levels span the range both frontiers reach (so ``b`` trained less
    is the "train less" control of ``a``)."""
    steps_a, _ = _common([a.gain, a.forgetting])
    steps_b, _ = _common([b.gain, b.forgetting])
    _, g_items = _common([a.gain, b.gain])
    _, f_items = _common([a.forgetting, b.forgetting])
    if len(steps_a) < 2 or len(steps_b) < 2 or not g_items or not f_items:
        raise ValueError("frontier_gap: each arm needs 2+ shared checkpoints and shared items")
    ga, fa = _curve_tensor(a.gain, steps_a, g_items), _curve_tensor(a.forgetting, steps_a, f_items)
    gb, fb = _curve_tensor(b.gain, steps_b, g_items), _curve_tensor(b.forgetting, steps_b, f_items)
    all_g, all_f = np.arange(len(g_items)), np.arange(len(f_items))
    levels = _levels(
        _mean_curve(ga, fa, all_g, all_f, np.arange(ga.shape[0]))[0],
        _mean_curve(gb, fb, all_g, all_f, np.arange(gb.shape[0]))[0],
        n_levels,
    )
    point = _gap_at(ga, fa, gb, fb, levels, all_g, all_f, None, None)
    rng = np.random.default_rng(seed)
    samples = np.empty((reps, len(levels)))
    for r in range(reps):
        gi = rng.integers(0, len(g_items), len(g_items))
        fi = rng.integers(0, len(f_items), len(f_items))
        sa = rng.integers(0, ga.shape[0], ga.shape[0])
        sb = rng.integers(0, gb.shape[0], gb.shape[0])
        samples[r] = _gap_at(ga, fa, gb, fb, levels, gi, fi, sa, sb)
    lows, highs = zip(*(_interval(samples[:, k], level) for k in range(len(levels))), strict=True)
    means = samples.mean(axis=1)
    mean_low, mean_high = _interval(means, level)
    return FrontierGap(
        levels=levels.tolist(),
        gap=point.tolist(),
        low=list(lows),
        high=list(highs),
        mean_gap=float(point.mean()),
        mean_low=mean_low,
        mean_high=mean_high,
        p_bootstrap=_p_two_sided(means),
    )


def _levels(gain_a: np.ndarray, gain_b: np.ndarray, n: int) -> np.ndarray:
    lo = max(gain_a.min(), gain_b.min())
    hi = min(gain_a.max(), gain_b.max())
    if not hi > lo:
        raise ValueError(
            f"frontier_gap: the arms' gain ranges do not overlap "
            f"([{gain_a.min():.4g}, {gain_a.max():.4g}] vs [{gain_b.min():.4g}, "
            f"{gain_b.max():.4g}]): no matched gain to compare at"
        )
    return np.linspace(lo, hi, n)


def _gap_at(
    ga: np.ndarray,
    fa: np.ndarray,
    gb: np.ndarray,
    fb: np.ndarray,
    levels: np.ndarray,
    gi: np.ndarray,
    fi: np.ndarray,
    sa: np.ndarray | None,
    sb: np.ndarray | None,
) -> np.ndarray:
    sa = np.arange(ga.shape[0]) if sa is None else sa
    sb = np.arange(gb.shape[0]) if sb is None else sb
    ca = _mean_curve(ga, fa, gi, fi, sa)
    cb = _mean_curve(gb, fb, gi, fi, sb)
    return _at_gain(*cb, levels) - _at_gain(*ca, levels)
