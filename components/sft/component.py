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
):
    """Fine-tune pi0 on D_R (or on D for the baseline) with the loss on the answer only; write
    the model (safetensors + tokenizer, LoRA merged) and the loss curve (JSON + PNG) into
    ``training``. Logs loss_first, loss_last, steps and resumed_from_step."""
    from patchgap.stages.base import run_component

    run_component(
        "sft", config, {"dataset": dataset}, {"model": model, "metrics": training}, metrics
    )
