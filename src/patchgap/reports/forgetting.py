"""The forgetting table (arXiv 2602.11220): downstream gain over pi0,
forgetting per general benchmark (acc_base - acc_tuned) and its average, and the forgetting
reduction 1 - F_R / F_D of each rewritten variant against SFT on D, with paired significance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from patchgap.errors import ConfigError
from patchgap.reports.stats import accuracy, paired_test, stratified_mean_diff

#: Per model label, per benchmark: item id -> correct. Items are paired across models by id.
Scores = Mapping[str, Mapping[str, Mapping[str, bool]]]

#: Below this |F_D| (absolute accuracy points as a fraction) a ratio against F_D is meaningless.
NEAR_ZERO = 0.005


def _paired(scores: Scores, a: str, b: str, bench: str) -> tuple[list[bool], list[bool], int]:
    """Outcomes of models ``a`` and ``b`` on the items of ``bench`` both were scored on."""
    sa, sb = scores[a].get(bench), scores[b].get(bench)
    if sa is None or sb is None:
        return [], [], 0
    ids = [i for i in sa if i in sb]
    return [bool(sa[i]) for i in ids], [bool(sb[i]) for i in ids], len(ids)


def _acc(scores: Scores, model: str, bench: str) -> float | None:
    s = scores[model].get(bench)
    if not s:
        return None
    return sum(1 for v in s.values() if v) / len(s)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def reduction(f_r: float | None, f_d: float | None, near_zero: float = NEAR_ZERO) -> float | None:
    """1 - F_R / F_D, or None when either is missing or |F_D| is near zero (the ratio would be
    dominated by noise: SFT on D forgot nothing measurable to reduce)."""
    if f_r is None or f_d is None or abs(f_d) < near_zero:
        return None
    return 1.0 - f_r / f_d


def forgetting_table(
    scores: Scores,
    downstream: Sequence[str],
    general: Sequence[str],
    base: str = "base",
    baseline: str | None = "sft_d",
    rewritten: Sequence[str] | None = None,
    near_zero: float = NEAR_ZERO,
    bootstrap_reps: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the forgetting table for every model in ``scores`` against ``base``.

    ``rewritten`` lists the labels compared with ``baseline`` (default: every model other than
    base and baseline). Returns a JSON-ready dict: ``models`` (per label: accuracies with 95%
    intervals, gains, forgetting, reductions, paired tests) and ``caveats`` (plain sentences).
    """
    if base not in scores:
        raise ConfigError(f"forgetting table: base model {base!r} not among {sorted(scores)}")
    if baseline is not None and baseline not in scores:
        baseline = None
    if rewritten is None:
        rewritten = [m for m in scores if m not in (base, baseline)]
    caveats: list[str] = []
    models: dict[str, Any] = {}
    for label in scores:
        row: dict[str, Any] = {"accuracy": {}, "gain": {}, "forgetting": {}, "vs_base": {}}
        for bench in [*downstream, *general]:
            s = scores[label].get(bench)
            if s:
                row["accuracy"][bench] = accuracy(list(s.values())).as_dict()
        for bench in downstream:
            acc, acc0 = _acc(scores, label, bench), _acc(scores, base, bench)
            row["gain"][bench] = None if acc is None or acc0 is None else acc - acc0
        for bench in general:
            acc, acc0 = _acc(scores, label, bench), _acc(scores, base, bench)
            row["forgetting"][bench] = None if acc is None or acc0 is None else acc0 - acc
        row["gain_mean"] = _mean(list(row["gain"].values()))
        row["forgetting_mean"] = _mean(list(row["forgetting"].values()))
        row["downstream_mean"] = _mean([_acc(scores, label, b) for b in downstream])
        row["general_mean"] = _mean([_acc(scores, label, b) for b in general])
        if label != base:
            # paired base-vs-model: positive diff = the model lost accuracy (forgetting)
            pairs = {}
            for bench in [*downstream, *general]:
                a, b, n = _paired(scores, base, label, bench)
                if n:
                    row["vs_base"][bench] = paired_test(a, b, bootstrap_reps, seed).as_dict()
                    if bench in general:
                        pairs[bench] = (a, b)
            if pairs:
                row["forgetting_mean_test"] = stratified_mean_diff(pairs, bootstrap_reps, seed)
        models[label] = row

    if baseline is not None:
        f_d = models[baseline]
        for label in rewritten:
            if label not in models or label == baseline:
                continue
            row = models[label]
            per = {
                b: reduction(row["forgetting"][b], f_d["forgetting"][b], near_zero) for b in general
            }
            row["reduction"] = per
            row["reduction_mean_of_ratios"] = _mean(list(per.values()))
            row["reduction_of_mean"] = reduction(
                row["forgetting_mean"], f_d["forgetting_mean"], near_zero
            )
            # paired rewritten-vs-baseline: F_D - F_R = acc_R - acc_D on the same items
            tests, pairs = {}, {}
            for bench in general:
                a, b, n = _paired(scores, label, baseline, bench)
                if n:
                    tests[bench] = paired_test(a, b, bootstrap_reps, seed).as_dict()
                    pairs[bench] = (a, b)
            row["vs_baseline"] = tests
            if pairs:
                row["forgetting_diff_test"] = stratified_mean_diff(pairs, bootstrap_reps, seed)
            near = [
                b
                for b in general
                if f_d["forgetting"][b] is not None and abs(f_d["forgetting"][b]) < near_zero
            ]
            if near:
                caveats.append(
                    f"{label}: forgetting reduction not computed for {', '.join(near)}: SFT on D "
                    f"({baseline}) forgets less than {near_zero:.1%} there, so 1 - F_R/F_D "
                    "would only measure noise."
                )
            if f_d["forgetting_mean"] is not None and f_d["forgetting_mean"] < near_zero:
                caveats.append(
                    f"{label}: average forgetting of SFT on D is {f_d['forgetting_mean']:+.2%}, "
                    "near zero or negative; the reduction of the average is not meaningful."
                )
    for label, row in models.items():
        test = row.get("forgetting_mean_test")
        if test is not None and label != base:
            row["forgetting_significant"] = test["p_bootstrap"] < 0.05
    return {
        "base": base,
        "baseline": baseline,
        "rewritten": [m for m in rewritten if m in models and m != baseline],
        "downstream": list(downstream),
        "general": list(general),
        "near_zero": near_zero,
        "models": models,
        "caveats": caveats,
    }
