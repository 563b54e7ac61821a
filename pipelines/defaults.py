"""Default pipeline parameters: each stage's config section from configs/paper.yaml (validated,
dumped as the YAML string a component receives) and the GPU pool placement. Compiled pipelines
carry these as parameter defaults; ``patchgap run`` and ``patchgap submit`` override them."""

import importlib
import json
from pathlib import Path

from patchgap.config import read_yaml, validate
from patchgap.stages.base import SHARED_KEYS

PAPER_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "paper.yaml"

ACCELERATOR_TYPE = "nvidia.com/gpu"
NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def stage_yaml(section: str, raw: dict | None = None) -> str:
    """One stage's validated config as YAML text (shared top-level keys inherited)."""
    data = read_yaml(PAPER_CONFIG) if raw is None else raw
    module = importlib.import_module(f"patchgap.stages.{section}")
    sub = dict(data.get(section) or {})
    for key in SHARED_KEYS:
        if key in data and key in module.Config.model_fields and key not in sub:
            sub[key] = data[key]
    cfg = validate(module.Config, sub, f"{PAPER_CONFIG.name} [{section}]")
    # One line of JSON (valid YAML): a multi-line default would break the comment header KFP
    # writes at the top of a compiled pipeline.
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
