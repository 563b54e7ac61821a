"""The NLL scorer on CUDA in bfloat16 against float32 (16 question-answer pairs, tiny random
Llama): the differences are reported; float32 on the GPU must agree with the CPU."""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from patchgap.lm.models import clear_shared_models, load_causal_lm, load_tokenizer
from patchgap.reward.scoring import NLLScorer

pytestmark = pytest.mark.gpu


def test_nll_scoring_in_bf16(
    cuda: Any, tiny_llama: Path, math_qa: tuple[list[str], list[str]], figures: Any
) -> None:
    questions, answers = math_qa
    tok = load_tokenizer(tiny_llama)
    groups = [[a + f" ({q_i})" for a in answers] for q_i in range(len(questions))]

    def score(dtype: str, device: str) -> tuple[list[float], float]:
        model = load_causal_lm(tiny_llama, dtype=dtype, device=device)
        scorer = NLLScorer(model, tok, "chat")
        scorer.score_groups(questions[:1], [answers[:1]])  # warm-up
        cuda.sync()
        t0 = time.perf_counter()
        vals = scorer.score_groups(questions, groups)
        cuda.sync()
        seconds = time.perf_counter() - t0
        del scorer, model  # one model on the device at a time
        clear_shared_models()
        gc.collect()
        torch.cuda.empty_cache()
        return [v for g in vals for v in g], seconds

    f32, t32 = score("float32", cuda.name)
    b16, t16 = score("bfloat16", cuda.name)
    bad = [v for v in f32 + b16 if not math.isfinite(v)]
    assert not bad, f"{len(bad)} non-finite NLL value(s)"
    diffs = [abs(a - b) for a, b in zip(f32, b16, strict=True)]
    figures.add(
        pairs=len(f32),
        mean_nll_float32=round(sum(f32) / len(f32), 5),
        max_abs_diff_bf16=round(max(diffs), 5),
        mean_abs_diff_bf16=round(sum(diffs) / len(diffs), 5),
        seconds_float32=round(t32, 4),
        seconds_bfloat16=round(t16, 4),
    )
    v = figures.values
    figures.say(
        f"{len(f32)} pairs, mean NLL {v['mean_nll_float32']} (float32): bf16 - fp32 "
        f"|diff| max {v['max_abs_diff_bf16']}, mean {v['mean_abs_diff_bf16']}; "
        f"seconds fp32 {t32:.3f}, bf16 {t16:.3f}"
    )
    cpu, _ = score("float32", "cpu")
    d = max(abs(a - b) for a, b in zip(f32, cpu, strict=True))
    figures.add(max_abs_diff_float32_device_vs_cpu=round(d, 6))
    figures.say(f"float32 on {cuda.name} vs cpu: max |diff| {d:.2e}")
    assert d <= 1e-3, f"float32 NLL on {cuda.name} differs from cpu by {d:.2e}"
