"""Judge, NLL and the group scorer on real models: tiny random Llama/Qwen2 and SmolLM2-135M."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from patchgap.errors import ConfigError
from patchgap.reward.scoring import (
    Embedder,
    GroupRewardScorer,
    Judge,
    NLLScorer,
    RewardConfig,
)

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. "
    "How many clips did she sell altogether?",
    "What is 7 + 5?",
]
GROUPS = [
    [
        "Natalia sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips. #### 72",
        "The answer is \\boxed{72}.",
        "In May she sold half of 48, which is 24. Adding April's 48 gives 72, so \\boxed{72}.",
        "",
    ],
    ["7 + 5 = 12, so the answer is \\boxed{12}.", "Twelve. \\boxed{12}", "\\boxed{13}"],
]


def _lm(folder: Path) -> tuple:
    from patchgap.lm.models import shared_model

    loaded = shared_model(folder, "float32", "cpu")
    return loaded[0], loaded[1]


def _reference_nll(model, scorer: NLLScorer, question: str, answer: str) -> float:
    """One full forward of prefix + answer with full-vocabulary logits (the loop way)."""
    prefix = scorer.prefix_ids(question)
    ids = prefix + scorer.answer_ids(answer)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[len(prefix) - 1 : -1], dim=-1)
    targets = torch.tensor(ids[len(prefix) :])
    return float(-logp[torch.arange(len(targets)), targets].mean())


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_nll_batched_equals_per_candidate_loop(
    arch: str, share_prefix: bool, request: pytest.FixtureRequest
) -> None:
    model, tok = _lm(request.getfixturevalue(arch))
    scorer = NLLScorer(model, tok, "chat", share_prefix=share_prefix, max_padding_fraction=0.9)
    batched = scorer.score_groups(QUESTIONS, GROUPS)
    for q, group, values in zip(QUESTIONS, GROUPS, batched, strict=True):
        for answer, value in zip(group, values, strict=True):
            if not answer:
                assert math.isnan(value)  # nothing to score
                continue
            assert value == pytest.approx(_reference_nll(model, scorer, q, answer), abs=1e-4)


def test_only_answer_tokens_count(tiny_llama: Path) -> None:
    model, tok = _lm(tiny_llama)
    answer = GROUPS[1][0]
    long_question = QUESTIONS[1] + " Please show every step of your work carefully." * 8
    for share in (True, False):
        scorer = NLLScorer(model, tok, "chat", share_prefix=share, max_padding_fraction=0.9)
        alone = scorer.score(QUESTIONS[1], [answer])[0]
        # Same question and answer batched beside a much longer question (so, without prefix
        # sharing, beside heavy padding) and longer answers: the value must not move.
        mixed = scorer.score_groups(
            [long_question, QUESTIONS[1]], [GROUPS[0][:3], [answer, answer * 3]]
        )
        assert mixed[1][0] == pytest.approx(alone, abs=1e-4)
        before = scorer.tokens_scored
        scorer.score(QUESTIONS[0], [answer])
        assert scorer.tokens_scored - before == len(scorer.answer_ids(answer))


def test_chat_and_plain_contexts_differ_and_are_reported(tiny_qwen2: Path) -> None:
    model, tok = _lm(tiny_qwen2)
    chat = NLLScorer(model, tok, "chat")
    plain = NLLScorer(model, tok, "plain")
    assert tok.decode(chat.prefix_ids(QUESTIONS[1])).startswith("<|im_start|>user")
    assert (
        tok.decode(plain.prefix_ids(QUESTIONS[1]))
        .removeprefix("<|endoftext|>")
        .startswith("Problem:")
    )
    a = chat.score(QUESTIONS[1], [GROUPS[1][0]])[0]
    b = plain.score(QUESTIONS[1], [GROUPS[1][0]])[0]
    assert a != pytest.approx(b, abs=1e-3)
    scorer = GroupRewardScorer(RewardConfig(judge=False, nll_context="plain"), tiny_qwen2)
    assert scorer.nll.context == "plain"
    assert scorer.metrics()["reward/nll_context"] == "plain"


@pytest.mark.parametrize("chat_template", [True, False])
def test_judge_batched_equals_unbatched(tiny_llama: Path, chat_template: bool) -> None:
    model, tok = _lm(tiny_llama)
    judge = Judge(model, tok, "tiny", chat_template=chat_template, max_padding_fraction=0.9)
    refs = ["72", "12"]
    batched = judge.verdicts(QUESTIONS, refs, GROUPS)
    flat = Judge(model, tok, "tiny", chat_template=chat_template, share_prefix=False)
    for q, ref, group, verdicts in zip(QUESTIONS, refs, GROUPS, batched, strict=True):
        for cand, v in zip(group, verdicts, strict=True):
            alone = judge.verdicts([q], [ref], [[cand]])[0][0]
            assert v.p_yes == pytest.approx(alone.p_yes, abs=1e-5)
            assert v.raw_yes == pytest.approx(alone.raw_yes, rel=1e-4)
            assert v.accepted == alone.accepted
            assert flat.verdicts([q], [ref], [[cand]])[0][0].p_yes == pytest.approx(
                v.p_yes, abs=1e-5
            )
            assert 0.0 < v.p_yes < 1.0


def test_judge_sums_yes_and_no_variants(tiny_llama: Path) -> None:
    model, tok = _lm(tiny_llama)
    judge = Judge(model, tok, "tiny")
    spelled = {tok.decode([i]) for i in judge.yes_ids}
    assert {"YES", " YES"} <= spelled
    assert {"NO", " NO"} <= {tok.decode([i]) for i in judge.no_ids}


def test_unresolvable_yes_no_tokens_are_a_config_error(tiny_llama: Path) -> None:
    model, tok = _lm(tiny_llama)
    with pytest.raises(ConfigError, match="judge model 'tiny'.*single-token"):
        Judge(model, tok, "tiny", yes_words=("Affirmative-zq",), no_words=("NO",))
    with pytest.raises(ConfigError, match="same token"):
        Judge(model, tok, "tiny", yes_words=("NO",), no_words=("NO",))


def test_group_scorer_on_a_tiny_model(tiny_llama: Path) -> None:
    config = RewardConfig(k=4, judge=True)
    scorer = GroupRewardScorer(config, tiny_llama)
    terms = scorer.score_groups(QUESTIONS, ["72", "12"], GROUPS)
    assert [len(t) for t in terms] == [4, 3]
    assert terms[1][2].total == 0.0 and terms[1][2].judge_p_yes is None  # wrong: never judged
    for t in (t for g in terms for t in g):
        assert (t.total > 0) == (t.answer_ok and t.judge_ok)
        if t.r_task:
            assert t.total == pytest.approx(1 + 0.35 * t.r_dist + 0.5 * t.r_div)
    m = scorer.metrics()
    assert m["reward/count_candidates"] == 7 and m["reward/count_judged"] == 5
    assert m["reward/nll_context"] == "chat"


def test_gate_and_rl_reward_score_alike_from_one_reward_section(tiny_llama: Path) -> None:
    """The gate and the RL reward read the same `reward:` section; the gate's flat batches and
    the reward's shared prefixes give every candidate the same NLL and judge verdict."""
    from patchgap.stages import gate, train_rewriter

    section = {"judge": True, "max_padding_fraction": 0.9}
    gate_cfg = gate.Config(model=str(tiny_llama), reward=section)
    rl_cfg = train_rewriter.Config(
        model=str(tiny_llama), num_generations=4, per_device_batch_size=4, reward=section
    )
    assert (gate_cfg.reward.share_prefix, rl_cfg.reward.share_prefix) == (False, True)
    answers = ["72", "12"]
    by_gate = gate._scorer(gate_cfg).load().score_groups(QUESTIONS, answers, GROUPS)
    rl_scorer = train_rewriter._build_scorer(rl_cfg, str(tiny_llama), "cpu")
    by_rl = rl_scorer.score_groups(QUESTIONS, answers, GROUPS)
    pairs = list(zip(sum(by_gate, []), sum(by_rl, []), strict=True))
    assert len(pairs) == 7 and any(a.judge_p_yes is not None and a.nll for a, _ in pairs)
    for a, b in pairs:
        assert (a.answer_ok, a.judge_ok, a.r_task) == (b.answer_ok, b.judge_ok, b.r_task)
        for x, y in ((a.nll, b.nll), (a.judge_p_yes, b.judge_p_yes)):
            assert x == y if y is None else x == pytest.approx(y, rel=1e-4, abs=1e-5)


def test_bundled_embedder_offline() -> None:
    emb = Embedder().encode(["The answer is 72.", "The answer is 72.", "Cats sleep a lot."])
    assert emb.shape[0] == 3
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(emb[0] @ emb[2]) < 0.5


def test_trl_orders_the_k_completions_of_a_prompt_consecutively() -> None:
    # The adapter relies on this: TRL's RepeatSampler repeats each prompt K times in a row.
    from trl.trainer.utils import RepeatSampler

    order = list(
        RepeatSampler(list(range(6)), mini_repeat_count=3, batch_size=2, repeat_count=2, seed=0)
    )
    runs = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert all(len(set(r)) == 1 for r in runs)


# --- SmolLM2: real text -----------------------------------------------------------------------


def test_smollm2_prefers_fluent_text(smollm2: Path) -> None:
    model, tok = _lm(smollm2)
    scorer = NLLScorer(model, tok, "chat")
    fluent = "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 clips in total. The answer is 72."
    scrambled = "clips 72 total May. She answer in 24 the so sold = / 48 is 2 + 48 72 clips, in ="
    a, b = scorer.score(QUESTIONS[0], [fluent, scrambled])
    assert a < b - 1.0


# 20 greedy generations of up to 200 tokens: minutes on a loaded 2-core CPU, so opt-in.
@pytest.mark.slow
def test_pi0_greedy_answers_beat_gsm8k_references_in_nll(smollm2: Path, data_dir: Path) -> None:
    """The gap the method exists to close: pi0's own answers are likelier than GSM8K's style."""
    from patchgap.lm.models import generate_text

    model, tok = _lm(smollm2)
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:20]
    records = [json.loads(line) for line in lines]
    questions = [r["question"] for r in records]
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: on a shared, loaded CPU, spinning OpenMP threads made this 5x slower.
    torch.set_num_threads(1)
    try:
        greedy = generate_text(model, tok, questions, max_new_tokens=200, chat=True)
    finally:
        torch.set_num_threads(threads)
    scorer = NLLScorer(model, tok, "chat")
    nll = scorer.score_groups(
        questions, [[g, r["answer"]] for g, r in zip(greedy, records, strict=True)]
    )
    wins = sum(own < ref for own, ref in nll)
    mean_own = sum(x[0] for x in nll) / len(nll)
    mean_ref = sum(x[1] for x in nll) / len(nll)
    print(
        f"\nGSM8K train[:20] under SmolLM2 (chat context): greedy NLL < reference NLL for "
        f"{wins}/20 ({wins / 20:.0%}); mean NLL greedy {mean_own:.3f} vs reference {mean_ref:.3f}; "
        f"{time.perf_counter() - started:.0f}s"
    )
    assert wins >= 18
