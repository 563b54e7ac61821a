"""The evaluate stage's continuous metrics: gold-choice log-probabilities read from lm-eval's
sample logs, pi0's drift answers and the NLLs every model gives them and held-out solutions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from patchgap.stages import evaluate as ev


def test_gold_logprob_and_its_per_character_form_from_a_sample_log() -> None:
    ours = {
        "doc": {"id": "a", "options": ["no", "yes it is"]},
        "target": 1,
        "filtered_resps": [[-3.0, False], [-4.5, False]],
    }
    got = ev.gold_logprobs(ours)
    assert (got["gold_logprob"], got["gold_logprob_norm"]) == (-4.5, -0.5)
    # among the two choices: e^-4.5 / (e^-3 + e^-4.5)
    assert got["gold_choice_logprob"] == pytest.approx(-1.5 - math.log1p(math.exp(-1.5)))
    # another task: choice lengths from lm-eval's continuations, less the target delimiter
    other = {
        "doc": {"q": "x"},
        "target": "0",
        "arguments": [["ctx", " abc"], ["ctx", " de"]],
        "filtered_resps": [[-6.0, True], [-1.0, False]],
    }
    got = ev.gold_logprobs(other)
    assert (got["gold_logprob"], got["gold_logprob_norm"]) == (-6.0, -2.0)
    assert ev.gold_logprobs({"target": [0, 1], "filtered_resps": [[-1.0, True]]}) == {}
    assert ev.gold_logprobs({"target": 3, "filtered_resps": [[-1.0, True]]}) == {}


def test_continuous_values_are_keyed_as_the_report_reads_them() -> None:
    general = {
        "arc_easy": [
            ev.ItemResult(
                "q1", True, gold_logprob=-2.0, gold_logprob_norm=-0.2, gold_choice_logprob=-0.1
            ),
            ev.ItemResult("q2", False),  # an item lm-eval gave no gold log-likelihood for
        ]
    }
    cont = {
        "drift_nll": [{"id": "arc_easy:7", "nll": 1.5, "tokens": 9}],
        "heldout_nll_gsm8k": [{"id": "t-1", "nll": 0.9}, {"id": "t-2", "nll": None}],
    }
    vals = ev.continuous_values(general, cont)
    assert vals == {
        "gold_logprob:arc_easy": {"q1": -2.0},
        "gold_choice_prob:arc_easy": {"q1": pytest.approx(math.exp(-0.1))},
        "gold_logprob_norm:arc_easy": {"q1": -0.2},
        "drift_nll": {"arc_easy:7": 1.5},
        "heldout_nll:gsm8k": {"t-1": 0.9},
    }
    assert "gold_logprob:arc_easy" not in ev.continuous_values(general, cont, gold_logprob=False)
    # the per-character form goes with acc_norm as the headline
    assert "gold_logprob_norm:arc_easy" not in ev.continuous_values(general, cont, normalised=False)


def test_settings_name_known_sets_and_change_the_resume_fingerprint() -> None:
    with pytest.raises(ValueError, match="heldout.sets"):
        ev.Config(heldout={"sets": ["gsm9k"]})
    with pytest.raises(ValueError, match="drift.benchmarks"):
        ev.Config(drift={"benchmarks": ["arc_hard"]})
    cfg = ev.Config()
    assert cfg.drift.enabled and cfg.heldout.enabled and cfg.gold_logprob
    assert "drift" not in ev.NOT_IN_FINGERPRINT and "gold_logprob" in ev.NOT_IN_FINGERPRINT


def test_pi0_answers_are_scored_by_every_model_with_held_out_solutions(
    tiny_llama: Path,
) -> None:
    from patchgap.data.fields import Record

    cfg = ev.Config(
        generation={"max_new_tokens": 4, "device": "cpu"},
        drift={"max_new_tokens": 6},
        heldout={"max_tokens": 5},
    )
    questions = [("arc_easy", "q1", "Why is the sky blue?"), ("piqa", "p2", "How to boil an egg?")]
    answers = ev.pi0_answers(cfg, tiny_llama, questions)
    assert [a["id"] for a in answers] == ["arc_easy:q1", "piqa:p2"]
    assert all(
        0 < a["num_tokens"] <= 6 and a["finish_reason"] in ("stop", "length") for a in answers
    )
    assert answers == ev.pi0_answers(cfg, tiny_llama, questions)  # greedy: the same texts

    held = {"gsm8k": [Record("t-1", "1 + 1?", "1 + 1 = 2 and more words here\n#### 2", "2")]}
    saved: list[str] = []
    out = ev.continuous_eval(cfg, tiny_llama, answers, held, on_metric=lambda m, r: saved.append(m))
    assert saved == ["drift_nll", "heldout_nll_gsm8k"]
    assert [r["id"] for r in out["drift_nll"]] == ["arc_easy:q1", "piqa:p2"]
    (row,) = out["heldout_nll_gsm8k"]
    assert row["tokens"] == 5  # cut at heldout.max_tokens
    assert row["nll"] == pytest.approx(row["nll_sum"] / 5) and row["nll"] > 0
    assert ev.continuous_eval(cfg, tiny_llama, [], {}) == {}


def test_held_out_solutions_are_scored_in_a_neutral_form_unless_asked_otherwise(
    tiny_llama: Path,
) -> None:
    from patchgap.data.fields import Record
    from patchgap.reward.reasoning import neutral_solution

    solution = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 24"
    assert neutral_solution(solution) == "She sold 48/2 = 24 clips."
    held = {"gsm8k": [Record("t-1", "How many?", solution, "24")]}
    tokens = {}
    for form in ("neutral", "as_written"):
        cfg = ev.Config(generation={"device": "cpu"}, heldout={"form": form, "max_tokens": 512})
        (row,) = ev.continuous_eval(cfg, tiny_llama, [], held)["heldout_nll_gsm8k"]
        tokens[form] = row["tokens"]
    assert tokens["neutral"] < tokens["as_written"]  # the marks and the answer line are gone
    assert ev.Config().heldout.form == "neutral"
