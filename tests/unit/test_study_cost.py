"""The study's GPU-hour arithmetic (patchgap.study.cost, which benchmarks/study_cost.py runs):
FLOPs per token from a model's shape, per kind of work, and hours at a stated rate, on cases
whose answer is known."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from patchgap.errors import ConfigError
from patchgap.study import cost


def test_matmul_weights_match_a_real_model():
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    shape = cost.Shape.from_config(config.to_dict())
    assert shape.matmul_params == linear  # the tied head is a matmul all the same


def test_qwen25_7b_has_7_07e9_matmul_weights():
    # 28 x (2 x 3584^2 + 2 x 3584 x 512 + 3 x 3584 x 18944) + 152064 x 3584
    assert cost.QWEN25_7B.matmul_params == 7_070_285_824


def test_shape_from_config_names_a_missing_key():
    with pytest.raises(ConfigError, match="hidden_size"):
        cost.Shape.from_config(
            {
                "num_attention_heads": 2,
                "num_hidden_layers": 2,
                "intermediate_size": 8,
                "vocab_size": 9,
            }
        )


SMALL = cost.Shape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=2, vocab=10)


def test_flops_per_kind():
    p = SMALL.matmul_params
    attn = 4 * SMALL.layers * SMALL.hidden
    score = cost.Work("s", "x", "score", sequences=3, prompt=10)
    assert score.flops(SMALL) == pytest.approx(30 * (2 * p + attn * 5))
    full = cost.Work("s", "x", "train_full", sequences=3, prompt=10)
    assert full.flops(SMALL) == pytest.approx(3 * score.flops(SMALL))
    ckpt = cost.Work("s", "x", "train_full", sequences=3, prompt=10, checkpointing=True)
    assert ckpt.flops(SMALL) == pytest.approx(4 * score.flops(SMALL))
    lora = cost.Work("s", "x", "train_lora", sequences=3, prompt=10)
    assert lora.flops(SMALL) == pytest.approx(2 * score.flops(SMALL))
    # generation: the prompt's prefill over half of it, each new token over prompt + half the new
    gen = cost.Work("s", "x", "generate", sequences=2, prompt=10, new=4)
    expected = 20 * (2 * p + attn * 5) + 8 * (2 * p + attn * 12)
    assert gen.flops(SMALL) == pytest.approx(expected)
    assert gen.tokens == 28


def test_hours_at_a_rate():
    rate = cost.Rate("r", peak_flops=1e12, mfu={"score": (0.5, 1.0), "train": (0.25, 0.5)})
    work = cost.Work("s", "x", "score", sequences=1000, prompt=1)
    flops = work.flops(SMALL)
    fewest, most = rate.hours(work, SMALL)
    assert fewest == pytest.approx(flops / 1e12 / 3600)  # at full utilisation
    assert most == pytest.approx(2 * fewest)  # at half
    with pytest.raises(ConfigError, match="generate"):
        rate.hours(cost.Work("s", "x", "generate", sequences=1, prompt=1, new=1), SMALL)
    bad = cost.Rate("b", peak_flops=1e12, mfu={"score": (0.6, 0.5)})
    with pytest.raises(ConfigError, match="low <= high"):
        bad.hours(work, SMALL)


def _plan(**overrides):
    base = dict(
        records=100, rl_steps=2, prompts_per_step=4, generations=5, max_completion=50,
        rewrite_max_new=40, candidates=1, max_retries=2, kl=True, judge=True,
        arms=("d", "dr", "ref_rl", "rw_rl", "swap_rl"), seeds=3, snapshots=2,
        epochs_full=3, epochs_concentrated=2, drift_questions=10, drift_max_new=20,
        math_max_new=30,
    )  # fmt: skip
    base.update(overrides)
    return cost.Plan(**base)


TOKENS = cost.Tokens(
    question=10, reference=20, rewrite_prompt=5, judge_prompt=7, rewrite_ratio=3.0,
    rollout_ratio=1.5, answer_failure=0.5, acceptance={"rl": 0.25, "prompt": 0.2},
    heldout={"gsm8k": (6, 30.0)}, general={"piqa": (8, 12.0)}, math={"math500": (4, 9.0, 100.0)},
    drift_question=11, drift_answer=25,
)  # fmt: skip


def test_study_works_sizes():
    works = cost.study_works(_plan(), TOKENS)
    by_what = {(w.stage, w.what): w for w in works}
    rollouts = by_what[("train-rewriter", "rollouts")]
    assert rollouts.sequences == 2 * 4 * 5
    assert rollouts.prompt == 10 + 20 + 5 and rollouts.new == 30  # 1.5 x 20, under the cap
    rewrite = by_what[("rewrite", "rl rewriter")]
    assert rewrite.sequences == pytest.approx(100 * (1 + 0.5 + 0.25))  # two retry rounds
    assert rewrite.new == 40  # 3 x 20 = 60, capped at 40
    sft = {w.what.split()[0]: w for w in works if w.stage == "sft"}
    assert sft["d"].sequences == 3 * 100 * 3 and sft["d"].prompt == 30
    assert sft["dr"].prompt == pytest.approx(10 + 0.25 * 40 + 0.75 * 20)
    assert sft["ref_rl"].sequences == pytest.approx(3 * 25 * 2)
    assert sft["rw_rl"].prompt == 50 and sft["swap_rl"].prompt == 30
    models = 1 + 5 * 3 * 2
    drift = next(w for w in works if w.what.startswith("drift NLL"))
    assert drift.sequences == models * 10 and drift.prompt == 11 + 20  # answer capped at 20
    math = next(w for w in works if w.what.startswith("math500"))
    assert math.sequences == models * 4 and math.new == 30
    assert str(models) in drift.what


def test_judge_and_kl_add_work_only_when_on():
    on = cost.study_works(_plan(), TOKENS)
    off = cost.study_works(_plan(kl=False, judge=False), TOKENS)
    assert len(on) - len(off) == 1 + 1 + 2  # KL, the reward's judge, both gates' judge
    assert not any("judge" in w.what or "KL" in w.what for w in off)


def test_total_hours_sum_the_stages():
    hours = cost.total_hours(cost.study_works(_plan(), TOKENS), cost.QWEN25_7B, cost.H100)
    stages = [v for k, v in hours.items() if k != "total"]
    assert set(hours) == {"train-rewriter", "rewrite", "gate", "sft", "evaluate", "total"}
    assert hours["total"][0] == pytest.approx(sum(low for low, _ in stages))
    assert hours["total"][1] == pytest.approx(sum(high for _, high in stages))
    assert all(low < high for low, high in hours.values())


def test_unknown_arm_is_refused():
    with pytest.raises(ConfigError, match="'bogus'"):
        cost.study_works(_plan(arms=("bogus",)), TOKENS)
