"""The study's report: from the evaluate stage's per-item files of every SFT snapshot (arms x
seeds x steps) and the base, the arms' description, both gates' outputs and the rewriter's
training metrics, the pre-registered hypotheses H1-H6 with their decision rules, the arms'
final figures, the gain-vs-forgetting frontiers, acceptance by rewriter and the GRPO reward
curve; written as study.json, study.md, frontiers.png and reward_curve.png.

Orientation of every figure: gain = held-out NLL of base - model (nats/token, + = learned);
forgetting = drift (model - base NLL of pi0's answers, the primary measure), P(gold | choices)
(base - model, points) and log P(gold) (base - model, nats/item), + = forgot. Step 0 of every
arm is the base (gain 0, forgetting 0). Items of several held-out sets or benchmarks are pooled
(``<set>:<id>``), so a set weighs by its item count.

Study settings read from ``config`` (others are ignored): ``equivalence_margin`` (H4's margin as
a share of ref_rl's mean final gain, 0.25), ``bootstrap_reps`` (2000), ``seed`` (0), ``alpha``
(0.05), ``levels`` (gain levels of a frontier comparison, 5).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchgap.errors import ConfigError, DataError
from patchgap.fsutil import write_text_atomic
from patchgap.reports.evaluation import md_table
from patchgap.reports.seeds import (
    Arm,
    SeedCurves,
    SeedValues,
    contrast,
    equivalence,
    frontier_gap,
)
from patchgap.reports.stats import format_p, paired_mean_diff, sample_sd

BASE = "base"
LABEL = re.compile(r"^(?P<arm>[A-Za-z0-9_-]+)\.s(?P<seed>\d+)\.step(?P<step>\d+)$")
HELDOUT_PREFIX = "heldout_nll_"
DRIFT_FILE = "drift_nll"

#: measure -> (raw metric, sign of model - base, scale, unit, what it means).
MEASURES: dict[str, tuple[str, float, float, str, str]] = {
    "gain": ("heldout_nll", -1.0, 1.0, "nats/token", "held-out GSM8K NLL, base - model"),
    "drift": ("drift_nll", 1.0, 1.0, "nats/token", "drift: NLL of pi0's answers, model - base"),
    "p_gold": ("gold_choice_prob", -1.0, 100.0, "points", "P(gold | choices), base - model"),
    "logp_gold": ("gold_logprob", -1.0, 1.0, "nats/item", "log P(gold), base - model"),
}
FORGETTING = ("drift", "p_gold", "logp_gold")
PRIMARY = "drift"
SECONDARY = ("p_gold", "logp_gold")
REWRITERS = ("rl", "prompt")
DEFAULTS: dict[str, Any] = {
    "equivalence_margin": 0.25,
    "bootstrap_reps": 2000,
    "seed": 0,
    "alpha": 0.05,
    "levels": 5,
}

#: Per raw metric: item id -> value.
LabelValues = dict[str, dict[str, float]]


# -- loading ------------------------------------------------------------------------------------


def parse_label(label: str) -> tuple[str, int, int]:
    """``<arm>.s<seed>.step<N>`` -> (arm, seed, step); a one-line error naming the label else."""
    m = LABEL.match(label)
    if m is None:
        raise DataError(
            f"evaluation label {label!r} is neither {BASE!r} nor <arm>.s<seed>.step<N> "
            "(e.g. rw_rl.s1.step40)"
        )
    return m["arm"], int(m["seed"]), int(m["step"])


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {n} is not JSON ({err.msg})") from None
    return rows


def _nll(rows: Sequence[Mapping[str, Any]], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{r['id']}": float(r["nll"]) for r in rows if r.get("nll") is not None}


def read_label(folder: Path) -> LabelValues:
    """One label's raw per-item values: ``heldout_nll`` (``<set>:<id>``), ``drift_nll``,
    ``gold_choice_prob`` and ``gold_logprob`` (``<bench>:<id>``; from every file whose rows carry
    ``gold_choice_logprob``). Other files (generative answers) are not read."""
    out: LabelValues = {m[0]: {} for m in MEASURES.values()}
    for path in sorted(folder.glob("*.jsonl")):
        name = path.stem
        if name == DRIFT_FILE:
            out["drift_nll"] = _nll(_rows(path))
        elif name.startswith(HELDOUT_PREFIX):
            out["heldout_nll"].update(_nll(_rows(path), f"{name.removeprefix(HELDOUT_PREFIX)}:"))
        else:
            rows = _rows(path)
            if not rows or "gold_choice_logprob" not in rows[0]:
                continue
            for r in rows:
                key = f"{name}:{r['id']}"
                if r.get("gold_choice_logprob") is not None:
                    out["gold_choice_prob"][key] = math.exp(float(r["gold_choice_logprob"]))
                if r.get("gold_logprob") is not None:
                    out["gold_logprob"][key] = float(r["gold_logprob"])
    return out


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.jsonl")}


@dataclass
class StudyItems:
    """The base's raw values and every snapshot's: arm -> seed -> step -> raw values."""

    base: LabelValues
    runs: dict[str, dict[int, dict[int, LabelValues]]] = field(default_factory=dict)

    def arms(self) -> list[str]:
        return sorted(self.runs)

    def has(self, measure: str) -> bool:
        return bool(self.base.get(MEASURES[measure][0]))


def load_items(items_dir: Path) -> StudyItems:
    """Read ``items_dir`` (one folder per label). The base must hold held-out and drift NLLs,
    and every snapshot the same held-out, drift and benchmark files as the base."""
    items_dir = Path(items_dir)
    base_dir = items_dir / BASE
    if not base_dir.is_dir():
        raise DataError(f"{items_dir}: no {BASE!r} folder of per-item files (evaluate's items)")
    needed = {f"{DRIFT_FILE}.jsonl"} | {f for f in _files(base_dir) if f.startswith(HELDOUT_PREFIX)}
    if len(needed) < 2:
        raise DataError(
            f"{base_dir}: needs {DRIFT_FILE}.jsonl and a {HELDOUT_PREFIX}<set>.jsonl file"
        )
    # the files the report reads (not the generative answers, which only some labels may have)
    needed |= {f"{b.partition(':')[0]}.jsonl" for b in read_label(base_dir)["gold_choice_prob"]}
    study = StudyItems(base={})
    for folder in sorted(p for p in items_dir.iterdir() if p.is_dir()):
        missing = sorted(needed - _files(folder))
        if missing:
            raise DataError(f"{folder}: missing item file {missing[0]} (the base has it)")
        if folder.name == BASE:
            study.base = read_label(folder)
            continue
        arm, seed, step = parse_label(folder.name)
        if step <= 0:
            raise DataError(f"{folder}: step must be positive (step 0 is the base)")
        study.runs.setdefault(arm, {}).setdefault(seed, {})[step] = read_label(folder)
    return study


def oriented(base: LabelValues, model: LabelValues, measure: str) -> dict[str, float]:
    """Per item, ``measure`` of ``model`` against ``base`` (+ = gained for gain, forgot for
    forgetting) over the items both scored."""
    metric, sign, scale, _, _ = MEASURES[measure]
    b, m = base.get(metric) or {}, model.get(metric) or {}
    return {i: sign * scale * (m[i] - b[i]) for i in b if i in m}


def curves(study: StudyItems, arm: str, measure: str) -> SeedCurves:
    """Per seed (``s<seed>``): step -> item -> oriented value, with step 0 = the base (all 0)."""
    zero = {i: 0.0 for i in study.base.get(MEASURES[measure][0]) or {}}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for seed, steps in study.runs[arm].items():
        out[f"s{seed}"] = {0: zero}
        for step, values in steps.items():
            out[f"s{seed}"][step] = oriented(study.base, values, measure)
    return out


def final(study: StudyItems, arm: str, measure: str) -> SeedValues:
    """Per seed: item -> oriented value at that seed's last step."""
    return {
        f"s{seed}": oriented(study.base, steps[max(steps)], measure)
        for seed, steps in study.runs[arm].items()
    }


def seed_sd(values: SeedValues) -> float:
    """SD over seeds of each seed's item mean."""
    return sample_sd([sum(v.values()) / len(v) for v in values.values() if v])


def seed_mean(values: SeedValues) -> float:
    means = [sum(v.values()) / len(v) for v in values.values() if v]
    return sum(means) / len(means) if means else math.nan


# -- settings and arms --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The study settings the report uses (see the module docstring)."""

    margin: float = 0.25
    reps: int = 2000
    seed: int = 0
    alpha: float = 0.05
    levels: int = 5

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        merged = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
        try:
            s = cls(
                margin=float(merged["equivalence_margin"]),
                reps=int(merged["bootstrap_reps"]),
                seed=int(merged["seed"]),
                alpha=float(merged["alpha"]),
                levels=int(merged["levels"]),
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"study config: {err}") from None
        if not (s.margin > 0 and s.reps >= 10 and 0 < s.alpha < 0.5 and s.levels >= 2):
            raise ConfigError(
                "study config: need equivalence_margin > 0, bootstrap_reps >= 10, "
                f"0 < alpha < 0.5 and levels >= 2 (got {merged})"
            )
        return s


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what} file") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None


def absent(study: StudyItems, arms: Mapping[str, Any], needed: Sequence[str]) -> str | None:
    """Why some of ``needed`` has no evaluated snapshots (None when all do): not among the
    study's arms, no records (e.g. the gate accepted none), or not evaluated."""
    why = []
    for arm in needed:
        if arm in study.runs:
            continue
        info = arms.get(arm)
        if info is None:
            why.append(f"arm {arm} did not run (not among the study's arms)")
        elif not int(info.get("records") or 0):
            why.append(f"arm {arm} has no records")
        else:
            why.append(f"arm {arm} has no evaluated snapshots")
    return "; ".join(why) or None


def _k(arms: Mapping[str, Any], rewriter: str) -> int:
    """Accepted records of a rewriter: the size of its concentrated arms."""
    for arm in (f"rw_{rewriter}", f"ref_{rewriter}"):
        if arm in arms:
            return int(arms[arm].get("records") or 0)
    return 0


# -- statistics of one comparison -------------------------------------------------------------


def _result(
    figure: float, low: float, high: float, p: float, sds: Mapping[str, float], detail: Any
) -> dict[str, Any]:
    return {
        "figure": figure,
        "low": low,
        "high": high,
        "p": p,
        "seed_sd": dict(sds),
        "detail": detail,
    }


def directional(result: Mapping[str, Any]) -> str:
    """Supported when the interval lies above 0, refuted when below, else not supported."""
    if result["low"] > 0:
        return "supported"
    if result["high"] < 0:
        return "refuted"
    return "not supported"


def gap_result(study: StudyItems, a: str, b: str, measure: str, s: Settings) -> dict[str, Any]:
    """``frontier_gap(a, b)`` on ``measure``: forgetting of b minus a at matched gain (+ = a
    forgets less), mean over the shared gain range."""
    arm_a = Arm(gain=curves(study, a, "gain"), forgetting=curves(study, a, measure))
    arm_b = Arm(gain=curves(study, b, "gain"), forgetting=curves(study, b, measure))
    gap = frontier_gap(arm_a, arm_b, n_levels=s.levels, reps=s.reps, seed=s.seed, level=1 - s.alpha)
    sds = {a: seed_sd(final(study, a, measure)), b: seed_sd(final(study, b, measure))}
    return _result(gap.mean_gap, gap.mean_low, gap.mean_high, gap.p_bootstrap, sds, gap.as_dict())


def gain_equivalence(study: StudyItems, a: str, b: str, s: Settings) -> dict[str, Any]:
    """TOST of a's final gain against b's, margin = ``s.margin`` x b's mean final gain; the
    interval is the (1 - 2 alpha) one the test reads."""
    ga, gb = final(study, a, "gain"), final(study, b, "gain")
    ref = seed_mean(gb)
    if not ref > 0:
        raise ValueError(
            f"{b} did not gain (mean final gain {ref:+.3g}), so a margin of {s.margin:.0%} "
            "of its gain is undefined"
        )
    eq = equivalence(ga, gb, margin=s.margin * ref, alpha=s.alpha, reps=s.reps, seed=s.seed)
    res = _result(eq.diff, eq.low, eq.high, eq.p, {a: seed_sd(ga), b: seed_sd(gb)}, eq.as_dict())
    res.update(equivalent=eq.equivalent, margin=eq.margin)
    return res


def per_record(study: StudyItems, k_rl: int, k_p: int, measure: str, s: Settings) -> dict[str, Any]:
    """H6: final-step reduction per accepted record, (ref_rl - rw_rl) / k_rl minus
    (ref_prompt - rw_prompt) / k_p, with a hierarchical bootstrap over the four arms."""
    arms = ["ref_rl", "rw_rl", "ref_prompt", "rw_prompt"]
    vals = [final(study, a, measure) for a in arms]
    weights = [1 / k_rl, -1 / k_rl, -1 / k_p, 1 / k_p]
    c = contrast(vals, weights, reps=s.reps, seed=s.seed, level=1 - s.alpha)
    sds = dict(zip(arms, c.sd_seeds, strict=True))
    res = _result(c.value, c.low, c.high, c.p_bootstrap, sds, c.as_dict())
    means = [seed_mean(v) for v in vals]
    res["per_record"] = {
        "rl": (means[0] - means[1]) / k_rl,
        "prompt": (means[2] - means[3]) / k_p,
        "k_rl": k_rl,
        "k_prompt": k_p,
    }
    return res


# -- the hypotheses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One hypothesis: what it compares and how its verdict is read."""

    id: str
    title: str
    rule: str
    arms: tuple[str, ...]
    measure: str = PRIMARY
    secondary: tuple[str, ...] = SECONDARY


RULES = {
    "gap": "supported when the mean gap's interval lies above 0 (refuted when below)",
    "tost": "supported when equivalent (TOST, margin = {m:.0%} of ref_rl's mean final gain)",
    "h6": "supported (RL better per record) above 0, refuted (worse) below, else no difference",
    "h1": "supported when the lower end > 0 (refuted when the upper end < 0)",
}


def _measured(fn: Any, study: StudyItems, measures: Sequence[str]) -> dict[str, Any]:
    """``fn(measure)`` per measure, or ``{"not_tested": why}`` where it cannot be computed."""
    out: dict[str, Any] = {}
    for m in measures:
        if not study.has(m):
            out[m] = {"not_tested": f"{m} was not scored (no items in the base)"}
            continue
        try:
            out[m] = fn(m)
        except ValueError as err:  # e.g. frontiers that do not overlap in gain
            out[m] = {"not_tested": str(err).splitlines()[0]}
    return out


def _entry(spec: Spec) -> dict[str, Any]:
    return {
        "id": spec.id,
        "title": spec.title,
        "rule": spec.rule,
        "arms": list(spec.arms),
        "measure": spec.measure,
        "result": None,
        "secondary": {},
    }


def hypothesis(
    spec: Spec, study: StudyItems, arms: Mapping[str, Any], fn: Any, verdict: Any
) -> dict[str, Any]:
    """Evaluate one hypothesis: its primary result and verdict, its secondary measures (same
    numbers, no verdict); "not tested: <why>" when an arm is missing or the figure undefined."""
    entry = _entry(spec)
    why = absent(study, arms, spec.arms)
    if why is not None:
        entry["verdict"] = f"not tested: {why}"
        return entry
    res = _measured(fn, study, [spec.measure])[spec.measure]
    if "not_tested" in res:
        entry["verdict"] = f"not tested: {res['not_tested']}"
        return entry
    entry["result"] = res
    entry["verdict"] = verdict(res)
    entry["secondary"] = _measured(fn, study, spec.secondary)
    return entry


def _beside(study: StudyItems, arms: Mapping[str, Any], needed: Sequence[str], fn: Any) -> Any:
    why = absent(study, arms, needed)
    if why is not None:
        return {"not_tested": why}
    return fn()


def frontier_hypotheses(
    study: StudyItems, arms: Mapping[str, Any], s: Settings
) -> list[dict[str, Any]]:
    """H2, H3 (with ref_rl vs swap_rl beside it) and H5: frontier gaps on drift."""

    def gap(a: str, b: str) -> Any:
        return lambda m: gap_result(study, a, b, m, s)

    h2 = Spec(
        "H2",
        "concentrated mechanism: rw_rl forgets less than ref_rl",
        RULES["gap"],
        ("rw_rl", "ref_rl"),
    )
    h3 = Spec(
        "H3", "swap control: rw_rl forgets less than swap_rl", RULES["gap"], ("rw_rl", "swap_rl")
    )
    h5 = Spec("H5", "full data: dr forgets less than d", RULES["gap"], ("dr", "d"))
    out = [
        hypothesis(h2, study, arms, gap("rw_rl", "ref_rl"), directional),
        hypothesis(h3, study, arms, gap("rw_rl", "swap_rl"), directional),
        hypothesis(h5, study, arms, gap("dr", "d"), directional),
    ]
    out[1]["beside"] = {
        "what": "frontier_gap(ref_rl, swap_rl) on drift (expected to contain 0)",
        "result": _beside(
            study,
            arms,
            ("ref_rl", "swap_rl"),
            lambda: _measured(gap("ref_rl", "swap_rl"), study, [PRIMARY])[PRIMARY],
        ),
    }
    return out


def gain_hypothesis(study: StudyItems, arms: Mapping[str, Any], s: Settings) -> dict[str, Any]:
    """H4: rw_rl keeps ref_rl's final gain (TOST), with dr vs d beside it."""
    spec = Spec(
        "H4",
        "gain kept: rw_rl's final held-out gain is equivalent to ref_rl's",
        RULES["tost"].format(m=s.margin),
        ("rw_rl", "ref_rl"),
        measure="gain",
        secondary=(),
    )

    def verdict(res: Mapping[str, Any]) -> str:
        return "supported" if res["equivalent"] else "not supported"

    entry = hypothesis(
        spec, study, arms, lambda m: gain_equivalence(study, "rw_rl", "ref_rl", s), verdict
    )
    entry["beside"] = {
        "what": f"dr vs d final gain, TOST with margin {s.margin:.0%} of d's mean final gain",
        "result": _beside(
            study,
            arms,
            ("dr", "d"),
            lambda: _measured(lambda m: gain_equivalence(study, "dr", "d", s), study, ["gain"])[
                "gain"
            ],
        ),
    }
    return entry


H6_READING = {
    "supported": "RL better per accepted record",
    "refuted": "RL worse per accepted record",
    "not supported": "no difference shown",
}


def per_record_hypothesis(
    study: StudyItems, arms: Mapping[str, Any], s: Settings
) -> dict[str, Any]:
    """H6: drift reduction per accepted record, RL rewriter against prompt-only."""
    spec = Spec(
        "H6",
        "RL vs prompt-only: final drift reduction per accepted record",
        RULES["h6"],
        ("ref_rl", "rw_rl", "ref_prompt", "rw_prompt"),
    )
    k_rl, k_p = _k(arms, "rl"), _k(arms, "prompt")
    if absent(study, arms, spec.arms) is None and not (k_rl and k_p):
        entry = _entry(spec)
        entry["verdict"] = f"not tested: k_rl = {k_rl}, k_p = {k_p} (a rewriter accepted none)"
        return entry
    entry = hypothesis(spec, study, arms, lambda m: per_record(study, k_rl, k_p, m, s), directional)
    if entry["result"] is not None:
        entry["reading"] = H6_READING[entry["verdict"]]
    return entry


# -- gates: closeness (H1), acceptance and reasons ----------------------------------------------

D_R_FILE = "d_r.jsonl"
GATE_METRICS = "gate_metrics.json"


def read_gate(folder: Path) -> dict[str, Any]:
    """A gate's ``dataset_r`` folder: its D_R rows (with provenance) and, when the folder holds
    one, the gate's ``gate_metrics.json``."""
    folder = Path(folder)
    path = folder / D_R_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {D_R_FILE} (a gate's dataset_r output)")
    rows = _rows(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("provenance"), dict) or "status" not in row["provenance"]:
            raise DataError(f"{path}: row {n} (id {row.get('id')!r}) has no provenance.status")
    metrics = folder / GATE_METRICS
    return {
        "rows": rows,
        "metrics": read_json(metrics, "gate metrics") if metrics.is_file() else {},
    }


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def closeness(rows: Sequence[Mapping[str, Any]], s: Settings) -> dict[str, Any]:
    """H1 for one rewriter: per accepted record, NLL(reference) - NLL(rewrite) under pi0, mean
    with a paired bootstrap interval. Raises ValueError when no accepted record has both."""
    pairs = [
        (float(p["nll_reference"]), float(p["nll_pi0"]))
        for p in (r["provenance"] for r in rows)
        if p["status"] == "accepted"
        and _finite(p.get("nll_reference"))
        and _finite(p.get("nll_pi0"))
    ]
    if len(pairs) < 2:  # one record's "interval" is a point: nothing to decide on
        raise ValueError(f"{len(pairs)} accepted record(s) with both NLLs under pi0 (needs 2+)")
    ref, rw = zip(*pairs, strict=True)
    t = paired_mean_diff(list(ref), list(rw), reps=s.reps, seed=s.seed)
    return _result(t.diff, t.low, t.high, t.p_bootstrap, {}, t.as_dict())


def closeness_hypotheses(gates: Mapping[str, Any], s: Settings) -> list[dict[str, Any]]:
    """H1 per rewriter ("not tested" for a rewriter without a gate output)."""
    out = []
    for rw in REWRITERS:
        spec = Spec(
            "H1",
            "closeness: accepted rewrites have lower NLL under pi0 than the references",
            RULES["h1"],
            (),
            measure="nll_gap",
            secondary=(),
        )
        entry = {**_entry(spec), "rewriter": rw}
        if rw not in gates:
            entry["verdict"] = f"not tested: no gate output of the {rw} rewriter"
        else:
            try:
                entry["result"] = closeness(gates[rw]["rows"], s)
                entry["verdict"] = directional(entry["result"])
            except ValueError as err:
                entry["verdict"] = f"not tested: {err}"
            reported = gates[rw]["metrics"]
            if "nll_gap_accepted" in reported:
                entry["gate_reported"] = {
                    k: reported.get(f"nll_gap_accepted{k}") for k in ("", "_low", "_high", "_n")
                }
        out.append(entry)
    return out


def acceptance(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Records, accepted, the rate, fallback reasons, and every gate reason counted over
    candidates and over records (a record counts once per reason any candidate had)."""
    prov = [r["provenance"] for r in rows]
    accepted = sum(1 for p in prov if p["status"] == "accepted")
    per_candidate: Counter[str] = Counter()
    per_record: Counter[str] = Counter()
    for p in prov:
        reasons = [str(x) for x in p.get("gate_reasons") or []]
        per_candidate.update(reasons)
        per_record.update(set(reasons))
    fallback = Counter(str(p.get("fallback_reason")) for p in prov if p["status"] != "accepted")
    return {
        "records": len(prov),
        "accepted": accepted,
        "rate": accepted / len(prov) if prov else 0.0,
        "candidates": sum(per_candidate.values()),
        "fallback_reasons": dict(sorted(fallback.items())),
        "reasons_candidates": dict(sorted(per_candidate.items())),
        "reasons_records": dict(sorted(per_record.items())),
    }


def fisher_acceptance(k_a: int, n_a: int, k_b: int, n_b: int) -> dict[str, Any]:
    """Fisher's exact test (two-sided) of k_a/n_a against k_b/n_b."""
    from scipy.stats import fisher_exact

    odds, p = fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]])
    return {
        "k_rl": k_a,
        "n_rl": n_a,
        "k_prompt": k_b,
        "n_prompt": n_b,
        "rate_rl": k_a / n_a if n_a else None,
        "rate_prompt": k_b / n_b if n_b else None,
        "odds_ratio": float(odds) if math.isfinite(odds) else None,
        "p": float(p),
    }


def both_accepted(
    rl: Sequence[Mapping[str, Any]], prompt: Sequence[Mapping[str, Any]], s: Settings
) -> dict[str, Any] | None:
    """On records both gates accepted: pi0 NLL of the prompt-only rewrite minus the RL one's,
    paired by record (+ = the RL rewrite is closer to pi0). None without such records."""

    def nlls(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return {
            str(r["id"]): float(r["provenance"]["nll_pi0"])
            for r in rows
            if r["provenance"]["status"] == "accepted" and _finite(r["provenance"].get("nll_pi0"))
        }

    a, b = nlls(rl), nlls(prompt)
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    t = paired_mean_diff([b[i] for i in ids], [a[i] for i in ids], reps=s.reps, seed=s.seed)
    return {**t.as_dict(), "records": len(ids)}


def gate_section(gates: Mapping[str, Any], s: Settings) -> dict[str, Any]:
    """Acceptance per rewriter, Fisher's test of k_rl/n vs k_p/n, the both-accepted NLL gap."""
    out: dict[str, Any] = {"acceptance": {rw: acceptance(g["rows"]) for rw, g in gates.items()}}
    for rw, g in gates.items():
        if g["metrics"].get("judge_description"):
            out["acceptance"][rw]["judge"] = g["metrics"]["judge_description"]
    if all(rw in gates for rw in REWRITERS):
        a, b = out["acceptance"]["rl"], out["acceptance"]["prompt"]
        out["fisher"] = fisher_acceptance(a["accepted"], a["records"], b["accepted"], b["records"])
        out["both_accepted"] = both_accepted(gates["rl"]["rows"], gates["prompt"]["rows"], s)
    return out


# -- the rewriter's reward curve ----------------------------------------------------------------

REWARD_TERMS = ("reward", "reward_std", "r_task", "r_dist", "r_div", "gate_pass_rate", "kl")


def reward_curve(path: Path | None) -> dict[str, Any]:
    """Per GRPO step the mean reward and each logged component (train_rewriter's metrics.jsonl),
    with the first and last steps' reward."""
    if path is None:
        return {"steps": [], "terms": []}
    if not Path(path).is_file():
        raise DataError(f"{path}: no such rewriter metrics file")
    steps = []
    for row in sorted(_rows(Path(path)), key=lambda r: int(r.get("step", 0))):
        point = {k: float(row[k]) for k in REWARD_TERMS if _finite(row.get(k))}
        steps.append({"step": int(row.get("step", 0)), **point})
    terms = [k for k in REWARD_TERMS if any(k in p for p in steps)]
    rewards = [p["reward"] for p in steps if "reward" in p]
    out: dict[str, Any] = {"steps": steps, "terms": terms}
    if rewards:
        out.update(reward_first=rewards[0], reward_last=rewards[-1])
    return out


# -- arms: final figures and frontier points ----------------------------------------------------


def _measures(study: StudyItems) -> list[str]:
    return [m for m in ("gain", *FORGETTING) if study.has(m)]


def arm_finals(study: StudyItems, arms: Mapping[str, Any]) -> dict[str, Any]:
    """Per arm: its seeds' final steps, and per measure the seed mean and seed SD there."""
    out: dict[str, Any] = {}
    for arm in study.arms():
        info = arms.get(arm) or {}
        row: dict[str, Any] = {
            "kind": info.get("kind"),
            "rewriter": info.get("rewriter"),
            "records": info.get("records"),
            "seeds": len(study.runs[arm]),
            "final_steps": sorted({max(steps) for steps in study.runs[arm].values()}),
        }
        for m in _measures(study):
            values = final(study, arm, m)
            row[m] = {"mean": seed_mean(values), "sd_seeds": seed_sd(values)}
        out[arm] = row
    return out


def _band(values: SeedValues, s: Settings) -> dict[str, float]:
    c = contrast([values], [1.0], reps=s.reps, seed=s.seed, level=1 - s.alpha)
    return {"mean": c.value, "low": c.low, "high": c.high, "sd_seeds": c.sd_seeds[0]}


def frontier_points(study: StudyItems, s: Settings) -> dict[str, list[dict[str, Any]]]:
    """Per arm, per step that every seed reached (0 = the base): the seed-mean gain and each
    forgetting measure with its band over seeds and items."""
    zero = {"mean": 0.0, "low": 0.0, "high": 0.0, "sd_seeds": 0.0}
    out: dict[str, list[dict[str, Any]]] = {}
    for arm in study.arms():
        runs = study.runs[arm]
        steps = sorted(set.intersection(*[set(v) for v in runs.values()]))
        points = [{"step": 0, **{m: zero for m in _measures(study)}}]
        for step in steps:
            point: dict[str, Any] = {"step": step}
            for m in _measures(study):
                values = {f"s{seed}": oriented(study.base, runs[seed][step], m) for seed in runs}
                point[m] = _band(values, s)
            points.append(point)
        out[arm] = points
    return out


def caveats(study: StudyItems) -> list[str]:
    """Plain sentences on what limits the figures (arms with one seed, unequal final steps)."""
    out = []
    for arm in study.arms():
        runs = study.runs[arm]
        if len(runs) < 2:
            out.append(f"{arm} has {len(runs)} seed: its intervals hold no seed-to-seed variance.")
        if len({max(steps) for steps in runs.values()}) > 1:
            out.append(f"{arm}'s seeds end at different steps; each seed's last one is its final.")
    return out


def build_study(
    study: StudyItems,
    arms_json: Mapping[str, Any],
    gates: Mapping[str, Any],
    reward: Mapping[str, Any],
    s: Settings,
) -> dict[str, Any]:
    """Every figure of the report as one JSON-ready dict."""
    arms = arms_json.get("arms") or {}
    h2, h3, h5 = frontier_hypotheses(study, arms, s)
    h6 = per_record_hypothesis(study, arms, s)
    gate_figures = gate_section(gates, s)
    if "fisher" in gate_figures:  # H6 reports acceptance beside the per-record figure
        h6["acceptance"] = gate_figures["fisher"]
    hypotheses = [
        *closeness_hypotheses(gates, s),
        h2,
        h3,
        gain_hypothesis(study, arms, s),
        h5,
        h6,
    ]
    return {
        "settings": {
            "equivalence_margin": s.margin,
            "bootstrap_reps": s.reps,
            "seed": s.seed,
            "alpha": s.alpha,
            "levels": s.levels,
        },
        "measures": {m: {"unit": v[3], "meaning": v[4]} for m, v in MEASURES.items()},
        "primary": PRIMARY,
        "hypotheses": hypotheses,
        "arms": arm_finals(study, arms),
        "arm_info": {a: {k: v for k, v in i.items() if k != "ids"} for a, i in arms.items()},
        "jobs": list(arms_json.get("jobs") or []),
        "frontiers": frontier_points(study, s),
        "caveats": caveats(study),
        "gates": gate_figures,
        "reward": dict(reward),
    }


# -- rendering ----------------------------------------------------------------------------------

#: What each hypothesis's figure means, in one line.
MEANINGS = {
    "H1": "mean over accepted records of NLL(reference) - NLL(rewrite) under pi0 (nats/token; "
    "+ = rewrites are closer to pi0)",
    "H2": "forgetting of ref_rl minus rw_rl at matched gain, mean over the shared gain range "
    "(+ = the rewrites forget less)",
    "H3": "forgetting of swap_rl minus rw_rl at matched gain (+ = the rewrites forget less than "
    "other references of the same task)",
    "H4": "final held-out gain of rw_rl minus ref_rl (nats/token), its 90% interval against "
    "+/- the margin",
    "H5": "forgetting of d minus dr at matched gain (+ = D_R forgets less; D's own frontier is "
    "the 'train less' control)",
    "H6": "(ref_rl - rw_rl) / k_rl minus (ref_prompt - rw_prompt) / k_p at the final step "
    "(+ = RL removes more forgetting per accepted record)",
}
NAMES = {
    "gain": "gain",
    "drift": "drift",
    "p_gold": "P(gold | choices)",
    "logp_gold": "log P(gold)",
}


def _n(x: Any, fmt: str = "+.3g") -> str:
    return "n/a" if not _finite(x) else format(float(x), fmt)


def _ci(res: Mapping[str, Any] | None) -> str:
    if not res or "figure" not in res:
        return str((res or {}).get("not_tested", "n/a"))
    return f"{_n(res['figure'])} [{_n(res['low'])}, {_n(res['high'])}]"


def _sds(res: Mapping[str, Any] | None) -> str:
    sds = (res or {}).get("seed_sd") or {}
    return ", ".join(f"{a} {_n(v, '.2g')}" for a, v in sds.items()) or "-"


def _p(res: Mapping[str, Any] | None) -> str:
    return format_p(res["p"]) if res and "p" in res else "n/a"


def _hid(h: Mapping[str, Any]) -> str:
    return f"{h['id']} ({h['rewriter']})" if h.get("rewriter") else h["id"]


def verdict_rows(study: Mapping[str, Any]) -> list[list[str]]:
    rows = [["hypothesis", "figure [interval]", "p", "seed SDs", "rule", "verdict"]]
    for h in study["hypotheses"]:
        verdict = h["verdict"] + (f" ({h['reading']})" if h.get("reading") else "")
        rows.append(
            [_hid(h), _ci(h["result"]), _p(h["result"]), _sds(h["result"]), h["rule"], verdict]
        )
    return rows


def _fisher_line(f: Mapping[str, Any]) -> str:
    return (
        f"Acceptance k_rl/n vs k_p/n: {f['k_rl']}/{f['n_rl']} vs {f['k_prompt']}/{f['n_prompt']}, "
        f"Fisher's exact p = {format_p(f['p'])}."
    )


def _hypothesis_section(h: Mapping[str, Any]) -> list[str]:
    lines = [f"### {_hid(h)}: {h['title']}", "", f"Figure: {MEANINGS[h['id']]}.", ""]
    if "acceptance" in h:
        lines += [_fisher_line(h["acceptance"]), ""]
    if h["result"] is None:
        return [*lines, f"Verdict: {h['verdict']}.", ""]
    rows = [["measure", "figure [interval]", "p", "seed SDs"]]
    rows.append(
        [
            NAMES.get(h["measure"], h["measure"]) + " (primary)",
            _ci(h["result"]),
            _p(h["result"]),
            _sds(h["result"]),
        ]
    )
    for m, res in h["secondary"].items():
        rows.append([f"{NAMES[m]} (secondary)", _ci(res), _p(res), _sds(res)])
    lines += [md_table(rows), "", f"Verdict: {h['verdict']}. Rule: {h['rule']}."]
    if h["id"] == "H4":
        lines.append(f"Margin: +/- {_n(h['result']['margin'], '.3g')} nats/token.")
    if "per_record" in h["result"]:
        pr = h["result"]["per_record"]
        lines.append(
            f"Per accepted record: RL {_n(pr['rl'])} (k_rl = {pr['k_rl']}), prompt-only "
            f"{_n(pr['prompt'])} (k_p = {pr['k_prompt']})."
        )
    if "gate_reported" in h:
        lines.append(f"The gate's own figure: {_n(h['gate_reported'][''])}.")
    if "beside" in h:
        lines.append(
            f"Beside it, {h['beside']['what']}: {_ci(h['beside']['result'])}, "
            f"p = {_p(h['beside']['result'])}."
        )
    return [*lines, ""]


def _ms(row: Mapping[str, Any], m: str) -> str:
    v = row.get(m)
    return "n/a" if not v else f"{_n(v['mean'], '.3g')} ± {_n(v['sd_seeds'], '.2g')}"


def arm_rows(study: Mapping[str, Any]) -> list[list[str]]:
    rows = [["arm", "kind", "records", "seeds", "final step", *[NAMES[m] for m in MEASURES]]]
    for arm, r in study["arms"].items():
        steps = ", ".join(str(x) for x in r["final_steps"])
        rows.append(
            [
                arm,
                str(r["kind"] or "-"),
                str(r["records"] or "-"),
                str(r["seeds"]),
                steps,
                *[_ms(r, m) for m in MEASURES],
            ]
        )
    return rows


def _counts(c: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "-"


def gate_lines(gates: Mapping[str, Any]) -> list[str]:
    acc = gates.get("acceptance") or {}
    if not acc:
        return ["No gate output was given.", ""]
    rows = [
        [
            "rewriter",
            "accepted / records",
            "candidates",
            "fallbacks",
            "reasons (candidates)",
            "reasons (records)",
        ]
    ]
    for rw, a in acc.items():
        rows.append(
            [
                rw,
                f"{a['accepted']} / {a['records']} ({a['rate']:.1%})",
                str(a["candidates"]),
                _counts(a["fallback_reasons"]),
                _counts(a["reasons_candidates"]),
                _counts(a["reasons_records"]),
            ]
        )
    lines = [md_table(rows), ""]
    if f := gates.get("fisher"):
        lines.append(_fisher_line(f))
    if "both_accepted" in gates:
        b = gates["both_accepted"]
        lines.append(
            "Records both accepted: none."
            if b is None
            else f"Records both accepted ({b['records']}): pi0 NLL of the prompt-only rewrite "
            f"minus the RL one {_n(b['diff'])} [{_n(b['low'])}, {_n(b['high'])}] (+ = RL closer "
            f"to pi0), p = {format_p(b['p_bootstrap'])}."
        )
    return [*lines, ""]


def render_markdown(study: Mapping[str, Any]) -> str:
    """study.md: the verdict table first, then a section per hypothesis, the arms, the gates
    and the rewriter's reward."""
    s = study["settings"]
    lines = [
        "# Study report",
        "",
        f"alpha = {s['alpha']}; intervals: hierarchical bootstrap over seeds and items "
        f"({s['bootstrap_reps']} resamples, seed {s['seed']}), {1 - s['alpha']:.0%} except H4's "
        f"TOST ({1 - 2 * s['alpha']:.0%}); frontier gaps over {s['levels']} gain levels. "
        "Forgetting: drift (primary), P(gold | choices) in points and log P(gold) (secondary, no "
        "verdict); gain: held-out NLL, base - model.",
        "",
        "## Verdicts",
        "",
        md_table(verdict_rows(study)),
        "",
        *[f"- {c}" for c in study.get("caveats") or []],
        *([""] if study.get("caveats") else []),
        "## Hypotheses",
        "",
    ]
    for h in study["hypotheses"]:
        lines += _hypothesis_section(h)
    lines += [
        "## Arms at the final step",
        "",
        "Seed mean ± seed SD of each arm's item mean (gain and drift in nats/token, P(gold) in "
        "points, log P(gold) in nats/item; + forgetting = forgot).",
        "",
        md_table(arm_rows(study)) if study["arms"] else "No arm was evaluated.",
        "",
        "## Frontiers",
        "",
        "Gain (x) against forgetting (y) per arm along SFT, step 0 = the base; bars: "
        f"{1 - s['alpha']:.0%} bands over seeds and items. Lower right is better.",
        "",
        "![frontiers](frontiers.png)",
        "",
        "## Gates: acceptance and reasons",
        "",
        *gate_lines(study["gates"]),
        "## Rewriter training",
        "",
        *_reward_lines(study["reward"]),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _reward_lines(reward: Mapping[str, Any]) -> list[str]:
    if not reward.get("steps"):
        return ["No rewriter metrics were given.", ""]
    first, last = reward.get("reward_first"), reward.get("reward_last")
    return [
        f"{len(reward['steps'])} GRPO steps; mean reward {_n(first, '.3g')} at the first step, "
        f"{_n(last, '.3g')} at the last (logged terms: {', '.join(reward['terms'])}).",
        "",
        "![reward curve](reward_curve.png)",
        "",
    ]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display in pods and CI
    import matplotlib.pyplot as plt

    return plt


def plot_frontiers(study: Mapping[str, Any], path: Path) -> Path:
    """One panel per forgetting measure: x = gain, y = forgetting, a line per arm with markers
    at the snapshots and error bars from the bands."""
    plt = _pyplot()
    points = study["frontiers"]
    measures = [m for m in FORGETTING if any(m in p for pts in points.values() for p in pts)]
    panels = max(1, len(measures))
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, m in zip(axes[0], measures, strict=False):
        for arm, pts in points.items():
            g = [p["gain"] for p in pts]
            f = [p[m] for p in pts]
            ax.errorbar(
                [x["mean"] for x in g],
                [y["mean"] for y in f],
                xerr=[[x["mean"] - x["low"] for x in g], [x["high"] - x["mean"] for x in g]],
                yerr=[[y["mean"] - y["low"] for y in f], [y["high"] - y["mean"] for y in f]],
                marker="o",
                markersize=3,
                capsize=2,
                label=arm,
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(f"gain ({MEASURES['gain'][3]})")
        ax.set_ylabel(f"{NAMES[m]} forgetting ({MEASURES[m][3]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if not measures:
        axes[0][0].text(0.5, 0.5, "no arm evaluated", ha="center", va="center")
    fig.suptitle("gain vs forgetting along SFT (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward(reward: Mapping[str, Any], path: Path) -> Path:
    """The rewriter's mean reward and its components per GRPO step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for term in [t for t in reward.get("terms") or [] if t not in ("reward_std", "kl")]:
        pts = [(p["step"], p[term]) for p in reward["steps"] if term in p]
        ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=term)
    if reward.get("terms"):
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no rewriter metrics", ha="center", va="center")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean per step")
    ax.grid(alpha=0.3)
    ax.set_title("rewriter training: reward per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scalar_metrics(figures: Mapping[str, Any]) -> dict[str, float]:
    """Flat numbers for a pipeline's metrics panel: per hypothesis its figure, interval, p and
    1/0/-1 for supported/not supported/refuted (absent when not tested); acceptance rates."""
    out: dict[str, float] = {}
    codes = {"supported": 1.0, "not supported": 0.0, "refuted": -1.0}
    for h in figures["hypotheses"]:
        res = h.get("result")
        if not res:
            continue
        key = f"{h['id']}_{h['rewriter']}" if h.get("rewriter") else h["id"]
        for k in ("figure", "low", "high", "p"):
            if _finite(res.get(k)):
                out[f"{key}_{k}"] = float(res[k])
        out[f"{key}_verdict"] = codes[h["verdict"]]
    for rw, a in (figures["gates"].get("acceptance") or {}).items():
        out[f"acceptance_{rw}"] = float(a["rate"])
    return out


def _json_safe(x: Any) -> Any:
    """NaN and infinities as null: study.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_study(
    items_dir: Path,
    arms_json: Path,
    gates: Mapping[str, Path],
    rewriter_metrics: Path | None,
    out: Path,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Read the study's inputs, compute every figure and write study.json, study.md,
    frontiers.png and reward_curve.png into ``out``; return the figures (study.json's dict)."""
    settings = Settings.from_config(config)
    unknown = sorted(set(gates) - set(REWRITERS))
    if unknown:
        raise ConfigError(f"study report: unknown rewriter {unknown[0]!r} (use rl or prompt)")
    study = load_items(Path(items_dir))
    arms = read_json(Path(arms_json), "arms.json")
    if not isinstance(arms, dict) or not isinstance(arms.get("arms", {}), dict):
        raise DataError(f"{arms_json}: expected an object with an 'arms' object")
    gate_data = {rw: read_gate(Path(folder)) for rw, folder in gates.items()}
    reward = reward_curve(Path(rewriter_metrics) if rewriter_metrics is not None else None)
    figures = _json_safe(build_study(study, arms, gate_data, reward, settings))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "study.json", json.dumps(figures, indent=2, sort_keys=True))
    write_text_atomic(out / "study.md", render_markdown(figures))
    plot_frontiers(figures, out / "frontiers.png")
    plot_reward(figures["reward"], out / "reward_curve.png")
    return figures
