"""KFP component of the study report: a thin wrapper around ``patchgap.reports.study``.

It runs on the evaluate image (the report needs scipy and matplotlib, which the ops image lacks)
and asks for no GPU. No ``from __future__ import annotations``: KFP reads these annotations at
runtime.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from patchgap.kfp.images import image_for


@dsl.component(base_image=image_for("evaluate"), install_kfp_package=False)
def study_report(
    study_config: str,
    evaluation: Input[Artifact],
    arms: Input[Dataset],
    gate_rl: Input[Dataset],
    study: Output[Artifact],
    study_md: Output[Markdown],
    gate_prompt: Input[Dataset] = None,
    rewriter_training: Input[Artifact] = None,
) -> dict:
    """The study's verdicts: from the evaluation's per-item files of every snapshot, the arms,
    both gates' D_R (with provenance) and the rewriter's per-step metrics, write study.json,
    study.md, frontiers.png and reward_curve.png into ``study``. Returns the flat figures
    (per hypothesis its figure, interval, p and verdict code; acceptance per rewriter): study.json
    itself can outgrow what a cluster passes between steps as a parameter."""
    import shutil
    from pathlib import Path

    from patchgap.config import safe_load_yaml
    from patchgap.logs import setup_logging

    # Deferred: the report imports scipy and matplotlib.
    from patchgap.reports.study import scalar_metrics, write_study

    setup_logging()
    gates = {"rl": Path(gate_rl.path)}
    if gate_prompt is not None:
        gates["prompt"] = Path(gate_prompt.path)
    metrics = None
    if rewriter_training is not None:
        candidate = Path(rewriter_training.path) / "metrics.jsonl"
        metrics = candidate if candidate.is_file() else None
    out = Path(study.path)
    out.mkdir(parents=True, exist_ok=True)
    result = write_study(
        Path(evaluation.path) / "items",
        Path(arms.path) / "arms.json",
        gates,
        metrics,
        out,
        safe_load_yaml(study_config, "study config") or {},
    )
    shutil.copyfile(out / "study.md", study_md.path)
    return scalar_metrics(result)
