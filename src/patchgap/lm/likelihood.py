"""Token NLL of given completions under a causal LM, in the chat format SFT trains on.

The evaluation's continuous metrics read a model's log-probabilities of fixed texts: pi0's own
answers to general questions (drift from pi0) and held-out reference solutions (downstream). Each
text is the assistant turn after a user turn, tokenised as TRL's SFTTrainer tokenises a
conversational prompt-completion row: the completion is what follows the prompt rendered with the
generation prompt inside the whole rendered conversation, end-of-turn tokens included. The NLL of
a reference solution under SFT on D is therefore the SFT loss on that record.

torch and transformers are imported inside functions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchgap.lm.models import apply_chat, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """The summed NLL (nats) of ``tokens`` completion tokens; ``mean`` is per token."""

    nll: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def chat_completion_ids(
    tok: Any,
    user: str,
    completion: str,
    *,
    close_turn: bool = True,
    max_tokens: int | None = None,
) -> tuple[list[int], list[int]]:
    """The (prompt, completion) token ids of a one-turn conversation, as SFT sees it.

    ``close_turn=False`` scores the completion's own tokens without the template's end of turn
    (a generation cut at its token limit never produced one). ``max_tokens`` keeps the first
    that many completion tokens.
    """
    prompt_msgs = [{"role": "user", "content": user}]
    prompt = _ids(tok, apply_chat(tok, prompt_msgs, add_generation_prompt=True))
    if close_turn:
        full_text = apply_chat(
            tok,
            [*prompt_msgs, {"role": "assistant", "content": completion}],
            add_generation_prompt=False,
        )
        full = _ids(tok, full_text)
        # Where the two diverge, as TRL decides it (a template may render the prompt differently
        # alone, or tokens may merge across the boundary).
        cut = common_prefix_length(prompt, full)
        prompt, answer = full[:cut], full[cut:]
    else:
        answer = _ids(tok, completion)
    if max_tokens is not None:
        answer = answer[:max_tokens]
    return prompt, answer


def _ids(tok: Any, text: str) -> list[int]:
    # A rendered chat template already holds any bos the model wants.
    return list(tok(text, add_special_tokens=False)["input_ids"])


def token_budget_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size (rows x longest) stays
    within ``max_batch_tokens`` (a longer sequence alone still gets its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max(lengths[i], *(lengths[j] for j in current)) if current else lengths[i]
        if current and width * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class CompletionScorer:
    """Summed token NLL of completions after prompts under one causal LM (eval mode, no grad).

    Sequences are length-sorted into padded batches of at most ``max_batch_tokens``; the
    vocabulary projection runs only at completion positions, so a long prompt costs one pass of
    the decoder and nothing more.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch_tokens: int = 4096) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.tokens_scored = 0

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_batch_tokens: int = 4096,
    ) -> CompletionScorer:
        model = load_causal_lm(
            path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        tok = load_tokenizer(path, padding_side="right", trust_remote_code=trust_remote_code)
        return cls(model, tok, max_batch_tokens)

    def score(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        progress: Callable[[int], None] | None = None,
    ) -> list[Scored]:
        """The NLL of each completion given its prompt, in input order (0 tokens: NaN mean)."""
        import torch
        import torch.nn.functional as F

        out: list[Scored | None] = [None] * len(pairs)
        lengths = [len(p) + len(c) for p, c in pairs]
        device = self.lm_head.weight.device
        pad = self.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for batch in token_budget_batches(lengths, self.max_batch_tokens):
                width = max(lengths[i] for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long, device=device)
                mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
                rows, positions, targets = [], [], []
                for r, i in enumerate(batch):
                    prompt, comp = pairs[i]
                    seq = [*prompt, *comp]
                    ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
                    mask[r, : len(seq)] = 1
                    # the state at position t predicts token t + 1
                    start = max(len(prompt), 1)
                    for t in range(start, len(seq)):
                        rows.append(r)
                        positions.append(t - 1)
                        targets.append(seq[t])
                hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                sums = [0.0] * len(batch)
                counts = [0] * len(batch)
                if targets:
                    h = hidden[
                        torch.tensor(rows, device=device), torch.tensor(positions, device=device)
                    ]
                    tgt = torch.tensor(targets, dtype=torch.long, device=device)
                    nll = torch.cat(
                        [
                            F.cross_entropy(
                                self._logits(h[s : s + 1024]), tgt[s : s + 1024], reduction="none"
                            )
                            for s in range(0, len(targets), 1024)
                        ]
                    ).tolist()
                    for r, v in zip(rows, nll, strict=True):
                        sums[r] += v
                        counts[r] += 1
                for r, i in enumerate(batch):
                    out[i] = Scored(sums[r], counts[r])
                self.tokens_scored += len(targets)
                if progress is not None:
                    progress(len(batch))
        return [s if s is not None else Scored(0.0, 0) for s in out]

    def _logits(self, hidden: Any) -> Any:
        import torch

        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def close(self) -> None:
        self.model = None
        self.decoder = None
        self.lm_head = None
