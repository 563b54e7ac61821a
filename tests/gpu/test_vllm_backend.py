"""The vLLM generation backend on CUDA: greedy text for four chat prompts (tiny random Llama).
Skipped where vllm is not installed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from patchgap.lm.generation import GenerationConfig, make_generator
from patchgap.lm.models import apply_chat

pytestmark = pytest.mark.gpu


def test_vllm_generates_greedy_text(
    cuda: Any, tiny_llama: Path, math_qa: tuple[list[str], list[str]], figures: Any
) -> None:
    vllm = pytest.importorskip("vllm", reason="vllm not installed")
    questions, _ = math_qa
    cfg = GenerationConfig(
        backend="vllm",
        max_new_tokens=16,
        dtype="float32",
        gpu_memory_utilization=0.2,
        max_model_len=512,
    )
    gen = make_generator(tiny_llama, config=cfg)
    try:
        prompts = [apply_chat(gen.tokenizer, [{"role": "user", "content": q}]) for q in questions]
        t0 = time.perf_counter()
        outs = gen.generate(prompts)
        seconds = time.perf_counter() - t0
    finally:
        gen.close()
    tokens = sum(g[0].num_tokens for g in outs)
    figures.add(version=vllm.__version__, tokens=tokens, seconds=round(seconds, 3))
    figures.say(f"vllm {vllm.__version__}: {len(outs)} prompts, {tokens} tokens in {seconds:.2f} s")
    assert len(outs) == len(prompts)
