"""The train-rewriter stage on a GPU with vLLM rollouts in colocate mode (TRL's LoRA weight
sync): one GRPO step on SmolLM2-135M. Skipped without CUDA and vllm."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from patchgap.stages import train_rewriter as tr
from patchgap.stages.base import execute

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_one_step_with_colocated_vllm(smollm2: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
        for a, b in [(2, 3), (4, 4), (7, 5), (9, 1)]
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tr.Config.model_validate(
        {
            "model": str(smollm2),
            "dataset": {"source": str(data), "fields": "gsm8k"},
            "num_generations": 4,
            "prompts_per_step": 2,
            "per_device_batch_size": 4,
            "max_completion_length": 64,
            "max_steps": 1,
            "rollout": {"backend": "vllm", "vllm_gpu_memory_utilization": 0.2},
            "distributed": "none",
            "progress": False,
        }
    )
    out = tmp_path / "out"
    result = execute(tr, config, {}, {"adapter": str(out / "a"), "metrics": str(out / "m")})
    assert result.metrics["global_step"] == 1
    row = json.loads((out / "m" / tr.METRICS_JSONL).read_text().splitlines()[0])
    assert row["completion_length"] > 0 and row["seconds_per_step"] > 0
    assert (out / "a" / "adapter_model.safetensors").is_file()
