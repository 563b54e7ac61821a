"""Training stages on CUDA in bfloat16: two GRPO steps of the train-rewriter stage with LoRA and
the real group reward scorer, and a few steps of full fine-tuning in the sft stage. Seconds per
step, peak memory and losses are reported; what is asserted is that the steps ran and moved the
weights they should (and only those)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from patchgap.reward import scoring
from patchgap.stages import sft
from patchgap.stages import train_rewriter as tr
from patchgap.stages.base import execute
from patchgap.training.callbacks import StepMetricsCallback

pytestmark = pytest.mark.gpu


class TwoOfThreeOracle:
    """Stands in for the scorer's answer check: of every three rewrites checked in a row (one
    group of K = 3), the first two are "right", so each group has rewards that differ and two
    feasible members whose NLL and embeddings the real scorer computes. A random model never
    states the right answer, and without this the rewards would have no variance."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prediction_text: str, gold: str, timeout_s: float = 2.0) -> bool:
        self.calls += 1
        return (self.calls - 1) % 3 < 2


def _snapshot_at(
    monkeypatch: pytest.MonkeyPatch, hook: str, into: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Copy the policy's parameters when the trainer calls ``StepMetricsCallback.<hook>``."""
    original = getattr(StepMetricsCallback, hook)

    def wrapped(self: Any, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        into[hook] = {
            k: v.detach().float().cpu().clone() for k, v in kw["model"].named_parameters()
        }
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(StepMetricsCallback, hook, wrapped)


def test_grpo_steps_with_lora_and_the_real_reward(
    cuda: Any,
    tiny_llama: Path,
    embedder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    figures: Any,
) -> None:
    data = tmp_path / "data.jsonl"
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
    dtype = "bfloat16"
    config = tr.Config.model_validate(
        {
            "model": str(tiny_llama),
            "dataset": {"source": str(data), "fields": "gsm8k"},
            "device": cuda.name,
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
    snaps: dict[str, dict[str, torch.Tensor]] = {}
    _snapshot_at(monkeypatch, "on_train_begin", snaps)
    _snapshot_at(monkeypatch, "on_train_end", snaps)
    # The scorer's own name for the answer check: the only part of the reward replaced.
    monkeypatch.setattr(scoring, "equivalent", TwoOfThreeOracle())
    out_dir = tmp_path / "out"
    cuda.reset_peak()
    t0 = time.perf_counter()
    result = execute(tr, config, {}, {"adapter": str(out_dir / "a"), "metrics": str(out_dir / "m")})
    seconds = time.perf_counter() - t0
    peak = cuda.peak_mib()
    rows = [json.loads(x) for x in (out_dir / "m" / tr.METRICS_JSONL).read_text().splitlines()]
    scorer = json.loads((out_dir / "m" / tr.REWARD_JSON).read_text())
    begin, end = snaps["on_train_begin"], snaps["on_train_end"]
    lora_moved = sum(not torch.equal(begin[k], end[k]) for k in begin if "lora_" in k)
    base_moved = [k for k in begin if "lora_" not in k and not torch.equal(begin[k], end[k])]
    steps = int(result.metrics.get("global_step", 0))
    figures.add(
        reward="real GroupRewardScorer (pi0 NLL + tiny local embedder, judge off), answer "
        "check replaced by an oracle passing 2 of each group's 3 rewrites",
        steps=steps,
        seconds_per_step=[r.get("seconds_per_step") for r in rows],
        reward_per_step=[r.get("reward") for r in rows],
        stage_seconds=round(seconds, 2),
        peak_mib=peak,
        lora_params_moved=lora_moved,
        lora_params=sum("lora_" in k for k in begin),
        base_params_moved=len(base_moved),
        scorer={
            k.removeprefix("reward/"): v
            for k, v in scorer.items()
            if k.startswith(("reward/count_", "reward/seconds_"))
        },
    )
    v = figures.values
    sps = ", ".join(f"{s:.2f}" for s in v["seconds_per_step"] if s is not None)
    figures.say(f"{steps} GRPO steps, s/step [{sps}], stage {seconds:.1f} s, peak {peak} MiB")
    figures.say(
        f"LoRA tensors moved {lora_moved}/{v['lora_params']}, frozen tensors moved "
        f"{len(base_moved)}; scorer {v['scorer']}"
    )
    assert steps == 2, f"ran {steps} steps, not 2"
    assert not base_moved, f"frozen pi0 parameters changed: {base_moved[:3]}"
    assert lora_moved, "no LoRA parameter changed"
    assert scorer.get("reward/count_feasible") and scorer.get("reward/seconds_embed"), (
        "the reward's NLL or embedder never ran (no feasible rewrites)"
    )


def test_sft_full_fine_tuning_steps(
    cuda: Any, tiny_llama: Path, tmp_path: Path, figures: Any
) -> None:
    data = tmp_path / "d_r.jsonl"
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
        model=str(tiny_llama),
        learning_rate=3e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        per_device_batch_size=8,
        max_steps=steps,
        device=cuda.name,
        dtype="bfloat16",
        finetuning="full",
        distributed="none",
    )
    cuda.reset_peak()
    t0 = time.perf_counter()
    result = execute(
        sft,
        cfg,
        {"dataset": str(data)},
        {"model": str(tmp_path / "out" / "model"), "metrics": str(tmp_path / "out" / "metrics")},
    )
    seconds = time.perf_counter() - t0
    m = result.metrics
    figures.add(
        steps=int(m["steps"]),
        loss_first=round(m["loss_first"], 4),
        loss_last=round(m["loss_last"], 4),
        train_seconds=m["train_seconds"],
        stage_seconds=round(seconds, 2),
        peak_mib=cuda.peak_mib(),
    )
    v = figures.values
    figures.say(
        f"{v['steps']} steps full fine-tuning bf16: loss {v['loss_first']} -> "
        f"{v['loss_last']}, {seconds:.1f} s, peak {v['peak_mib']} MiB"
    )
    assert v["steps"] == steps, f"ran {v['steps']} steps, not {steps}"
    assert m["loss_last"] < m["loss_first"], (
        f"loss did not fall: {m['loss_first']} -> {m['loss_last']}"
    )
