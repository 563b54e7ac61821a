"""Every config in configs/ loads and validates: each stage section of a run YAML against its
stage's Config (stages not written yet are skipped), and each accelerate config is a mapping
accelerate can read. Each run YAML's header says the command that runs it."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import yaml

from patchgap.config import read_yaml
from patchgap.stages import STAGES
from patchgap.stages.base import load_stage_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_YAMLS = sorted(CONFIGS.glob("*.yaml"))
ACCELERATE_YAMLS = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def _stage_module(name: str) -> object | None:
    if importlib.util.find_spec(f"patchgap.stages.{name}") is None:
        return None
    return importlib.import_module(f"patchgap.stages.{name}")


def test_there_are_configs_to_check() -> None:
    names = {p.name for p in RUN_YAMLS}
    assert {"demo.yaml", "paper.yaml"} <= names


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: p.name)
def test_run_yaml_header_says_how_to_run_it(path: Path) -> None:
    head = path.read_text(encoding="utf-8").splitlines()[:5]
    assert any(f"patchgap run --config configs/{path.name}" in line for line in head), (
        f"{path.name}: the header comment must say the command that runs it"
    )


@pytest.mark.parametrize(
    ("path", "stage"),
    [(p, s) for p in RUN_YAMLS for s in STAGES],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_stage_sections_validate(path: Path, stage: str) -> None:
    data = read_yaml(path)
    if stage not in data:
        pytest.skip(f"{path.name} has no {stage}: section")
    module = _stage_module(stage)
    if module is None:
        pytest.skip(f"patchgap.stages.{stage} does not exist yet")
    config = load_stage_config(module.Config, path, stage)  # type: ignore[attr-defined]
    assert config.model_dump()  # a validated, frozen config


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_configs_load(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert data.get("distributed_type") in {"DEEPSPEED", "FSDP", "MULTI_GPU", "NO"}
    if data["distributed_type"] == "DEEPSPEED":
        assert data["deepspeed_config"]["zero_stage"] in (1, 2, 3)
    from accelerate.commands.config.config_args import load_config_from_file

    load_config_from_file(str(path))  # what `accelerate launch --config_file` parses
