"""The ``study`` pipeline: stage D -> train-rewriter -> rewrite + gate with the RL rewriter and
with the prompt-only one -> stage the swap pool -> build the arms -> one SFT per arm and seed
(ParallelFor, snapshots along each) -> evaluate every snapshot and pi0 -> the study report.

The training, rewrite and gate steps are those of the ``full`` pipeline with the same caching and
resume, so a study over a stored run's settings reuses its rewriter checkpoints and rewrites.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl

from patchgap.components.evaluate.component import evaluate
from patchgap.components.ops.component import build_arms, shard_indices, stage_dataset
from patchgap.components.sft.component import sft
from patchgap.components.study.component import study_report
from patchgap.components.train_rewriter.component import train_rewriter
from patchgap.kfp.images import image_for
from patchgap.pipelines import defaults as d
from patchgap.pipelines.full import rewrite_and_gate
from patchgap.pipelines.placement import placers


def build(local: bool = False):
    """The pipeline; ``local`` builds it for kfp.local (no Kubernetes placement, one SFT job
    at a time)."""

    @dsl.pipeline(
        name="patchgap-study",
        description="Does SFT on D_R forget less than SFT on D at matched gain? Seeds, snapshots, "
        "concentrated arms and a swap control, with pre-registered tests.",
    )
    def study(
        dataset_uri: str,
        swap_pool_uri: str,
        dataset_fields: str = "auto",
        swap_pool_fields: str = "auto",
        study_config: str = d.study_section(),
        train_rewriter_config: str = d.paper_section("train_rewriter"),
        rewrite_config: str = d.paper_section("rewrite"),
        gate_config: str = d.paper_section("gate"),
        sft_config: str = d.study_sft_section(),
        evaluate_config: str = d.paper_section("evaluate"),
        num_shards: int = 1,
        accelerator_type: str = d.ACCELERATOR_TYPE,
        gpu_count: int = 1,
        train_gpu_count: int = 1,
        node_selector: dict = d.NODE_SELECTOR,
        tolerations: list = d.TOLERATIONS,
    ):
        gpu, cpu = placers(
            local=local,
            accelerator_type=accelerator_type,
            gpu_count=gpu_count,
            node_selector=node_selector,
            tolerations=tolerations,
        )
        # The content behind a URI can change under the same name: never cached.
        staged = stage_dataset(dataset_uri=dataset_uri, fields=dataset_fields)
        cpu(staged.set_display_name("stage dataset"), cache=False)
        dataset = staged.outputs["dataset"]

        nodes_at = {
            "accelerator_type": accelerator_type,
            "accelerator_count": train_gpu_count,
            "node_selector": node_selector,
            "tolerations": tolerations,
        }
        trained = train_rewriter(
            config=train_rewriter_config,
            dataset=dataset,
            image=image_for("train_rewriter"),
            **nodes_at,
        )
        gpu(trained.set_display_name("train rewriter"), cache=True, count=train_gpu_count)

        shards = shard_indices(num_shards=num_shards)
        cpu(shards.set_display_name("shards"))
        gate_args = (shards, num_shards, rewrite_config, gate_config, gpu, cpu, local)
        gt_rl = rewrite_and_gate(dataset, trained.outputs["adapter"], *gate_args)
        gt_p = rewrite_and_gate(dataset, None, *gate_args)

        pool = stage_dataset(dataset_uri=swap_pool_uri, fields=swap_pool_fields)
        cpu(pool.set_display_name("stage swap pool"), cache=False)

        arms = build_arms(
            study_config=study_config,
            dataset=dataset,
            gate_rl=gt_rl.outputs["dataset_r"],
            gate_prompt=gt_p.outputs["dataset_r"],
            swap_pool=pool.outputs["dataset"],
        )
        cpu(arms.set_display_name("build arms"))

        # Locally one job at a time: two CPU trainings on one small machine each run many
        # times slower than alone (as the rewrite shards).
        with dsl.ParallelFor(arms.outputs["Output"], parallelism=1 if local else 0) as job:
            trained_arm = sft(
                config=sft_config,
                dataset=arms.outputs["arms"],
                subset=job.arm,
                seed=job.seed,
                epochs=job.epochs,
                label=job.arm,
                image=image_for("sft"),
                **nodes_at,
            )
            gpu(trained_arm.set_display_name("sft job"), cache=True, count=train_gpu_count)

        ev = evaluate(config=evaluate_config, models=dsl.Collected(trained_arm.outputs["model"]))
        gpu(ev.set_display_name("evaluate snapshots"), cache=True)

        report = study_report(
            study_config=study_config,
            evaluation=ev.outputs["report"],
            arms=arms.outputs["arms"],
            gate_rl=gt_rl.outputs["dataset_r"],
            gate_prompt=gt_p.outputs["dataset_r"],
            rewriter_training=trained.outputs["training"],
        )
        cpu(report.set_display_name("study report"))

    return study


PIPELINE = build()
