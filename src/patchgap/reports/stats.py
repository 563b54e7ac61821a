"""Statistics for evaluation: accuracy with a 95% interval (Wilson, bootstrap), paired tests
between two models scored on the same items (exact McNemar, paired bootstrap) for 0/1 outcomes
and for continuous per-item values (log-probabilities, NLLs), and the number of items a paired
comparison needs to resolve a given difference."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    """Accuracy over ``n`` items with a 95% interval ``[low, high]``."""

    acc: float
    low: float
    high: float
    n: int
    correct: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """``a`` against ``b`` on the same items: difference ``acc_a - acc_b`` with a bootstrap 95%
    interval, and the exact McNemar p-value over the discordant pairs."""

    n: int
    acc_a: float
    acc_b: float
    diff: float
    diff_low: float
    diff_high: float
    a_only: int
    b_only: int
    p_mcnemar: float
    p_bootstrap: float

    @property
    def significant(self) -> bool:
        return self.p_mcnemar < 0.05

    def as_dict(self) -> dict[str, float | bool]:
        return {**asdict(self), "significant": self.significant}


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes out of ``n`` (well-behaved at 0 and n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 or n the bound is exactly 0 or 1; rounding must not leave 0.9999999999999999
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


def accuracy(outcomes: Sequence[bool | int | float], method: str = "wilson") -> Accuracy:
    """Mean of 0/1 outcomes with a 95% interval, ``wilson`` (default) or ``bootstrap``."""
    n = len(outcomes)
    correct = int(sum(1 for x in outcomes if x))
    acc = correct / n if n else 0.0
    if method == "wilson":
        low, high = wilson(correct, n)
    elif method == "bootstrap":
        low, high = bootstrap_ci([float(bool(x)) for x in outcomes])
    else:
        raise ValueError(f"unknown interval method {method!r} (wilson or bootstrap)")
    return Accuracy(acc, low, high, n, correct)


def bootstrap_ci(
    values: Sequence[float], reps: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded: same input, same output)."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return _percentiles(means, level)


def _percentiles(sorted_values: Sequence[float], level: float) -> tuple[float, float]:
    k = len(sorted_values)
    lo = sorted_values[max(0, int(math.floor((1 - level) / 2 * k)))]
    hi = sorted_values[min(k - 1, int(math.ceil((1 + level) / 2 * k)) - 1)]
    return (lo, hi)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of ``a_only`` among the discordant pairs
    with p = 1/2. No discordant pairs means no evidence of a difference (p = 1)."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    k = min(a_only, b_only)
    # log-space binomial terms stay finite for thousands of discordant pairs
    log_half = m * math.log(0.5)
    tail = sum(math.exp(_log_comb(m, i) + log_half) for i in range(k + 1))
    return min(1.0, 2 * tail)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def paired_test(
    a: Sequence[bool | int], b: Sequence[bool | int], reps: int = 2000, seed: int = 0
) -> PairedTest:
    """Compare two models' 0/1 outcomes on the same items (``a[i]`` and ``b[i]`` are item i)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    xa = [1.0 if x else 0.0 for x in a]
    xb = [1.0 if x else 0.0 for x in b]
    d = [p - q for p, q in zip(xa, xb, strict=True)]
    a_only = sum(1 for v in d if v > 0)
    b_only = sum(1 for v in d if v < 0)
    diff = sum(d) / n if n else 0.0
    low, high, p_boot = _paired_bootstrap(d, reps, seed)
    return PairedTest(
        n=n,
        acc_a=sum(xa) / n if n else 0.0,
        acc_b=sum(xb) / n if n else 0.0,
        diff=diff,
        diff_low=low,
        diff_high=high,
        a_only=a_only,
        b_only=b_only,
        p_mcnemar=mcnemar_exact(a_only, b_only),
        p_bootstrap=p_boot,
    )


def _paired_bootstrap(d: Sequence[float], reps: int, seed: int) -> tuple[float, float, float]:
    n = len(d)
    if n == 0:
        return (0.0, 0.0, 1.0)
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    low, high = _percentiles(means, 0.95)
    # two-sided p: how often the resampled difference lands on the other side of zero
    below = sum(1 for m in means if m <= 0) / reps
    above = sum(1 for m in means if m >= 0) / reps
    return (low, high, min(1.0, 2 * min(below, above)))


def stratified_mean_diff(
    pairs: Mapping[str, tuple[Sequence[bool | int], Sequence[bool | int]]],
    reps: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """The mean over benchmarks of ``acc_a - acc_b``, with a bootstrap that resamples items within
    each benchmark (so every benchmark keeps its weight), a 95% interval and a two-sided p."""
    diffs = {}
    for name, (a, b) in pairs.items():
        if len(a) != len(b):
            raise ValueError(f"{name}: paired outcomes differ in length: {len(a)} vs {len(b)}")
        diffs[name] = [float(bool(x)) - float(bool(y)) for x, y in zip(a, b, strict=True)]
    return _stratified(diffs, reps, seed)


def stratified_paired_mean(
    pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    reps: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`stratified_mean_diff` for continuous per-item values: the mean over benchmarks of
    ``mean(a) - mean(b)``, items resampled within each benchmark (vectorised: a full MMLU is
    14k items a resample)."""
    import numpy as np

    names = sorted(pairs)
    if not names:
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "p_bootstrap": 1.0, "benchmarks": 0}
    total = np.zeros(reps)
    point = 0.0
    rng = np.random.default_rng(seed)
    for name in names:
        a, b = pairs[name]
        if len(a) != len(b):
            raise ValueError(f"{name}: paired values differ in length: {len(a)} vs {len(b)}")
        d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
        if len(d):
            point += float(d.mean())
            total += _resampled_means(d, reps, rng)
    stats = sorted((total / len(names)).tolist())
    low, high = _percentiles(stats, 0.95)
    return {
        "diff": point / len(names),
        "low": low,
        "high": high,
        "p_bootstrap": _two_sided_p(stats),
        "benchmarks": len(names),
    }


def _resampled_means(d: Any, reps: int, rng: Any) -> Any:
    """``reps`` bootstrap means of the array ``d``, drawn in blocks of bounded memory."""
    import numpy as np

    n = len(d)
    out = np.empty(reps)
    block = max(1, 2_000_000 // max(1, n))
    for s in range(0, reps, block):
        k = min(block, reps - s)
        out[s : s + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return out


def _two_sided_p(sorted_stats: Sequence[float]) -> float:
    """How often the resampled statistic lands on the other side of zero, doubled."""
    reps = len(sorted_stats)
    below = sum(1 for s in sorted_stats if s <= 0) / reps
    above = sum(1 for s in sorted_stats if s >= 0) / reps
    return min(1.0, 2 * min(below, above))


def _stratified(diffs: Mapping[str, Sequence[float]], reps: int, seed: int) -> dict[str, float]:
    names = sorted(diffs)
    if not names:
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "p_bootstrap": 1.0, "benchmarks": 0}
    point = sum(sum(diffs[n]) / max(1, len(diffs[n])) for n in names) / len(names)
    rng = random.Random(seed)
    stats = []
    for _ in range(reps):
        total = 0.0
        for name in names:
            v = diffs[name]
            k = len(v)
            total += sum(v[rng.randrange(k)] for _ in range(k)) / k if k else 0.0
        stats.append(total / len(names))
    stats.sort()
    low, high = _percentiles(stats, 0.95)
    below = sum(1 for s in stats if s <= 0) / reps
    above = sum(1 for s in stats if s >= 0) / reps
    return {
        "diff": point,
        "low": low,
        "high": high,
        "p_bootstrap": min(1.0, 2 * min(below, above)),
        "benchmarks": len(names),
    }


@dataclass(frozen=True)
class PairedMeanDiff:
    """``a`` against ``b`` on the same items for a continuous per-item value: the mean of the
    per-item differences ``a_i - b_i`` with a paired bootstrap 95% interval and two-sided p, and
    the standard deviation of those differences (what sizes the next run)."""

    n: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    p_bootstrap: float
    sd_diff: float

    @property
    def significant(self) -> bool:
        return self.p_bootstrap < 0.05

    def as_dict(self) -> dict[str, float | bool]:
        return {**asdict(self), "significant": self.significant}


def paired_mean_diff(
    a: Sequence[float], b: Sequence[float], reps: int = 2000, seed: int = 0
) -> PairedMeanDiff:
    """Compare two models' continuous values on the same items (``a[i]`` and ``b[i]`` are item
    i): the mean difference ``a - b``, its paired bootstrap interval and p-value."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return PairedMeanDiff(0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = xa - xb
    stats = sorted(_resampled_means(d, reps, np.random.default_rng(seed)).tolist())
    low, high = _percentiles(stats, 0.95)
    return PairedMeanDiff(
        n=n,
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        diff=float(d.mean()),
        low=low,
        high=high,
        p_bootstrap=_two_sided_p(stats),
        sd_diff=sample_sd(d.tolist()),
    )


def sample_sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _z(p: float) -> float:
    """The standard normal quantile at ``p`` (0 < p < 1)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def required_n(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Items a paired comparison needs so that a true mean difference of ``effect`` is detected
    by a two-sided test at ``alpha`` with probability ``power``, when the per-item differences
    have standard deviation ``sd``: ``((z_{1-alpha/2} + z_{power}) * sd / effect)^2``.

    None when ``effect`` is zero (nothing to resolve); 1 when ``sd`` is zero (no noise)."""
    if effect == 0:
        return None
    if sd <= 0:
        return 1
    k = (_z(1 - alpha / 2) + _z(power)) * sd / abs(effect)
    return max(1, math.ceil(k * k))


def format_p(p: float | None) -> str:
    """A p-value as the reports print it: three significant digits, "<0.001" below that."""
    if p is None:
        return "n/a"
    return f"{p:.3g}" if p >= 0.001 else "<0.001"
