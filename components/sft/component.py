"""KFP component of the sft stage: a thin wrapper around ``patchgap.stages.sft``.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from patchgap.kfp.images import image_for


@dsl.component(base_image=image_for("sft"), install_kfp_package=False)
def sft(
    config: str,
    dataset: Input[Dataset],
    model: Output[Model],
    training: Output[Dataset],
    metrics: Output[Metrics],
    image: str = "",
    accelerator_type: str = "nvidia.com/gpu",
    accelerator_count: int = 1,
    node_selector: dict = None,
    tolerations: list = None,
    subset: str = "",
    seed: int = -1,
    epochs: float = 0.0,
    label: str = "",
):
    """Fine-tune pi0 on D_R (or on D for the baseline) with the loss on the answer only; write
    the model (safetensors + tokenizer, LoRA merged) and the loss curve (JSON + PNG) into
    ``training``. Logs loss_first, loss_last, steps and resumed_from_step. With ``nodes`` above 1
    in the config the stage runs as a Kubeflow Trainer TrainJob on that many nodes (``image``,
    which the pipelines set to this image, and the placement parameters describe each node) and
    this step follows it.

    The study sets the rest: ``subset`` trains on that folder of the dataset (an arm),
    ``seed`` (>= 0) and ``epochs`` (> 0) override the config's, and ``label`` (the arm) goes
    with the seed and the snapshot steps into ``<model>/study.json`` for the evaluation."""
    from patchgap.kfp.trainjob import run_training_step
    from patchgap.study.jobs import job_config, subset_artifact, write_job_label

    config = job_config(config, seed=seed, epochs=epochs)
    data = subset_artifact(dataset, subset)

    run_training_step(
        "sft",
        config,
        {"dataset": data},
        {"model": model, "metrics": training},
        metrics,
        image=image,
        accelerator_type=accelerator_type,
        accelerator_count=accelerator_count,
        node_selector=node_selector,
        tolerations=tolerations,
    )
    if label:
        write_job_label(model.path, training.path, label, config)
