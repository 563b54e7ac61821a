"""The forgetting table (arXiv 2602.11220): downstream gain over pi0,
forgetting per general benchmark (acc_base - acc_tuned) and its average, and the forgetting
reduction 1 - F_R / F_D of each rewritten variant against SFT on D, with paired significance;
beside it the continuous metrics, paired by item (the gold choice's log-probability on every
general item, the NLL of pi0's own answers to general questions, the NLL of held-out reference
solutions), which resolve a given change with far fewer items than accuracy does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from patchgap.errors import ConfigError
from patchgap.reports.stats import (
    accuracy,
    format_p,
    paired_mean_diff,
    paired_test,
    stratified_mean_diff,
    stratified_paired_mean,
)

#: Per model label, per benchmark: item id -> correct. Items are paired across models by id.
Scores = Mapping[str, Mapping[str, Mapping[str, bool]]]

#: Per model label, per metric: item id -> value. Metrics:
#: ``gold_logprob:<bench>``, ``gold_choice_prob:<bench>`` and ``gold_logprob_norm:<bench>``
#: (log-likelihood of the gold choice, its probability among the choices, its log-likelihood
#: per character),
#: ``drift_nll`` (nats/token of pi0's answers), ``heldout_nll:<set>`` (nats/token of references).
Values = Mapping[str, Mapping[str, Mapping[str, float]]]

#: Below this |F_D| (absolute accuracy points as a fraction) a ratio against F_D is meaningless.
NEAR_ZERO = 0.005

#: A continuous forgetting of SFT on D with a paired p above this is not a base for a ratio.
ALPHA = 0.05


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


def reduction(
    f_r: float | None, f_d: float | None, near_zero: float = NEAR_ZERO, resolved: bool = True
) -> float | None:
    """1 - F_R / F_D, defined only where SFT on D forgot a positive, resolved amount: None when
    either is missing, when F_D is below ``near_zero`` (zero or negative: SFT on D forgot
    nothing, or gained, so there is nothing to reduce and the ratio would exceed 100%), or when
    F_D is not ``resolved`` (its paired test against pi0 does not separate it from zero).
    :func:`reduction_absent` says which."""
    if reduction_absent(f_r, f_d, near_zero, resolved) is not None:
        return None
    assert f_r is not None and f_d is not None
    return 1.0 - f_r / f_d


def reduction_absent(
    f_r: float | None, f_d: float | None, near_zero: float = NEAR_ZERO, resolved: bool = True
) -> str | None:
    """Why 1 - F_R / F_D is not defined here, in a few words; None when it is."""
    if f_r is None or f_d is None:
        return "not scored"
    if f_d < 0:
        return f"SFT on D gained {-f_d:.1%} there (negative forgetting)"
    if f_d < near_zero:
        return f"SFT on D forgot {f_d:.1%}, below {near_zero:.1%}"
    if not resolved:
        return f"SFT on D's forgetting ({f_d:.1%}) is not resolved from zero (p >= {ALPHA})"
    return None


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
    values: Values | None = None,
) -> dict[str, Any]:
    """Build the forgetting table for every model in ``scores`` against ``base``.

    ``rewritten`` lists the labels compared with ``baseline`` (default: every model other than
    base and baseline). Returns a JSON-ready dict: ``models`` (per label: accuracies with 95%
    intervals, gains, forgetting, reductions, paired tests) and ``caveats`` (plain sentences);
    with per-item ``values`` also ``continuous`` (:func:`continuous_table`).
    """
    if base not in scores:
        raise ConfigError(f"forgetting table: base model {base!r} not among {sorted(scores)}")
    if baseline is not None and baseline not in scores:
        baseline = None
    if rewritten is None:
        rewritten = [m for m in scores if m not in (base, baseline)]
    caveats: list[str] = []
    models: dict[str, Any] = {
        label: _accuracy_row(scores, label, base, downstream, general, bootstrap_reps, seed)
        for label in scores
    }
    if baseline is not None:
        for label in rewritten:
            if label not in models or label == baseline:
                continue
            caveats += _compare_with_baseline(
                scores, models, label, baseline, general, near_zero, bootstrap_reps, seed
            )
    for label, row in models.items():
        test = row.get("forgetting_mean_test")
        if test is not None and label != base:
            row["forgetting_significant"] = test["p_bootstrap"] < 0.05
    table: dict[str, Any] = {
        "base": base,
        "baseline": baseline,
        "rewritten": [m for m in rewritten if m in models and m != baseline],
        "downstream": list(downstream),
        "general": list(general),
        "near_zero": near_zero,
        "models": models,
        "caveats": caveats,
    }
    if values and any(values.values()):
        table["continuous"] = continuous_table(
            values,
            general,
            base=base,
            baseline=baseline,
            rewritten=table["rewritten"],
            bootstrap_reps=bootstrap_reps,
            seed=seed,
        )
    return table


def _accuracy_row(
    scores: Scores,
    label: str,
    base: str,
    downstream: Sequence[str],
    general: Sequence[str],
    bootstrap_reps: int,
    seed: int,
) -> dict[str, Any]:
    """One model's accuracies, gains and forgetting against ``base``, with paired tests."""
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
    return row


def _compare_with_baseline(
    scores: Scores,
    models: dict[str, Any],
    label: str,
    baseline: str,
    general: Sequence[str],
    near_zero: float,
    bootstrap_reps: int,
    seed: int,
) -> list[str]:
    """Add a rewritten model's forgetting reductions and paired tests against SFT on D
    (``baseline``) to its row; return the caveats they call for."""
    f_d = models[baseline]
    row = models[label]
    resolved = {
        b: float(f_d["vs_base"].get(b, {}).get("p_bootstrap", 1.0)) < ALPHA for b in general
    }
    why = {
        b: reduction_absent(row["forgetting"][b], f_d["forgetting"][b], near_zero, resolved[b])
        for b in general
    }
    per = {
        b: reduction(row["forgetting"][b], f_d["forgetting"][b], near_zero, resolved[b])
        for b in general
    }
    row["reduction"] = per
    row["reduction_absent"] = {b: w for b, w in why.items() if w is not None}
    row["reduction_mean_of_ratios"] = _mean(list(per.values()))
    mean_test = f_d.get("forgetting_mean_test") or {}
    mean_resolved = float(mean_test.get("p_bootstrap", 1.0)) < ALPHA
    row["reduction_of_mean"] = reduction(
        row["forgetting_mean"], f_d["forgetting_mean"], near_zero, mean_resolved
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
    caveats: list[str] = []
    for bench, reason in row["reduction_absent"].items():
        caveats.append(
            f"{label}: forgetting reduction not computed for {bench}: {reason} "
            f"({baseline}), so 1 - F_R/F_D would only measure noise."
        )
    mean_why = reduction_absent(
        row["forgetting_mean"], f_d["forgetting_mean"], near_zero, mean_resolved
    )
    if mean_why is not None:
        caveats.append(
            f"{label}: reduction of the average forgetting not computed: {mean_why} ({baseline})."
        )
    return caveats


def _paired_values(values: Values, a: str, b: str, metric: str) -> tuple[list[float], list[float]]:
    """Values of models ``a`` and ``b`` on the items of ``metric`` both have, in ``a``'s order."""
    va, vb = (values.get(a) or {}).get(metric), (values.get(b) or {}).get(metric)
    if not va or not vb:
        return [], []
    ids = [i for i in va if i in vb]
    return [float(va[i]) for i in ids], [float(vb[i]) for i in ids]


#: Per-item measures of a general benchmark whose mean loss is a forgetting F, and their names.
LOGPROB_MEASURES = {
    "gold_logprob": "log P(gold)",
    "gold_choice_prob": "P(gold | choices)",
}
#: Every forgetting measure compared between SFT on D_R and SFT on D (larger = more forgetting
#: after the sign below: gold log-probabilities are lost, the drift NLL grows).
MEASURES = {**LOGPROB_MEASURES, "drift_nll": "drift from pi0"}


def continuous_metrics(values: Values, general: Sequence[str]) -> list[str]:
    """The metric keys present in ``values``, in report order: each gold log-probability form per
    general benchmark (raw, its probability among the choices, per character), drift, held-out
    NLL per set."""
    present = {m for per in values.values() for m in per}
    order = [
        f"{form}:{b}"
        for form in ("gold_logprob", "gold_choice_prob", "gold_logprob_norm")
        for b in general
    ]
    order += ["drift_nll"] + sorted(m for m in present if m.startswith("heldout_nll:"))
    return [m for m in order if m in present]


def continuous_table(
    values: Values,
    general: Sequence[str],
    base: str = "base",
    baseline: str | None = "sft_d",
    rewritten: Sequence[str] = (),
    bootstrap_reps: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired continuous metrics of every model against ``base`` (and rewritten against
    ``baseline``), items paired by id.

    Per model: ``vs_base[metric]`` (mean of model - base with a paired bootstrap 95% interval, p
    and the SD of the per-item differences); ``forgetting[measure]`` for the gold
    forms, the mean over general benchmarks of what was lost (base - model; items resampled
    within each benchmark), and for ``drift_nll`` the drift (model -
    base, nats per token); ``heldout``, the mean over held-out sets of the NLL change (model -
    base, nats per token; negative = learned). Per rewritten model also ``vs_baseline[metric]``
    (model - baseline), ``forgetting_diff[measure]`` (D - R: positive when D_R forgets or drifts
    less) and ``reduction[measure]`` = 1 - R / D, given only where SFT on D's value is positive
    and significant (else None and a caveat).
    """
    metrics = continuous_metrics(values, general)
    caveats: list[str] = []
    models: dict[str, Any] = {}
    if base not in values:
        return {"base": base, "metrics": metrics, "models": {}, "caveats": caveats}
    paired = _ContinuousPairs(values, general, bootstrap_reps, seed)
    for label in values:
        if label == base:
            continue
        models[label] = paired.row_vs_base(label, base, metrics)
    if baseline is not None and baseline in models:
        for label in rewritten:
            if label not in models or label == baseline:
                continue
            paired.compare_with_baseline(models, label, baseline, metrics, caveats)
    return {
        "base": base,
        "baseline": baseline if baseline in models else None,
        "metrics": metrics,
        "measures": dict(MEASURES),
        "models": models,
        "caveats": caveats,
    }


class _ContinuousPairs:
    """Paired comparisons of two models' per-item values, with the table's bootstrap settings."""

    def __init__(
        self, values: Values, general: Sequence[str], bootstrap_reps: int, seed: int
    ) -> None:
        self.values = values
        self.general = general
        self.bootstrap_reps = bootstrap_reps
        self.seed = seed

    def stratified(self, a: str, b: str, form: str) -> dict[str, float] | None:
        """Mean over general benchmarks of mean(a) - mean(b) on ``form``, or None."""
        pairs = {
            bench: _paired_values(self.values, a, b, f"{form}:{bench}") for bench in self.general
        }
        pairs = {bench: p for bench, p in pairs.items() if p[0]}
        return stratified_paired_mean(pairs, self.bootstrap_reps, self.seed) if pairs else None

    def paired(self, a: str, b: str, metric: str) -> dict[str, Any] | None:
        """mean(a) - mean(b) on ``metric`` with its paired test, or None without shared items."""
        x, y = _paired_values(self.values, a, b, metric)
        return paired_mean_diff(x, y, self.bootstrap_reps, self.seed).as_dict() if x else None

    def row_vs_base(self, label: str, base: str, metrics: Sequence[str]) -> dict[str, Any]:
        """One model's paired differences from ``base``, its forgetting and held-out change."""
        row: dict[str, Any] = {"vs_base": {}, "forgetting": {}}
        for m in metrics:
            if (test := self.paired(label, base, m)) is not None:
                row["vs_base"][m] = test
        for form in LOGPROB_MEASURES:
            if (f := self.stratified(base, label, form)) is not None:
                row["forgetting"][form] = f
        if "drift_nll" in row["vs_base"]:
            row["forgetting"]["drift_nll"] = row["vs_base"]["drift_nll"]
        heldout = [m for m in metrics if m.startswith("heldout_nll:")]
        held = {m: _paired_values(self.values, label, base, m) for m in heldout}
        held = {m: p for m, p in held.items() if p[0]}
        if held:
            row["heldout"] = stratified_paired_mean(held, self.bootstrap_reps, self.seed)
        return row

    def compare_with_baseline(
        self,
        models: dict[str, Any],
        label: str,
        baseline: str,
        metrics: Sequence[str],
        caveats: list[str],
    ) -> None:
        """Add a rewritten model's differences from SFT on D (``baseline``) and its reductions
        to its row; append the caveats they call for."""
        f_d = models[baseline]["forgetting"]
        row = models[label]
        row["vs_baseline"] = {}
        for m in metrics:
            if (test := self.paired(label, baseline, m)) is not None:
                row["vs_baseline"][m] = test
        diffs: dict[str, Any] = {}
        for form in LOGPROB_MEASURES:  # log P_R - log P_D = F_D - F_R
            if (d := self.stratified(label, baseline, form)) is not None:
                diffs[form] = d
        if (d := self.paired(baseline, label, "drift_nll")) is not None:  # NLL_D - NLL_R
            diffs["drift_nll"] = d
        row["forgetting_diff"] = diffs
        row["reduction"] = {
            m: _continuous_reduction(
                row["forgetting"].get(m), f_d.get(m), label, baseline, MEASURES[m], caveats
            )
            for m in MEASURES
            if m in row["forgetting"] and m in f_d
        }


def _continuous_reduction(
    r: Mapping[str, Any] | None,
    d: Mapping[str, Any] | None,
    label: str,
    baseline: str,
    what: str,
    caveats: list[str],
) -> float | None:
    """1 - R / D for a continuous forgetting measure, when SFT on D's is positive and its paired
    test says so; otherwise None and a caveat saying why."""
    if r is None or d is None:
        return None
    p = float(d.get("p_bootstrap", 1.0))
    if float(d["diff"]) <= 0 or p >= ALPHA:
        caveats.append(
            f"{label}: reduction in {what} not computed: SFT on D ({baseline}) shows "
            f"{float(d['diff']):+.4f} (p = {format_p(p)}), not a significant positive amount, so "
            "1 - R/D would only measure noise."
        )
        return None
    return 1.0 - float(r["diff"]) / float(d["diff"])
