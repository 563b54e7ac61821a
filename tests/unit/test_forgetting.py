"""The forgetting table: gains, forgetting, 1 - F_R/F_D and its near-zero caveat."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from patchgap.errors import ConfigError
from patchgap.reports.forgetting import forgetting_table, reduction


def _items(n_correct: int, n: int = 100) -> dict[str, bool]:
    return {f"q{i}": i < n_correct for i in range(n)}


def _scores() -> dict:
    return {
        "base": {"math": _items(20), "arc": _items(60), "mmlu": _items(50)},
        "sft_d": {"math": _items(40), "arc": _items(50), "mmlu": _items(40)},
        "sft_dr": {"math": _items(38), "arc": _items(55), "mmlu": _items(46)},
    }


def test_gain_forgetting_and_reduction() -> None:
    t = forgetting_table(_scores(), ["math"], ["arc", "mmlu"], bootstrap_reps=200)
    d, r = t["models"]["sft_d"], t["models"]["sft_dr"]
    assert d["gain"]["math"] == pytest.approx(0.20)
    assert r["gain"]["math"] == pytest.approx(0.18)
    assert d["forgetting"] == {"arc": pytest.approx(0.10), "mmlu": pytest.approx(0.10)}
    assert r["forgetting"] == {"arc": pytest.approx(0.05), "mmlu": pytest.approx(0.04)}
    assert d["forgetting_mean"] == pytest.approx(0.10)
    assert r["reduction"]["arc"] == pytest.approx(0.5)
    assert r["reduction"]["mmlu"] == pytest.approx(0.6)
    assert r["reduction_mean_of_ratios"] == pytest.approx(0.55)
    assert r["reduction_of_mean"] == pytest.approx(1 - 0.045 / 0.10)
    # paired tests are there and forgetting of 10 points on 100 items is significant
    assert d["vs_base"]["arc"]["a_only"] == 10
    assert d["forgetting_significant"] is True
    assert set(r["vs_baseline"]) == {"arc", "mmlu"}
    assert t["caveats"] == []
    assert "reduction" not in d  # the baseline is not compared with itself


def test_near_zero_baseline_forgetting_gives_caveat_not_ratio() -> None:
    scores = _scores()
    scores["sft_d"]["arc"] = _items(60)  # SFT on D forgot nothing on arc
    t = forgetting_table(scores, ["math"], ["arc", "mmlu"], bootstrap_reps=100)
    r = t["models"]["sft_dr"]
    assert r["reduction"]["arc"] is None
    assert r["reduction"]["mmlu"] == pytest.approx(0.6)
    assert any("arc" in c and "noise" in c for c in t["caveats"])


def test_reduction_helper_and_missing_base() -> None:
    assert reduction(0.05, 0.10) == pytest.approx(0.5)
    assert reduction(0.05, 0.001) is None
    assert reduction(None, 0.1) is None
    with pytest.raises(ConfigError, match="base model"):
        forgetting_table(_scores(), ["math"], ["arc"], base="pi0")


def test_items_are_paired_by_id() -> None:
    scores = _scores()
    # the tuned model was scored on a subset only: tests use the shared items
    scores["sft_d"]["arc"] = {k: v for k, v in list(scores["sft_d"]["arc"].items())[:30]}
    t = forgetting_table(scores, ["math"], ["arc"], bootstrap_reps=50)
    assert t["models"]["sft_d"]["vs_base"]["arc"]["n"] == 30


def test_verdict_holds_only_when_the_paired_test_favours_d_r(tmp_path) -> None:  # noqa: ANN001
    from patchgap.reports.evaluation import forgetting_verdicts, render_markdown, write_report

    scores = _scores()
    # D_R forgets 2 points less on arc and 4 less on mmlu than D (of 100 items): not significant.
    weak = forgetting_table(scores, ["math"], ["arc", "mmlu"], bootstrap_reps=500)
    (v,) = forgetting_verdicts(weak)
    assert v["model"] == "sft_dr" and v["baseline"] == "sft_d"
    assert v["f_d_minus_f_r"] == pytest.approx(0.055)
    assert v["direction"] == "less"
    assert v["holds"] is (v["p"] < 0.05)

    # Many more items with the same gap: now the paired test resolves it.
    def times8(items: dict[str, bool]) -> dict[str, bool]:
        return {f"{k}{j}": x for j in range(8) for k, x in items.items()}

    many = {m: {b: times8(items) for b, items in bs.items()} for m, bs in scores.items()}
    strong = forgetting_table(many, ["math"], ["arc", "mmlu"], bootstrap_reps=500)
    (v2,) = forgetting_verdicts(strong)
    assert v2["holds"] is True and v2["p"] < 0.05 and v2["low"] > 0
    # D_R forgetting more is reported as such, never as holding.
    worse = dict(scores, sft_dr=scores["sft_d"] | {"arc": _items(45)})
    (v3,) = forgetting_verdicts(forgetting_table(worse, ["math"], ["arc"], bootstrap_reps=200))
    assert v3["direction"] == "more" and v3["holds"] is False
    md = render_markdown(strong)
    assert "forgetting(sft_dr) < forgetting(sft_d) holds" in md and "paired bootstrap" in md
    paths = write_report(strong, tmp_path)
    import json

    assert json.loads(paths["json"].read_text())["verdicts"][0]["holds"] is True


def test_end_of_run_summary_fits_the_terminal_and_says_how_to_fetch_the_report(
    tmp_path: Path,
) -> None:
    import json

    from patchgap.reports.evaluation import render_text
    from patchgap.run.execute import run_summary

    table = forgetting_table(_scores(), ["math"], ["arc", "mmlu"], bootstrap_reps=200)
    text = render_text(table, 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Accuracy (95% Wilson interval)" in text and "Forgetting against sft_d" in text
    assert "forgetting(sft_dr) < forgetting(sft_d)" in text and "![" not in text
    # One column per model, one row per figure, each figure whole on its line.
    rows = [line.split() for line in text.splitlines()]
    assert ["benchmark", "base", "sft_d", "sft_dr"] in rows
    assert ["reduction", "(of", "mean)", "-", "+55.0%"] in rows

    folder = tmp_path / "root" / "evaluate" / "report"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"forgetting_table": table}))
    summary = run_summary(folder / "results.json", tmp_path / "root", "run-7", "bkt")
    assert f"report: {folder / 'report.html'}" in summary
    assert "patchgap artifacts get run-7 ./run-7 --bucket bkt" in summary
    assert "./run-7/artifacts/evaluate/report/report.html" in summary


def _values(shift_d: float, shift_r: float, n: int = 200, seed: int = 0) -> dict:
    """Per-item continuous values: base, SFT on D losing ``shift_d`` nats of gold log-prob (and
    drifting by it), SFT on D_R losing ``shift_r``; noise on every item."""
    import random

    rng = random.Random(seed)
    base_lp = {b: {f"q{i}": rng.gauss(-20.0, 8.0) for i in range(n)} for b in ("arc", "mmlu")}
    base_drift = {f"d{i}": rng.gauss(1.0, 0.3) for i in range(n)}
    held = {f"h{i}": rng.gauss(1.2, 0.2) for i in range(n)}

    def model(shift: float, learn: float) -> dict:
        out = {
            f"gold_logprob:{b}": {k: v - shift + rng.gauss(0, 0.3) for k, v in items.items()}
            for b, items in base_lp.items()
        }
        out |= {
            f"gold_choice_prob:{b}": {k: 0.5 - shift / 5 + rng.gauss(0, 0.1) for k in items}
            for b, items in base_lp.items()
        }
        out["drift_nll"] = {k: v + shift / 10 + rng.gauss(0, 0.02) for k, v in base_drift.items()}
        out["heldout_nll:gsm8k"] = {k: v - learn + rng.gauss(0, 0.02) for k, v in held.items()}
        return out

    return {
        "base": model(0.0, 0.0)
        | {f"gold_logprob:{b}": v for b, v in base_lp.items()}
        | {"drift_nll": base_drift, "heldout_nll:gsm8k": held},
        "sft_d": model(shift_d, 0.3),
        "sft_dr": model(shift_r, 0.3),
    }


def test_continuous_metrics_resolve_what_accuracy_cannot() -> None:
    from patchgap.reports.evaluation import continuous_verdicts, render_markdown

    table = forgetting_table(
        _scores(), ["math"], ["arc", "mmlu"], bootstrap_reps=300, values=_values(0.5, 0.25)
    )
    cont = table["continuous"]
    assert cont["metrics"] == [
        "gold_logprob:arc",
        "gold_logprob:mmlu",
        "gold_choice_prob:arc",
        "gold_choice_prob:mmlu",
        "drift_nll",
        "heldout_nll:gsm8k",
    ]
    d, r = cont["models"]["sft_d"], cont["models"]["sft_dr"]
    # model - base: both lost gold log-probability, significantly, despite 8 nats of item spread
    arc = d["vs_base"]["gold_logprob:arc"]
    assert arc["diff"] == pytest.approx(-0.5, abs=0.08) and arc["high"] < 0 and arc["n"] == 200
    assert arc["sd_diff"] == pytest.approx(0.3, abs=0.05)
    assert d["forgetting"]["gold_logprob"]["diff"] == pytest.approx(0.5, abs=0.08)  # base - model
    assert d["forgetting"]["gold_logprob"]["p_bootstrap"] < 0.01
    assert d["forgetting"]["gold_choice_prob"]["diff"] == pytest.approx(0.1, abs=0.03)
    assert d["forgetting"]["drift_nll"]["diff"] == pytest.approx(0.05, abs=0.01)
    assert d["heldout"]["diff"] == pytest.approx(-0.3, abs=0.02)  # learned the downstream task
    # D_R against D: half the forgetting and half the drift
    assert r["forgetting_diff"]["gold_logprob"]["diff"] == pytest.approx(0.25, abs=0.08)
    assert r["forgetting_diff"]["drift_nll"]["diff"] == pytest.approx(0.025, abs=0.01)
    for measure in ("gold_logprob", "gold_choice_prob", "drift_nll"):
        assert r["reduction"][measure] == pytest.approx(0.5, abs=0.2), measure
    verdicts = continuous_verdicts(table)
    assert {v["measure"] for v in verdicts if v["holds"]} == {
        "log P(gold)",
        "P(gold | choices)",
        "drift from pi0",
    }
    md = render_markdown(table)
    assert "### sft_dr" in md and "| log P(gold) arc (nats/item) |" in md
    assert "forgetting in drift from pi0: sft_dr < sft_d holds" in md
    assert "Forgetting in continuous metrics" in md and "| sft_dr | drift from pi0 |" in md
    assert "| sft_dr | P(gold \\| choices) | +" in md  # a table cell keeps its "|"
    # probabilities in percent
    assert re.search(r"\| P\(gold \\\| choices\) arc \(soft accuracy\) \| \d+\.\d\d% \|", md)
    # the accuracy-based forgetting stays beside it
    assert "| sft_dr | +18.0% | +5.0% | +4.0% |" in md
    # D_R against D, metric by metric: the downstream fit (held-out NLL) is the same
    vs_d = md.split("## SFT on D_R against SFT on D")[1].split("## Forgetting")[0]
    assert "| metric | sft_d | sft_dr | delta (model - sft_d) [95% CI] |" in vs_d
    held = next(line for line in vs_d.splitlines() if line.startswith("| held-out NLL gsm8k"))
    low, high = (float(x) for x in re.findall(r"\[([-+.\d]+), ([-+.\d]+)\]", held)[0])
    assert low < 0 < high


def test_no_continuous_reduction_when_sft_on_d_does_not_forget() -> None:
    table = forgetting_table(
        _scores(), ["math"], ["arc"], bootstrap_reps=200, values=_values(0.0, 0.2)
    )
    r = table["continuous"]["models"]["sft_dr"]
    assert r["reduction"] == {"gold_logprob": None, "gold_choice_prob": None, "drift_nll": None}
    assert any("reduction in log P(gold) not computed" in c for c in table["continuous"]["caveats"])
    # D_R loses 0.2 nats where D loses none: the sentence says the reverse holds, not "not shown"
    from patchgap.reports.evaluation import continuous_verdict_sentences

    lines = continuous_verdict_sentences(table)
    logp = next(line for line in lines if line.startswith("forgetting in log P(gold)"))
    assert "sft_dr < sft_d does not hold, the reverse does, at this size: D - R = -0." in logp
    assert "p = <0.001" in logp
    assert not any("is not shown" in line for line in lines if "log P(gold)" in line)
    # tuned models scored on fewer items are paired on the shared ones
    values = _values(0.5, 0.25)
    values["sft_d"]["drift_nll"] = dict(list(values["sft_d"]["drift_nll"].items())[:50])
    t = forgetting_table(_scores(), ["math"], ["arc"], bootstrap_reps=100, values=values)
    assert t["continuous"]["models"]["sft_d"]["vs_base"]["drift_nll"]["n"] == 50
    assert "continuous" not in forgetting_table(_scores(), ["math"], ["arc"], bootstrap_reps=50)


def test_reproduction_report_shows_the_continuous_metrics_beside_accuracy() -> None:
    from patchgap.reports.results import RunResults, render

    table = forgetting_table(
        _scores(), ["math"], ["arc", "mmlu"], bootstrap_reps=200, values=_values(0.5, 0.25)
    )
    md = render(
        RunResults("run-1", {"status": "succeeded"}, evaluation={"forgetting_table": table})
    )
    assert md.index("### Accuracy") < md.index("### Continuous metrics against the base")
    assert "#### sft_d\n" in md and "#### sft_dr\n" in md
    assert "| held-out NLL gsm8k (nats/token) |" in md and "| drift: NLL of pi0's answers" in md
    assert "#### Forgetting in continuous metrics" in md
    assert "| model | downstream gain | F arc | F mmlu |" in md  # accuracy-based F kept
    old = {k: v for k, v in table.items() if k != "continuous"}  # a results.json from before
    assert "Continuous" not in render(RunResults("r", {}, evaluation={"forgetting_table": old}))


def test_reduction_is_absent_where_sft_on_d_gained_or_is_unresolved() -> None:
    # F_D negative: SFT on D gained 1.7 points; 1 - F_R/F_D would read above 100%
    assert reduction(-0.017, -0.017) is None
    assert reduction(0.0, -0.017) is None
    # positive but not separated from zero by its paired test
    assert reduction(0.02, 0.04, resolved=False) is None
    scores = _scores()
    scores["sft_d"]["arc"] = _items(62)  # SFT on D gained 2 points on arc
    scores["sft_d"]["mmlu"] = _items(48)  # forgot 2 points: 2 discordant items, unresolved
    t = forgetting_table(scores, ["math"], ["arc", "mmlu"], bootstrap_reps=200)
    r = t["models"]["sft_dr"]
    assert r["reduction"] == {"arc": None, "mmlu": None}
    assert r["reduction_mean_of_ratios"] is None
    assert "gained" in r["reduction_absent"]["arc"]
    assert "not resolved" in r["reduction_absent"]["mmlu"]
    assert any("arc" in c and "gained" in c for c in t["caveats"])
    assert any("average forgetting not computed" in c for c in t["caveats"])
