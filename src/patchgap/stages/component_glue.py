"""The few lines every KFP component body shares: build the stage config from the component's
parameters, call the stage's ``run`` on the artifact paths, log the metrics. Imports no kfp:
artifacts are duck-typed (``.path``, ``.metadata``, ``log_metric``)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from patchgap.config import apply_overrides, safe_load_yaml, validate
from patchgap.stages.base import with_store_state


def run_component(
    stage_name: str,
    config_yaml: str,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    metrics: Any | None = None,
    overrides: list[str] | None = None,
) -> dict[str, float]:
    """Run stage ``stage_name`` inside a KFP component.

    ``config_yaml`` is the stage section as YAML text (what the pipeline passes as a parameter);
    ``inputs``/``outputs`` map stage input/output names to KFP artifacts (``None`` for an optional
    input not wired). Output folders are created at the artifacts' paths.
    """
    from patchgap.logs import setup_logging

    setup_logging()
    stage = importlib.import_module(f"patchgap.stages.{stage_name}")
    data = safe_load_yaml(config_yaml, f"component {stage_name} config") or {}
    config = validate(stage.Config, apply_overrides(data, overrides), f"component {stage_name}")
    # The launcher passes the same output URIs to a retried pod: state beside them survives.
    uris = {n: str(getattr(a, "uri", "")) for n, a in outputs.items()}
    config = with_store_state(config, stage, uris)
    local_in = {n: Path(a.path) for n, a in inputs.items() if a is not None}
    local_out = {}
    for n, art in outputs.items():
        p = Path(art.path)
        p.mkdir(parents=True, exist_ok=True)
        local_out[n] = p
    result = stage.run(config, local_in, local_out)
    if metrics is not None:
        for key, value in sorted(result.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(float(value)):
                    metrics.log_metric(key, float(value))
    for art in outputs.values():
        if hasattr(art, "metadata"):
            art.metadata["stage"] = stage_name
    return result
