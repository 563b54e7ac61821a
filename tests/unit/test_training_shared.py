"""What train-rewriter and sft share: one LoraSettings with per-stage dropout defaults, one
meaning of dtype "auto", and one multi-GPU relaunch whose errors name the calling stage."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from patchgap.config import validate
from patchgap.errors import ConfigError, PatchgapError
from patchgap.lm.models import dtype_for
from patchgap.stages import sft
from patchgap.stages import train_rewriter as tr
from patchgap.training import launch
from patchgap.training.lora import LoraSettings


def test_one_lora_settings_serves_both_stages_with_their_dropout() -> None:
    assert type(tr.Config().lora) is type(sft.Config().lora) is LoraSettings
    assert tr.Config().lora.dropout == 0.0
    assert sft.Config().lora.dropout == sft.LORA_DROPOUT == 0.05
    # A section that sets other keys keeps the stage's dropout; an explicit one wins.
    assert validate(sft.Config, {"lora": {"r": 4}}, "t").lora.model_dump() == {
        "r": 4,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": "all-linear",
    }
    assert validate(tr.Config, {"lora": {"r": 4}}, "t").lora.dropout == 0.0
    assert validate(sft.Config, {"lora": {"dropout": 0.1}}, "t").lora.dropout == 0.1
    peft = validate(sft.Config, {"lora": {"r": 8, "alpha": 16}}, "t").lora.peft_config()
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.bias) == (8, 16, 0.05, "none")


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_cpu() -> None:
    assert dtype_for("auto", "cpu") == "float32"
    assert dtype_for("auto", "cuda") == dtype_for("auto", "cuda:1") == "bfloat16"
    assert dtype_for("bf16", "cpu") == "bfloat16"  # an explicit dtype wins
    assert dtype_for("float32", "cuda") == "float32"
    with pytest.raises(ConfigError, match="float64"):
        dtype_for("float64", "cpu")


def test_sft_relaunch_uses_zero3_for_full_finetuning_and_names_sft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("WORLD_SIZE", "LOCAL_RANK", launch.CHILD_ENV):
        monkeypatch.delenv(var, raising=False)
    seen: list[list[str]] = []

    def fail(cmd: list[str], env: dict[str, str], check: bool) -> subprocess.CompletedProcess:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(launch, "visible_gpus", lambda: 2)
    monkeypatch.setattr(launch.subprocess, "run", fail)
    outputs = {"model": tmp_path / "model", "metrics": tmp_path / "metrics"}
    with pytest.raises(PatchgapError, match=r"^sft: `accelerate launch` with .*zero3\.yaml"):
        sft.run(sft.Config(), {"dataset": tmp_path / "d.jsonl"}, outputs)
    cmd = seen[0]
    assert cmd[cmd.index("-m", 3) + 1] == "patchgap.stages.sft"
    assert cmd[cmd.index("--section") + 1] == "sft"
    with pytest.raises(PatchgapError, match=r"^sft: .*zero2\.yaml"):
        sft.run(sft.Config(finetuning="lora"), {}, outputs)
    with pytest.raises(ConfigError, match=r"^sft: accelerate config .*nowhere\.yaml not found"):
        sft.run(sft.Config(accelerate_config=str(tmp_path / "nowhere.yaml")), {}, outputs)
