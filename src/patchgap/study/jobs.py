"""One SFT job of the study as its component runs it: the config with the job's seed and epochs,
the arm's folder of the arms artifact as the dataset, and the label written beside the trained
model (``study.json``) from which the evaluation names every snapshot
``<arm>.s<seed>.step<N>``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from patchgap.config import safe_load_yaml
from patchgap.errors import ConfigError, DataError
from patchgap.fsutil import write_text_atomic

#: Beside a study job's model: {"arm", "seed", "steps", "final_step"}.
STUDY_JSON = "study.json"
#: What sft writes into its metrics output (patchgap.stages.sft.SUMMARY_JSON).
SUMMARY_JSON = "summary.json"
#: Where sft keeps the snapshots inside the model folder (patchgap.training.snapshots).
SNAPSHOTS_DIR = "snapshots"


def job_config(config: str, *, seed: int = -1, epochs: float = 0.0) -> str:
    """The sft section (YAML or JSON text) with ``seed`` (when >= 0) and ``num_epochs`` (when
    > 0) set, as one line of JSON."""
    data = _mapping(config)
    if seed >= 0:
        data["seed"] = seed
    if epochs > 0:
        data["num_epochs"] = epochs
    return json.dumps(data, sort_keys=True)


def _mapping(config: str) -> dict[str, Any]:
    """The sft section's text as a mapping: JSON as JSON (YAML 1.1 would read ``2e-05`` as a
    string), anything else as YAML."""
    text = config.strip()
    try:
        data = json.loads(text) if text.startswith("{") else safe_load_yaml(text, "sft config")
    except ValueError as err:
        raise ConfigError(f"sft config: not JSON ({err})") from None
    if not isinstance(data or {}, dict):
        raise ConfigError("sft config: must be a mapping")
    return dict(data or {})


class _Subset:
    """An input artifact's subfolder, duck-typed as the artifact (``path``, ``uri``)."""

    def __init__(self, art: Any, subset: str) -> None:
        self.path = str(Path(art.path) / subset)
        self.uri = str(getattr(art, "uri", "")).rstrip("/") + "/" + subset
        self.metadata = dict(getattr(art, "metadata", {}) or {})


def subset_artifact(art: Any, subset: str) -> Any:
    """``art`` itself, or its folder ``subset`` (an arm of the arms artifact)."""
    if not subset:
        return art
    if "/" in subset or subset.startswith(".") or not (Path(art.path) / subset).is_dir():
        raise ConfigError(f"sft subset {subset!r}: no such folder in {art.path}")
    return _Subset(art, subset)


def write_job_label(model_dir: str | Path, metrics_dir: str | Path, arm: str, config: str) -> dict:
    """``<model>/study.json``: the arm, the seed and the steps that have a model (every snapshot
    and the final step), read from the run's summary."""
    summary_path = Path(metrics_dir) / SUMMARY_JSON
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{summary_path}: no sft summary to label ({err})") from None
    final = int(summary["steps"])
    steps = [int(s) for s in summary.get("snapshot_steps") or []] or [final]
    data = _mapping(config)
    label = {"arm": arm, "seed": int(data.get("seed", 0)), "steps": steps, "final_step": final}
    write_text_atomic(Path(model_dir) / STUDY_JSON, json.dumps(label, indent=2) + "\n")
    return label


def snapshot_label(arm: str, seed: int, step: int) -> str:
    return f"{arm}.s{seed}.step{step}"


def model_labels(model_dir: str | Path) -> dict[str, Path]:
    """Label -> model folder for every step of a study job's model (the final step is the model
    folder itself); a model without ``study.json`` is refused (it is not a study job's)."""
    folder = Path(model_dir)
    path = folder / STUDY_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a study job's model ({err})") from None
    out: dict[str, Path] = {}
    for step in info["steps"]:
        where = folder if step == info["final_step"] else folder / SNAPSHOTS_DIR / f"step-{step}"
        if not (where / "config.json").is_file():
            raise DataError(f"{where}: the snapshot of step {step} is missing")
        out[snapshot_label(info["arm"], info["seed"], step)] = where
    return out
