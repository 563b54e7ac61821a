"""KFP component of the train-rewriter stage: a thin wrapper around
``patchgap.stages.train_rewriter``.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from patchgap.kfp.images import image_for


@dsl.component(base_image=image_for("train_rewriter"), install_kfp_package=False)
def train_rewriter(
    config: str,
    adapter: Output[Model],
    training: Output[Artifact],
    metrics: Output[Metrics],
    curves: Output[HTML],
    dataset: Input[Dataset] = None,
    base_model: Input[Model] = None,
    image: str = "",
    accelerator_type: str = "nvidia.com/gpu",
    accelerator_count: int = 1,
    node_selector: dict = None,
    tolerations: list = None,
):
    """Train the rewriter (a LoRA patch on frozen pi0) with GRPO and the gated group reward.
    Writes the adapter (safetensors, optionally merged weights), the per-step metrics
    (``metrics.jsonl``, ``summary.json``, ``reward_curves.png``) and logs reward_first,
    reward_last, r_task_last, seconds_per_step_mean, reward_share_mean and resumed_from_step.
    Without ``dataset`` / ``base_model`` the config's dataset spec and ``model`` are used. With
    ``nodes`` above 1 in the config the stage runs as a Kubeflow Trainer TrainJob on that many
    nodes (``image``, which the pipelines set to this image, and the placement parameters
    describe each node) and this step follows it."""
    import base64
    from pathlib import Path

    from patchgap.kfp.trainjob import run_training_step

    run_training_step(
        "train_rewriter",
        config,
        {"dataset": dataset, "model": base_model},
        {"adapter": adapter, "metrics": training},
        metrics,
        image=image,
        accelerator_type=accelerator_type,
        accelerator_count=accelerator_count,
        node_selector=node_selector,
        tolerations=tolerations,
    )
    # The KFP UI renders an HTML artifact inline: the reward curves as an embedded PNG.
    png = Path(training.path) / "reward_curves.png"
    body = "<p>no reward curves were written</p>"
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        body = f'<img alt="reward curves" src="data:image/png;base64,{data}">'
    Path(curves.path).write_text(
        f"<html><body><h3>rewriter training: reward per GRPO step</h3>{body}</body></html>"
    )
