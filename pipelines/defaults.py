"""Default pipeline parameters: each stage's config section from configs/paper.yaml (validated,
dumped as the YAML string a component receives) and the GPU pool placement. Compiled pipelines
carry these as parameter defaults; ``patchgap run`` and ``patchgap submit`` override them."""

import importlib

from patchgap.config import read_yaml
from patchgap.settings import configs_dir
from patchgap.stages.base import config_json, section_config

PAPER_CONFIG = configs_dir() / "paper.yaml"

ACCELERATOR_TYPE = "nvidia.com/gpu"
NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def stage_yaml(section: str, raw: dict | None = None) -> str:
    """One stage's validated config as YAML text (shared top-level keys inherited)."""
    data = read_yaml(PAPER_CONFIG) if raw is None else raw
    module = importlib.import_module(f"patchgap.stages.{section}")
    source = f"{PAPER_CONFIG.name} [{section}]"
    return config_json(section_config(module.Config, data, section, source))
