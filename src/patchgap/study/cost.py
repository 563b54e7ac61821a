"""What a study costs in GPU hours, from token counts, a model's shape and a stated GPU rate.

The arithmetic of ``benchmarks/study_cost.py``. A unit of work is a number of sequences, each
with the tokens it processes and, for generation, the tokens it adds. Its FLOPs are the
transformer's per-token matmul FLOPs (2 per weight of the attention and MLP projections and the
output head) plus the attention scores over the context, times the passes the kind of work
makes: generating and scoring are one forward pass; training is a forward and a backward pass
(three forwards' worth for full fine-tuning, two for LoRA, whose frozen weights get no
gradient), plus one more forward under gradient checkpointing. GPU hours are FLOPs divided by
the GPU's peak times an assumed utilisation (MFU) per kind, given as a range.

Only the rate is assumed; the token counts come from measurements (a finished run and the
datasets), and the model's shape from its config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from patchgap.errors import ConfigError

Kind = Literal["generate", "score", "train_full", "train_lora"]

#: Forward passes' worth of FLOPs per token for each kind of work (without checkpointing).
PASSES: dict[str, float] = {"generate": 1.0, "score": 1.0, "train_full": 3.0, "train_lora": 2.0}


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's dimensions (a Llama/Qwen2-style config.json)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Shape:
        """From a Hugging Face ``config.json`` (``num_key_value_heads`` defaults to the heads)."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                layers=int(config["num_hidden_layers"]),
                hidden=int(config["hidden_size"]),
                intermediate=int(config["intermediate_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                vocab=int(config["vocab_size"]),
            )
        except KeyError as err:
            raise ConfigError(f"model config: missing key {err.args[0]!r}") from None

    @property
    def matmul_params(self) -> int:
        """Weights a token multiplies through: q/k/v/o, the gated MLP's three, the output head."""
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp) + self.vocab * self.hidden

    def forward_flops(self, tokens: float, context: float) -> float:
        """Forward FLOPs of ``tokens`` tokens that each attend over ``context`` tokens on average:
        2 per matmul weight, and 2 x 2 x layers x hidden x context for the scores and the
        weighted values."""
        return tokens * (2 * self.matmul_params + 4 * self.layers * self.hidden * context)


#: Qwen2.5-7B(-Instruct)'s config.json dimensions (7.07e9 matmul weights).
QWEN25_7B = Shape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064)


@dataclass(frozen=True)
class Work:
    """``sequences`` sequences of ``prompt`` tokens, each adding ``new`` tokens (generation) or
    processed whole (scoring, training: ``new`` is then 0 and ``prompt`` the full length)."""

    stage: str
    what: str
    kind: Kind
    sequences: float
    prompt: float
    new: float = 0.0
    checkpointing: bool = False

    @property
    def tokens(self) -> float:
        return self.sequences * (self.prompt + self.new)

    def flops(self, shape: Shape) -> float:
        """FLOPs of this work on ``shape``: a generated token attends over the prompt and half
        the new tokens on average, a processed one over half the sequence."""
        passes = PASSES[self.kind] + (1.0 if self.checkpointing else 0.0)
        if self.kind == "generate":
            prefill = shape.forward_flops(self.sequences * self.prompt, self.prompt / 2)
            decode = shape.forward_flops(self.sequences * self.new, self.prompt + self.new / 2)
            return passes * (prefill + decode)
        return passes * shape.forward_flops(self.tokens, (self.prompt + self.new) / 2)


@dataclass(frozen=True)
class Rate:
    """A GPU's dense bf16 peak and the utilisation assumed for each kind, as (low, high)."""

    name: str
    peak_flops: float
    mfu: Mapping[str, tuple[float, float]]

    def hours(self, work: Work, shape: Shape) -> tuple[float, float]:
        """GPU hours of ``work``: (at the high utilisation, at the low one)."""
        family = "train" if work.kind.startswith("train") else work.kind
        try:
            low, high = self.mfu[family]
        except KeyError:
            raise ConfigError(f"rate {self.name}: no utilisation for {family!r} work") from None
        if not 0 < low <= high <= 1:
            raise ConfigError(
                f"rate {self.name}: utilisation for {family!r} must be 0 < low <= high <= 1"
            )
        flops = work.flops(shape)
        return flops / (self.peak_flops * high) / 3600, flops / (self.peak_flops * low) / 3600


#: An H100 SXM: 989 TFLOP/s dense bf16. Utilisation assumed for 7B models: vLLM generation with
#: large batches 8-20% (memory-bound decoding; ~5-14k new tokens/s), forward scoring 30-50%,
#: training (ZeRO-3 or LoRA, gradient checkpointing) 25-45%.
H100 = Rate(
    name="H100 SXM (989 TFLOP/s bf16 dense)",
    peak_flops=989e12,
    mfu={"generate": (0.08, 0.20), "score": (0.30, 0.50), "train": (0.25, 0.45)},
)


def total_hours(works: Iterable[Work], shape: Shape, rate: Rate) -> dict[str, tuple[float, float]]:
    """GPU hours per stage (and ``total``) as (low, high)."""
    out: dict[str, tuple[float, float]] = {}
    for work in works:
        low, high = rate.hours(work, shape)
        for key in (work.stage, "total"):
            a, b = out.get(key, (0.0, 0.0))
            out[key] = (a + low, b + high)
    return out


# ----------------------------------------------------------------------------- a study's work


@dataclass(frozen=True)
class Plan:
    """The sizes of a study that set its cost (read from its config)."""

    records: int
    rl_steps: int
    prompts_per_step: int
    generations: int
    max_completion: int
    rewrite_max_new: int
    candidates: int
    max_retries: int
    kl: bool
    judge: bool
    arms: tuple[str, ...]
    seeds: int
    snapshots: int
    epochs_full: float
    epochs_concentrated: float
    drift_questions: int
    drift_max_new: int
    math_max_new: int
    checkpointing_rl: bool = True
    checkpointing_sft: bool = True


@dataclass(frozen=True)
class Tokens:
    """Measured token counts per item (means) and rates.

    ``rewrite_ratio`` and ``rollout_ratio`` are a rewrite's and a GRPO rollout's new tokens over
    the reference solution's; ``answer_failure`` the share of first rewrites whose final answer
    is wrong (sampled again while retries last); ``acceptance`` each gate's accepted share.
    ``heldout`` and ``general``: per set, (sequences, mean tokens of one); a multiple-choice
    item is one sequence per choice (context and choice), as lm-eval scores it. ``math``: per
    set, (items, prompt tokens, answer tokens).
    """

    question: float
    reference: float
    rewrite_prompt: float
    judge_prompt: float
    rewrite_ratio: float
    rollout_ratio: float
    answer_failure: float
    acceptance: Mapping[str, float]
    heldout: Mapping[str, tuple[int, float]]
    general: Mapping[str, tuple[int, float]]
    math: Mapping[str, tuple[int, float, float]]
    drift_question: float
    drift_answer: float


FULL_ARMS = {"d": None, "dr": "rl", "dr_prompt": "prompt"}
CONCENTRATED_ARMS = {
    "ref_rl": "rl", "rw_rl": "rl", "swap_rl": "rl",
    "ref_prompt": "prompt", "rw_prompt": "prompt", "swap_prompt": "prompt",
}  # fmt: skip


def study_works(plan: Plan, tok: Tokens) -> list[Work]:
    """Every unit of a study's work: the rewriter's GRPO steps, both rewrites and gates, one SFT
    job per arm and seed, and the evaluation of pi0 and every snapshot."""
    works: list[Work] = []
    q, ref = tok.question, tok.reference
    rollouts = plan.rl_steps * plan.prompts_per_step * plan.generations
    rollout = min(tok.rollout_ratio * ref, plan.max_completion)
    rw_prompt = q + ref + tok.rewrite_prompt
    ck = plan.checkpointing_rl
    works += [
        Work("train-rewriter", "rollouts", "generate", rollouts, rw_prompt, rollout),
        Work("train-rewriter", "policy update (LoRA)", "train_lora", rollouts, rw_prompt + rollout,
             checkpointing=ck),
    ]  # fmt: skip
    if plan.kl:
        works.append(Work("train-rewriter", "reference log-probs (KL)", "score", rollouts,
                          rw_prompt + rollout))  # fmt: skip
    works.append(Work("train-rewriter", "reward: NLL under pi0", "score", rollouts, q + rollout))
    if plan.judge:
        works.append(Work("train-rewriter", "reward: judge", "score", rollouts,
                          tok.judge_prompt + q + rollout))  # fmt: skip
    # Rewrites: the candidates of each record, then a retry round for each record whose first
    # rewrite has a wrong answer, while rounds last.
    f = tok.answer_failure
    per_record = plan.candidates + sum(f**k for k in range(1, plan.max_retries + 1))
    candidate = min(tok.rewrite_ratio * ref, plan.rewrite_max_new)
    for rewriter in ("rl", "prompt"):
        n = plan.records * per_record
        works += [
            Work("rewrite", f"{rewriter} rewriter", "generate", n, rw_prompt, candidate),
            Work("gate", f"{rewriter}: NLL of candidates and references", "score",
                 n + plan.records, q + (candidate + ref) / 2),
        ]  # fmt: skip
        if plan.judge:
            works.append(Work("gate", f"{rewriter}: judge", "score", n,
                              tok.judge_prompt + q + candidate))  # fmt: skip
    # SFT: one job per arm and seed.
    jobs = 0
    for arm in plan.arms:
        if arm in FULL_ARMS:
            records, epochs = plan.records, plan.epochs_full
            length = q + (ref if arm == "d" else _mixed(tok, FULL_ARMS[arm], ref, candidate))
        elif arm in CONCENTRATED_ARMS:
            records = plan.records * tok.acceptance[CONCENTRATED_ARMS[arm]]
            epochs = plan.epochs_concentrated
            length = q + (candidate if arm.startswith("rw_") else ref)
        else:
            raise ConfigError(f"study arm {arm!r}: unknown")
        jobs += plan.seeds
        works.append(Work("sft", f"{arm} x {plan.seeds} seeds", "train_full",
                          plan.seeds * records * epochs, length,
                          checkpointing=plan.checkpointing_sft))  # fmt: skip
    # Evaluate: pi0's drift answers once, then every model.
    models = 1 + jobs * plan.snapshots
    drift_answer = min(tok.drift_answer, plan.drift_max_new)
    works.append(Work("evaluate", "pi0's drift answers", "generate", plan.drift_questions,
                      tok.drift_question, drift_answer))  # fmt: skip
    drift = tok.drift_question + drift_answer
    works.append(Work("evaluate", f"drift NLL x {models} models", "score",
                      models * plan.drift_questions, drift))  # fmt: skip
    for name, (items, length) in tok.heldout.items():
        works.append(Work("evaluate", f"held-out NLL {name} x {models}", "score",
                          models * items, length))  # fmt: skip
    for name, (sequences, length) in tok.general.items():
        works.append(Work("evaluate", f"{name} log-probs x {models}", "score",
                          models * sequences, length))  # fmt: skip
    for name, (items, prompt, answer) in tok.math.items():
        works.append(Work("evaluate", f"{name} answers x {models}", "generate", models * items,
                          prompt, min(answer, plan.math_max_new)))  # fmt: skip
    return works


def _mixed(tok: Tokens, rewriter: str | None, ref: float, candidate: float) -> float:
    """Mean target length of D_R: accepted records take the rewrite, the rest the reference."""
    share = tok.acceptance[rewriter] if rewriter else 0.0
    return share * candidate + (1 - share) * ref
