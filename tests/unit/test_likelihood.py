"""NLL of fixed completions in SFT's chat format: the tokens scored, the numbers, the batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchgap.lm.likelihood import (
    CompletionScorer,
    Scored,
    chat_completion_ids,
    common_prefix_length,
    token_budget_batches,
)


@pytest.fixture(scope="module")
def scorer(tiny_llama: Path) -> CompletionScorer:
    return CompletionScorer.load(tiny_llama, device="cpu", dtype="float32", max_batch_tokens=64)


def test_completion_is_the_assistant_turn_as_sft_trains_on_it(scorer: CompletionScorer) -> None:
    from patchgap.lm.models import apply_chat

    tok = scorer.tokenizer
    prompt, comp = chat_completion_ids(tok, "What is 2 + 2?", "2 + 2 = 4. #### 4")
    # the whole conversation, split where the prompt with its generation prompt ends
    full = apply_chat(
        tok,
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4. #### 4"},
        ],
        add_generation_prompt=False,
    )
    assert prompt + comp == tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(comp) == "2 + 2 = 4. #### 4<|im_end|>\n"  # end of turn is trained on
    _, cut = chat_completion_ids(tok, "What is 2 + 2?", "2 + 2 = 4. #### 4", close_turn=False)
    assert tok.decode(cut) == "2 + 2 = 4. #### 4"  # a cut-off generation has no end of turn
    _, short = chat_completion_ids(tok, "What is 2 + 2?", "2 + 2 = 4. #### 4", max_tokens=3)
    assert short == comp[:3]


def test_scores_match_a_full_forward_in_any_batching(scorer: CompletionScorer) -> None:
    import torch

    tok = scorer.tokenizer
    texts = [
        ("Natalia sold 48 clips.", "She sold 24 in May. #### 72"),
        ("Hi", "x"),
        ("A much longer question " * 6, "The answer is \\boxed{5}."),
        ("Empty answer", ""),
    ]
    pairs = [chat_completion_ids(tok, q, a, close_turn=bool(a)) for q, a in texts]
    got = scorer.score(pairs)
    assert got[3] == Scored(0.0, 0)  # nothing to score: no tokens, NaN mean
    for (prompt, comp), s in zip(pairs[:3], got[:3], strict=True):
        ids = torch.tensor([prompt + comp])
        with torch.inference_mode():
            logp = torch.log_softmax(scorer.model(ids).logits[0].float(), -1)
        ref = -sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))
        assert s.tokens == len(comp) and s.nll == pytest.approx(ref, rel=1e-4)
        assert s.mean == pytest.approx(ref / len(comp), rel=1e-4)
    wide = CompletionScorer(scorer.model, tok, max_batch_tokens=100_000).score(pairs)
    assert [w.nll for w in wide[:3]] == pytest.approx([g.nll for g in got[:3]], rel=1e-4)
    done: list[int] = []
    scorer.score(pairs, progress=done.append)
    assert sum(done) == len(pairs)


def test_batches_cover_every_sequence_within_the_budget() -> None:
    lengths = [5, 50, 7, 300, 6, 49]
    batches = token_budget_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 100
    assert [3] in batches  # longer than the budget: alone
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
