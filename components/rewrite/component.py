"""KFP component of the rewrite stage: a thin wrapper around ``patchgap.stages.rewrite``.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from patchgap.kfp.images import image_for


@dsl.component(base_image=image_for("rewrite"), install_kfp_package=False)
def rewrite(
    config: str,
    dataset: Input[Dataset],
    candidates: Output[Dataset],
    metrics: Output[Metrics],
    adapter: Input[Model] | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
):
    """Generate candidate rewrites of one shard of ``dataset`` with pi0 (+ ``adapter``; without
    it, the prompt-only baseline). ``shard_index``/``num_shards`` override the config so a
    ParallelFor can fan out over GPUs."""
    from patchgap.stages.base import run_component

    run_component(
        "rewrite",
        config,
        {"dataset": dataset, "adapter": adapter},
        {"candidates": candidates},
        metrics,
        overrides=[f"shard_index={shard_index}", f"num_shards={num_shards}"],
    )
