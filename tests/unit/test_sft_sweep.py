"""The SFT calibration sweep's selection rule and paired figures (patchgap.reports.sft_sweep,
which benchmarks/sft_sweep.py runs), on synthetic per-item values: the rule is what picks every
SFT row's setting, so it is tested."""

from __future__ import annotations

import random
from typing import Any

import pytest

from patchgap.errors import ConfigError
from patchgap.reports import sft_sweep as sweep


def _test(diff: float, low: float, high: float, p: float) -> dict[str, float]:
    return {"diff": diff, "low": low, "high": high, "p_bootstrap": p}


def _row(lr: float, epochs: float, held: float, gold: float, gold_p: float, drift_p: float):
    return {
        "lr": lr,
        "epochs": epochs,
        "diff": {
            "heldout_nll_gsm8k": _test(held, held - 0.05, held + 0.05, 0.001),
            "gold_choice_prob": _test(gold, gold - 1, gold + 1, gold_p),
            "acc_norm": _test(0.0, -2, 2, 1.0),
            "drift_nll": _test(0.02, 0.01, 0.03, drift_p),
        },
    }


def test_grid_parses_and_names_its_points() -> None:
    assert sweep.parse_grid("2e-5:1,1e-4:2.5") == [(2e-5, 1.0), (1e-4, 2.5)]
    assert sweep.tag(1e-4, 2.0) == "lr0.0001-ep2"
    with pytest.raises(ConfigError, match="not lr:epochs"):
        sweep.parse_grid("2e-5")


def test_rule_takes_the_qualifying_setting_that_forgets_most() -> None:
    rows = [
        _row(2e-5, 1, held=-0.3, gold=-0.5, gold_p=0.2, drift_p=0.01),  # forgets, not significantly
        _row(1e-4, 1, held=-0.4, gold=-1.5, gold_p=0.01, drift_p=0.01),
        _row(1e-4, 2, held=-0.5, gold=-3.0, gold_p=0.001, drift_p=0.001),
        _row(3e-4, 2, held=+0.2, gold=-6.0, gold_p=0.001, drift_p=0.001),  # no downstream gain
    ]
    chosen = sweep.choose(rows)
    assert (chosen["lr"], chosen["epochs"]) == (1e-4, 2)


def test_rule_falls_back_to_drift_and_can_choose_nothing() -> None:
    rows = [
        _row(2e-5, 1, held=-0.3, gold=-0.2, gold_p=0.4, drift_p=0.2),
        _row(1e-4, 1, held=-0.4, gold=+0.1, gold_p=0.6, drift_p=0.01),
    ]
    chosen = sweep.choose(rows)
    assert (chosen["lr"], chosen["epochs"]) == (1e-4, 1)
    assert sweep.choose([_row(2e-5, 1, held=+0.1, gold=-2, gold_p=0.001, drift_p=0.001)]) is None


def test_paired_figures_pool_the_benchmarks_in_points() -> None:
    rng = random.Random(0)

    def model(shift: float, nll_shift: float) -> dict[str, Any]:
        general = {
            b: {
                f"{b}-{i}": {"gold_choice_prob": 0.5 + shift + rng.gauss(0, 0.01), "acc_norm": 1.0}
                for i in range(40)
            }
            for b in ("arc", "mmlu")
        }
        nll = {
            m: [{"id": str(i), "nll": 1.0 + nll_shift + rng.gauss(0, 0.01)} for i in range(30)]
            for m in ("drift_nll", "heldout_nll_gsm8k")
        }
        return {"general": general, "nll": nll}

    out = sweep.paired(model(-0.03, 0.1), model(0.0, 0.0), seed=0)
    gold = out["gold_choice_prob"]
    assert gold["n"] == 80 and gold["diff"] == pytest.approx(-3.0, abs=0.3)  # points
    assert gold["high"] < 0 and gold["p_bootstrap"] < 0.01
    assert out["acc_norm"]["diff"] == 0.0
    assert out["drift_nll"]["diff"] == pytest.approx(0.1, abs=0.01)
    assert out["heldout_nll_gsm8k"]["n"] == 30
