"""The transformers generation backend on CUDA: its ragged prefill + shrinking decode against
``model.generate`` on each unpadded prompt (tiny random Llama), and the throughput of batched
generation against one prompt at a time and against the left-padded ``model.generate`` fallback
(random model of SmolLM2-135M's shape, bfloat16)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from patchgap.lm.generation import GenerationConfig, TransformersGenerator, make_generator
from patchgap.lm.models import apply_chat

pytestmark = pytest.mark.gpu

PROMPTS = [
    "Hi",
    "a",
    "What is 12 * 12?",
    "Compute 3 + 4 and then 5 * 6.",
    "x " * 40,
    "Solve for y: 2y - 7 = 9. " * 6,
]


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ragged_decode_matches_generate(
    dtype: str, cuda: Any, tiny_llama: Path, figures: Any
) -> None:
    # float32 must match token for token; in bfloat16 a near tie may flip, so only the count
    # is reported there, and the ragged path must still be taken.
    max_new = 16
    cfg = GenerationConfig(device=cuda.name, dtype=dtype, max_new_tokens=max_new, batch_size=8)
    gen = make_generator(tiny_llama, config=cfg)
    try:
        chats = [apply_chat(gen.tokenizer, [{"role": "user", "content": t}]) for t in PROMPTS]
        ids = [gen.tokenizer(p, add_special_tokens=False)["input_ids"] for p in chats]
        rows = gen._ragged_decode(ids, 1, 0.0)
        ref = [_hf_greedy(gen, x, max_new) for x in ids]
        ragged = gen._ragged
    finally:
        gen.close()
    matches = sum(a == b for a, b in zip(rows, ref, strict=True))
    figures.add(
        dtype=dtype,
        matches=matches,
        total=len(ids),
        ragged=ragged,
        prompt_tokens=[len(x) for x in ids],
    )
    figures.say(
        f"{dtype}: ragged decode == model.generate on {matches}/{len(ids)} prompts, ragged={ragged}"
    )
    assert ragged is True, f"{dtype}: the ragged path fell back (gen._ragged={ragged})"
    if dtype == "float32":
        assert matches == len(ids), f"float32: ragged decode matched {matches}/{len(ids)}"


def test_batched_generation_throughput(cuda: Any, tiny_llama: Path, figures: Any) -> None:
    """Batched ``generate`` vs one prompt at a time on a random SmolLM2-135M-shaped model. The
    figures are reported (``ratio`` is batched / one at a time); no speed target is asserted."""
    layers, n_prompts, n_single, max_new, batch = 30, 64, 8, 128, 32
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
    model.to(cuda.name)
    cfg = GenerationConfig(
        device=cuda.name, dtype="bfloat16", max_new_tokens=max_new, batch_size=batch
    )
    gen = TransformersGenerator(
        tiny_llama, None, cfg, model=model, tokenizer=IdTokenizer(eos_id, eos_id)
    )
    rng = random.Random(0)
    lengths = [rng.randint(220, 560) for _ in range(n_prompts)]
    prompts = [" ".join(str(rng.randrange(3, 49152)) for _ in range(n)) for n in lengths]

    def timed(fn: Callable[[], list[list[Any]]]) -> tuple[float, int, list[list[Any]]]:
        cuda.sync()
        t0 = time.perf_counter()
        res = fn()
        cuda.sync()
        return time.perf_counter() - t0, sum(g[0].num_tokens for g in res), res

    def padded() -> list[list[Any]]:  # the left-padded model.generate fallback, same batches
        gen._ragged = False
        try:
            return gen.generate(prompts)
        finally:
            gen._ragged = None

    try:
        # Warm-up of every way on every shape it will see (cold kernels and cuBLAS heuristics
        # cost seconds on first use and would otherwise land on whichever way runs first).
        gen.generate(prompts)
        padded()
        for p in prompts[:n_single]:
            gen.generate([p])
        cuda.reset_peak()
        t_b, tok_b, batched = timed(lambda: gen.generate(prompts))
        peak_b = cuda.peak_mib()
        ragged = gen._ragged
        t_s, tok_s, single = timed(lambda: [gen.generate([p])[0] for p in prompts[:n_single]])
        t_h, tok_h, _ = timed(padded)
    finally:
        gen.close()  # drops the model; the tier's teardown frees the memory
    same = sum(a[0].text == b[0].text for a, b in zip(batched, single, strict=False))
    stopped = sum(g[0].finish_reason == "stop" for g in batched)
    assert tok_b > 0 and tok_s > 0 and tok_h > 0, "a way of generating produced no tokens"
    tps_b, tps_s, tps_h = tok_b / t_b, tok_s / t_s, tok_h / t_h
    figures.add(
        layers=layers,
        prompts=n_prompts,
        prompt_tokens=sum(lengths),
        max_new_tokens=max_new,
        batch_size=batch,
        ragged=ragged,
        batched={"seconds": round(t_b, 3), "tokens": tok_b, "tokens_per_s": round(tps_b, 1)},
        one_at_a_time={
            "prompts": n_single,
            "seconds": round(t_s, 3),
            "tokens": tok_s,
            "tokens_per_s": round(tps_s, 1),
        },
        hf_padded_generate={
            "seconds": round(t_h, 3),
            "tokens": tok_h,
            "tokens_per_s": round(tps_h, 1),
        },
        rows_stopped_at_eos=stopped,
        identical_texts_first_prompts=f"{same}/{n_single}",
        peak_mib_batched=peak_b,
        ratio=round(tps_b / tps_s, 2),
        ratio_vs_hf_padded=round(tps_b / tps_h, 2),
    )
    figures.say(
        f"random {layers}-layer SmolLM2-135M shape, bf16, {n_prompts} prompts of "
        f"{min(lengths)}..{max(lengths)} tokens, {max_new} new:"
    )
    figures.say(
        f"  batched        {tps_b:10.1f} tok/s  ({tok_b} tokens in {t_b:.2f} s, peak {peak_b} MiB)"
    )
    figures.say(
        f"  one at a time  {tps_s:10.1f} tok/s  ({tok_s} tokens in {t_s:.2f} s, "
        f"first {n_single} prompts)"
    )
    figures.say(f"  hf padded      {tps_h:10.1f} tok/s  ({tok_h} tokens in {t_h:.2f} s)")
    figures.say(f"  identical texts {same}/{n_single}, rows stopped at eos {stopped}/{n_prompts}")
    figures.say(
        f"  ratio={figures.values['ratio']}  (batched vs hf padded: "
        f"{figures.values['ratio_vs_hf_padded']})"
    )
