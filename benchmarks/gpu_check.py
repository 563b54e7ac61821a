"""GPU smoke checks of patchgap's model code paths on a CUDA machine, with figures.

    python3 benchmarks/gpu_check.py [--device cuda] [--out PATH] [--quick] [--only a,b]

Runs from the repository root of a checkout that is not pip-installed (``src/`` goes on the
path). Each check runs the project's own code, is independent of the others (a failure prints
``FAIL <name>: <reason>`` and a short traceback, and the next check runs), and records its figures
in a JSON file (``--out``, default ``./gpu_check.json``; rewritten after every check, so a run
cut short still leaves what it measured):

1. ``generation``: the ragged prefill + shrinking decode of ``TransformersGenerator`` against
   ``model.generate`` on each unpadded prompt (tiny random Llama), in float32 (must match) and in
   bfloat16 (reported only: a near tie may flip); then the throughput of ``generate`` on a random
   model of SmolLM2-135M's shape in bfloat16: 64 prompts of 220..560 random token ids, 128 new
   tokens, batched (32 a batch) against one prompt at a time, and the left-padded
   ``model.generate`` fallback for comparison (``ratio=`` is batched / one at a time).
2. ``scoring_bf16``: ``NLLScorer`` on 16 (question, answer) pairs in float32 and in bfloat16:
   per-sequence NLL differences and seconds (plus float32 on the device against the CPU).
3. ``grpo_step``: the train-rewriter stage (``execute``), 2 GRPO steps with LoRA in bfloat16, with
   the real group reward scorer (pi0's NLL and a tiny local sentence-transformers embedder on the
   device, judge off); only the answer check is replaced by a deterministic oracle (two of each
   group's three rewrites are "right"), since a random model never states the right answer and
   the rewards would then have no variance. Seconds per step, peak memory, and whether only LoRA
   weights moved.
4. ``sft_step``: the sft stage, full fine-tuning in bfloat16 for a few steps: loss first/last,
   seconds, peak memory.
5. ``vllm``: skipped when vllm is not installed; else greedy text from the vllm backend.

The exit status is 0 only when every check passed (or was skipped).

A CUDA machine without network access lacks some packages patchgap imports (trl, datasets,
pydantic, math-verify and their dependencies). Carry them as wheels for its Python (3.12) in
``.whl/`` and install them to a side folder first:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out results/gpu_check.json

On a laptop, ``--device cpu --quick`` runs the same checks smaller (about two minutes on one
thread) to see that the script itself works.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "src"):  # src first: the package is not installed on the GPU machine
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_k, _v)

VERSIONS = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "sentence-transformers",
    "huggingface-hub",
    "tokenizers",
    "pydantic",
    "typing-extensions",
    "math-verify",
    "numpy",
    "pandas",
    "pyarrow",
    "vllm",
)

QUESTIONS = [
    "What is 7 + 5?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Solve for y: 2y - 7 = 9.",
    "A rectangle has length 8 and width 3. What is its perimeter?",
]
ANSWERS = [
    "The answer is \\boxed{12}.",
    "Natalia sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips. #### 72",
    "Adding 7 gives 2y = 16, so y = 8. Let me think step by step. First, we find the total. "
    "Then we divide by the number of people. So the final answer is \\boxed{8}.",
    "2(8 + 3) = 22",
]


class Skipped(Exception):
    """A check that does not apply here (not a failure)."""


class CheckFailed(AssertionError):
    """A check that ran but whose figures show a fault; the figures are kept in the results."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


@dataclass
class Ctx:
    device: str
    quick: bool
    work: Path
    tiny: Path  # a tiny random Llama folder (tokenizer with a chat template), built once

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# ------------------------------------------------------------------------------------- helpers


def _sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def _reset_peak(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_mib(ctx: Ctx) -> float | None:
    if not ctx.cuda:
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _free(ctx: Ctx) -> None:
    from patchgap.lm.models import clear_shared_models

    clear_shared_models()
    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


def _chat_prompts(tok: Any, texts: list[str]) -> list[str]:
    from patchgap.lm.models import apply_chat

    return [apply_chat(tok, [{"role": "user", "content": t}]) for t in texts]


def _hf_greedy(gen: Any, ids: list[int], max_new: int) -> list[int]:
    """Reference: ``model.generate`` on one unpadded prompt (the backend's fallback path, which
    with one prompt pads nothing), cut after the first eos."""
    gen.config = gen.config.model_copy(update={"max_new_tokens": max_new})
    (new,) = gen._hf_generate([ids], 1, 0.0)
    stop = next((k for k, t in enumerate(new) if t in gen.eos_ids), None)
    return new if stop is None else new[: stop + 1]


class IdTokenizer:
    """Prompts written as space-separated token ids: lets ``generate`` run on random ids for a
    model whose vocabulary no real tokenizer here matches (decoding writes ids back)."""

    def __init__(self, eos_id: int, pad_id: int) -> None:
        self.eos_token_id = eos_id
        self.pad_token_id = pad_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


# -------------------------------------------------------------------------------------- checks


def check_generation(ctx: Ctx) -> dict[str, Any]:
    from patchgap.lm.generation import GenerationConfig, make_generator

    max_new = 16
    texts = [
        "Hi",
        "a",
        "What is 12 * 12?",
        "Compute 3 + 4 and then 5 * 6.",
        "x " * 40,
        "Solve for y: 2y - 7 = 9. " * 6,
    ]
    out: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        cfg = GenerationConfig(device=ctx.device, dtype=dtype, max_new_tokens=max_new, batch_size=8)
        gen = make_generator(ctx.tiny, config=cfg)
        ids = [
            gen.tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in _chat_prompts(gen.tokenizer, texts)
        ]
        rows = gen._ragged_decode(ids, 1, 0.0)
        ref = [_hf_greedy(gen, x, max_new) for x in ids]
        matches = sum(a == b for a, b in zip(rows, ref, strict=True))
        out[dtype] = {
            "matches": matches,
            "total": len(ids),
            "ragged": gen._ragged,
            "prompt_tokens": [len(x) for x in ids],
        }
        print(
            f"  {dtype}: ragged decode == model.generate on {matches}/{len(ids)} prompts, "
            f"ragged={gen._ragged}"
        )
        gen.close()
        del gen
        _free(ctx)
    out["throughput"] = _generation_throughput(ctx)
    f32 = out["float32"]
    if f32["ragged"] is not True:
        raise CheckFailed(f"float32: the ragged path fell back (gen._ragged={f32['ragged']})", out)
    if f32["matches"] != f32["total"]:
        raise CheckFailed(f"float32: ragged decode matched {f32['matches']}/{f32['total']}", out)
    if out["bfloat16"]["ragged"] is not True:
        raise CheckFailed("bfloat16: the ragged path fell back", out)
    return out


def _generation_throughput(ctx: Ctx) -> dict[str, Any]:
    """batched ``generate`` vs one prompt at a time on a random SmolLM2-135M-shaped model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from patchgap.lm.generation import GenerationConfig, TransformersGenerator

    layers, n_prompts, n_single, max_new = (2, 8, 4, 16) if ctx.quick else (30, 64, 8, 128)
    eos_id = 2
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to(ctx.device)
    cfg = GenerationConfig(
        device=ctx.device, dtype="bfloat16", max_new_tokens=max_new, batch_size=32
    )
    gen = TransformersGenerator(
        ctx.tiny, None, cfg, model=model, tokenizer=IdTokenizer(eos_id, eos_id)
    )
    rng = random.Random(0)
    lengths = [rng.randint(220, 560) for _ in range(n_prompts)]
    prompts = [" ".join(str(rng.randrange(3, 49152)) for _ in range(n)) for n in lengths]

    def timed(fn: Callable[[], list[list[Any]]]) -> tuple[float, int, list[list[Any]]]:
        _sync(ctx)
        t0 = time.perf_counter()
        res = fn()
        _sync(ctx)
        return time.perf_counter() - t0, sum(g[0].num_tokens for g in res), res

    def padded() -> list[list[Any]]:  # the left-padded model.generate fallback, same batches
        gen._ragged = False
        try:
            return gen.generate(prompts)
        finally:
            gen._ragged = None

    # Warm-up of every way on every shape it will see (cold kernels and cuBLAS heuristics cost
    # seconds on first use and would otherwise land on whichever way runs first).
    gen.generate(prompts)
    padded()
    for p in prompts[:n_single]:
        gen.generate([p])
    _reset_peak(ctx)
    t_b, tok_b, batched = timed(lambda: gen.generate(prompts))
    peak_b = _peak_mib(ctx)
    ragged = gen._ragged
    t_s, tok_s, single = timed(lambda: [gen.generate([p])[0] for p in prompts[:n_single]])
    t_h, tok_h, _ = timed(padded)
    same = sum(a[0].text == b[0].text for a, b in zip(batched, single, strict=False))
    tps_b, tps_s, tps_h = tok_b / t_b, tok_s / t_s, tok_h / t_h
    stopped = sum(g[0].finish_reason == "stop" for g in batched)
    res = {
        "layers": layers,
        "prompts": n_prompts,
        "prompt_tokens": sum(lengths),
        "max_new_tokens": max_new,
        "batch_size": 32,
        "ragged": ragged,
        "batched": {"seconds": round(t_b, 3), "tokens": tok_b, "tokens_per_s": round(tps_b, 1)},
        "one_at_a_time": {
            "prompts": n_single,
            "seconds": round(t_s, 3),
            "tokens": tok_s,
            "tokens_per_s": round(tps_s, 1),
        },
        "hf_padded_generate": {
            "seconds": round(t_h, 3),
            "tokens": tok_h,
            "tokens_per_s": round(tps_h, 1),
        },
        "rows_stopped_at_eos": stopped,
        "identical_texts_first_prompts": f"{same}/{n_single}",
        "peak_mib_batched": peak_b,
        "ratio": round(tps_b / tps_s, 2),
        "ratio_vs_hf_padded": round(tps_b / tps_h, 2),
    }
    print(
        f"  throughput (random {layers}-layer SmolLM2-135M shape, bf16, {n_prompts} prompts of "
        f"{min(lengths)}..{max(lengths)} tokens, {max_new} new):"
    )
    print(
        f"    batched        {tps_b:10.1f} tok/s  ({tok_b} tokens in {t_b:.2f} s, "
        f"peak {peak_b} MiB)"
    )
    print(
        f"    one at a time  {tps_s:10.1f} tok/s  ({tok_s} tokens in {t_s:.2f} s, "
        f"first {n_single} prompts)"
    )
    print(f"    hf padded      {tps_h:10.1f} tok/s  ({tok_h} tokens in {t_h:.2f} s)")
    print(f"    identical texts {same}/{n_single}, rows stopped at eos {stopped}/{n_prompts}")
    print(f"    ratio={res['ratio']}  (batched vs hf padded: {res['ratio_vs_hf_padded']})")
    gen.close()  # drops the model; the caller frees the memory after the check
    return res


def check_scoring_bf16(ctx: Ctx) -> dict[str, Any]:
    from patchgap.lm.models import load_causal_lm, load_tokenizer
    from patchgap.reward.scoring import NLLScorer

    tok = load_tokenizer(ctx.tiny)
    groups = [[a + f" ({q_i})" for a in ANSWERS] for q_i in range(len(QUESTIONS))]

    def score(dtype: str, device: str) -> tuple[list[float], float]:
        model = load_causal_lm(ctx.tiny, dtype=dtype, device=device)
        scorer = NLLScorer(model, tok, "chat")
        scorer.score_groups(QUESTIONS[:1], [ANSWERS[:1]])  # warm-up
        _sync(ctx)
        t0 = time.perf_counter()
        vals = scorer.score_groups(QUESTIONS, groups)
        _sync(ctx)
        dt = time.perf_counter() - t0
        del scorer, model
        _free(ctx)
        return [v for g in vals for v in g], dt

    f32, t32 = score("float32", ctx.device)
    b16, t16 = score("bfloat16", ctx.device)
    bad = [v for v in f32 + b16 if not math.isfinite(v)]
    if bad:
        raise AssertionError(f"{len(bad)} non-finite NLL value(s)")
    diffs = [abs(a - b) for a, b in zip(f32, b16, strict=True)]
    out: dict[str, Any] = {
        "pairs": len(f32),
        "mean_nll_float32": round(sum(f32) / len(f32), 5),
        "max_abs_diff_bf16": round(max(diffs), 5),
        "mean_abs_diff_bf16": round(sum(diffs) / len(diffs), 5),
        "seconds_float32": round(t32, 4),
        "seconds_bfloat16": round(t16, 4),
    }
    print(
        f"  {len(f32)} pairs, mean NLL {out['mean_nll_float32']} (float32): bf16 - fp32 "
        f"|diff| max {out['max_abs_diff_bf16']}, mean {out['mean_abs_diff_bf16']}; "
        f"seconds fp32 {t32:.3f}, bf16 {t16:.3f}"
    )
    if ctx.cuda:
        cpu, _ = score("float32", "cpu")
        d = max(abs(a - b) for a, b in zip(f32, cpu, strict=True))
        out["max_abs_diff_float32_device_vs_cpu"] = round(d, 6)
        print(f"  float32 on {ctx.device} vs cpu: max |diff| {d:.2e}")
        if d > 1e-3:
            raise CheckFailed(f"float32 NLL on {ctx.device} differs from cpu by {d:.2e}", out)
    return out


def _build_embedder(ctx: Ctx) -> Path:
    """A tiny random sentence-transformers folder (the tiny Llama, mean of its last states)."""
    from sentence_transformers import SentenceTransformer

    folder = ctx.work / "embedder"
    if not (folder / "modules.json").is_file():
        SentenceTransformer(str(ctx.tiny), device="cpu").save(str(folder))
    return folder


class TwoOfThreeOracle:
    """Stands in for ``answers.equivalent``: of every three rewrites checked in a row (one group
    of K = 3), the first two are "right", so each group has rewards that differ and two feasible
    members whose NLL and embeddings the real scorer computes."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prediction_text: str, gold: str, timeout_s: float = 2.0) -> bool:
        self.calls += 1
        return (self.calls - 1) % 3 < 2


def check_grpo_step(ctx: Ctx) -> dict[str, Any]:
    import torch

    import patchgap.answers as answers
    from patchgap.stages import train_rewriter as tr
    from patchgap.stages.base import execute
    from patchgap.training.callbacks import StepMetricsCallback

    work = ctx.work / "grpo"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.jsonl"
    pairs = [(2, 3), (4, 4), (7, 5), (9, 1), (6, 6), (8, 3)]
    data.write_text(
        "".join(
            json.dumps(
                {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
            )
            + "\n"
            for a, b in pairs
        )
    )
    embedder = _build_embedder(ctx)
    dtype = "bfloat16"
    config = tr.Config.model_validate(
        {
            "model": str(ctx.tiny),
            "dataset": {"source": str(data), "fields": "gsm8k"},
            "device": ctx.device,
            "dtype": dtype,
            "num_generations": 3,
            "prompts_per_step": 2,
            "per_device_batch_size": 3,
            "max_completion_length": 16,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "gradient_checkpointing": False,
            "lora": {"r": 8, "alpha": 16},
            "rollout": {"backend": "transformers"},
            "reward": {"judge": False, "embedder": str(embedder), "dtype": dtype},
            "distributed": "none",
            "progress": False,
        }
    )
    snaps: dict[str, dict[str, Any]] = {}
    originals = {  # snapshot the policy's parameters when training begins and ends
        "begin": StepMetricsCallback.on_train_begin,
        "end": StepMetricsCallback.on_train_end,
    }

    def snap(name: str, orig: Any) -> Any:
        def wrapped(self: Any, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            snaps[name] = {
                k: v.detach().float().cpu().clone() for k, v in kw["model"].named_parameters()
            }
            return orig(self, args, state, control, **kw)

        return wrapped

    out_dir = work / "out"
    equivalent = answers.equivalent
    try:
        for name, orig in originals.items():
            setattr(StepMetricsCallback, f"on_train_{name}", snap(name, orig))
        answers.equivalent = TwoOfThreeOracle()
        _reset_peak(ctx)
        t0 = time.perf_counter()
        result = execute(
            tr, config, {}, {"adapter": str(out_dir / "a"), "metrics": str(out_dir / "m")}
        )
        seconds = time.perf_counter() - t0
    finally:
        answers.equivalent = equivalent
        for name, orig in originals.items():
            setattr(StepMetricsCallback, f"on_train_{name}", orig)
    peak = _peak_mib(ctx)
    rows = [json.loads(x) for x in (out_dir / "m" / tr.METRICS_JSONL).read_text().splitlines()]
    scorer = json.loads((out_dir / "m" / tr.REWARD_JSON).read_text())
    begin, end = snaps["begin"], snaps["end"]
    lora_moved = sum(not torch.equal(begin[k], end[k]) for k in begin if "lora_" in k)
    base_moved = [k for k in begin if "lora_" not in k and not torch.equal(begin[k], end[k])]
    out = {
        "reward": "real GroupRewardScorer (pi0 NLL + tiny local embedder, judge off), answer "
        "check replaced by an oracle passing 2 of each group's 3 rewrites",
        "steps": int(result.metrics.get("global_step", 0)),
        "seconds_per_step": [r.get("seconds_per_step") for r in rows],
        "reward_per_step": [r.get("reward") for r in rows],
        "stage_seconds": round(seconds, 2),
        "peak_mib": peak,
        "lora_params_moved": lora_moved,
        "lora_params": sum("lora_" in k for k in begin),
        "base_params_moved": len(base_moved),
        "scorer": {
            k.removeprefix("reward/"): v
            for k, v in scorer.items()
            if k.startswith(("reward/count_", "reward/seconds_"))
        },
    }
    sps = ", ".join(f"{s:.2f}" for s in out["seconds_per_step"] if s is not None)
    print(f"  {out['steps']} GRPO steps, s/step [{sps}], stage {seconds:.1f} s, peak {peak} MiB")
    print(
        f"  LoRA tensors moved {lora_moved}/{out['lora_params']}, frozen tensors moved "
        f"{len(base_moved)}; scorer {out['scorer']}"
    )
    if out["steps"] != 2:
        raise CheckFailed(f"ran {out['steps']} steps, not 2", out)
    if base_moved:
        raise CheckFailed(f"frozen pi0 parameters changed: {base_moved[:3]}", out)
    if not lora_moved:
        raise CheckFailed("no LoRA parameter changed", out)
    if not scorer.get("reward/count_feasible") or not scorer.get("reward/seconds_embed"):
        raise CheckFailed("the reward's NLL or embedder never ran (no feasible rewrites)", out)
    return out


def check_sft_step(ctx: Ctx) -> dict[str, Any]:
    from patchgap.stages import sft
    from patchgap.stages.base import execute

    work = ctx.work / "sft"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "d_r.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"r{a}{b}",
                    "question": f"What is {a} + {b}?",
                    "solution": f"We add {a} and {b} to get {a + b}. "
                    f"The answer is \\boxed{{{a + b}}}.",
                    "answer": str(a + b),
                }
            )
            + "\n"
            for a in range(4)
            for b in range(4)
        )
    )
    steps = 6
    cfg = sft.Config(
        model=str(ctx.tiny),
        learning_rate=3e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        per_device_batch_size=8,
        max_steps=steps,
        device=ctx.device,
        dtype="bfloat16",
        finetuning="full",
        distributed="none",
    )
    _reset_peak(ctx)
    t0 = time.perf_counter()
    result = execute(
        sft,
        cfg,
        {"dataset": str(data)},
        {"model": str(work / "out" / "model"), "metrics": str(work / "out" / "metrics")},
    )
    seconds = time.perf_counter() - t0
    m = result.metrics
    out = {
        "steps": int(m["steps"]),
        "loss_first": round(m["loss_first"], 4),
        "loss_last": round(m["loss_last"], 4),
        "train_seconds": m["train_seconds"],
        "stage_seconds": round(seconds, 2),
        "peak_mib": _peak_mib(ctx),
    }
    print(
        f"  {out['steps']} steps full fine-tuning bf16: loss {out['loss_first']} -> "
        f"{out['loss_last']}, {seconds:.1f} s, peak {out['peak_mib']} MiB"
    )
    if out["steps"] != steps:
        raise CheckFailed(f"ran {out['steps']} steps, not {steps}", out)
    if not m["loss_last"] < m["loss_first"]:
        raise CheckFailed(f"loss did not fall: {m['loss_first']} -> {m['loss_last']}", out)
    return out


def check_vllm(ctx: Ctx) -> dict[str, Any]:
    try:
        import vllm
    except ImportError:
        raise Skipped("vllm not installed") from None
    if not ctx.cuda:
        raise Skipped("vllm needs CUDA")
    from patchgap.lm.generation import GenerationConfig, make_generator

    cfg = GenerationConfig(
        backend="vllm",
        max_new_tokens=16,
        dtype="float32",
        gpu_memory_utilization=0.2,
        max_model_len=512,
    )
    gen = make_generator(ctx.tiny, config=cfg)
    prompts = _chat_prompts(gen.tokenizer, QUESTIONS)
    t0 = time.perf_counter()
    outs = gen.generate(prompts)
    dt = time.perf_counter() - t0
    gen.close()
    tokens = sum(g[0].num_tokens for g in outs)
    print(f"  vllm {vllm.__version__}: {len(outs)} prompts, {tokens} tokens in {dt:.2f} s")
    return {"version": vllm.__version__, "tokens": tokens, "seconds": round(dt, 3)}


CHECKS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "generation": check_generation,
    "scoring_bf16": check_scoring_bf16,
    "grpo_step": check_grpo_step,
    "sft_step": check_sft_step,
    "vllm": check_vllm,
}


# ---------------------------------------------------------------------------------------- main


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default ./gpu_check.json)")
    p.add_argument("--quick", action="store_true", help="smaller throughput run (smoke test)")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 on cpu)")
    args = p.parse_args(argv)
    out_path: Path = args.out or Path("gpu_check.json")
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")

    t_start = time.perf_counter()
    import torch

    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    report: dict[str, Any] = {"device": args.device, "quick": args.quick, "versions": _versions()}
    report["checks"] = {}

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            report["all_passed"] = False
            report["setup_error"] = f"--device {args.device} but torch sees no CUDA device"
            save()
            print(f"FAIL setup: {report['setup_error']}")
            return 1
        t0 = time.perf_counter()
        torch.zeros(1, device=args.device)
        report["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        report["cuda_init_seconds"] = round(time.perf_counter() - t0, 2)
    print(
        f"device {args.device} ({report.get('gpu', platform.processor() or 'cpu')}), "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    )
    with tempfile.TemporaryDirectory(prefix="patchgap-gpu-check-") as tmp:
        os.environ.setdefault("PATCHGAP_HOME", str(Path(tmp) / "home"))
        from patchgap.lm.tiny import build_tiny_model

        tiny = build_tiny_model(Path(tmp) / "tiny-llama", "llama", seed=0)
        ctx = Ctx(device=args.device, quick=args.quick, work=Path(tmp), tiny=tiny)
        for name in names:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            entry: dict[str, Any]
            try:
                figures = CHECKS[name](ctx)
                entry = {"status": "pass", **figures}
                print(f"PASS {name} ({time.perf_counter() - t0:.1f} s)")
            except Skipped as why:
                entry = {"status": "skipped", "reason": str(why)}
                print(f"SKIP {name}: {why}")
            except Exception as err:  # every check is independent
                tb = traceback.format_exc().strip().splitlines()
                entry = {**getattr(err, "figures", {}), "status": "fail"}
                entry["reason"] = f"{type(err).__name__}: {err}"[:500]
                entry["traceback"] = tb[-12:]
                print(f"FAIL {name}: {entry['reason']}")
                print("\n".join("    " + line for line in tb[-12:]))
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            report["checks"][name] = entry
            save()
            try:
                _free(ctx)
            except Exception:
                pass
    failed = [n for n, e in report["checks"].items() if e["status"] == "fail"]
    report["all_passed"] = not failed
    save()
    print(
        f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
        f"in {report['seconds']} s; results in {out_path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
