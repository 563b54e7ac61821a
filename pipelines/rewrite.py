"""The ``rewrite`` pipeline: an existing rewriter adapter applied to a new dataset (stage D ->
rewrite over shards -> gate), with optional SFT on D and D_R plus evaluation.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl

from patchgap.components.evaluate.component import evaluate
from patchgap.components.ops.component import shard_indices, stage_dataset
from patchgap.components.sft.component import sft
from patchgap.kfp.images import image_for
from patchgap.pipelines import defaults as d
from patchgap.pipelines.full import rewrite_and_gate
from patchgap.pipelines.placement import placers


def build(local: bool = False):
    """The pipeline; ``local`` builds it for kfp.local (no Kubernetes placement)."""

    @dsl.pipeline(
        name="patchgap-rewrite",
        description="Apply a trained rewriter adapter to a dataset and build D_R; optionally "
        "fine-tune on D and D_R and evaluate.",
    )
    def rewrite_pipeline(
        dataset_uri: str,
        adapter_uri: str,
        dataset_fields: str = "auto",
        rewrite_config: str = d.paper_section("rewrite"),
        gate_config: str = d.paper_section("gate"),
        sft_config: str = d.paper_section("sft"),
        evaluate_config: str = d.paper_section("evaluate"),
        num_shards: int = 1,
        run_sft: bool = False,
        min_acceptance_rate: float = 0.0,
        accelerator_type: str = d.ACCELERATOR_TYPE,
        gpu_count: int = 1,
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

        staged = stage_dataset(dataset_uri=dataset_uri, fields=dataset_fields)
        cpu(staged.set_display_name("stage dataset"), cache=False)
        dataset = staged.outputs["dataset"]
        adapter = dsl.importer(
            artifact_uri=adapter_uri, artifact_class=dsl.Model, reimport=False
        ).set_display_name("rewriter adapter")
        shards = shard_indices(num_shards=num_shards)
        cpu(shards.set_display_name("shards"))
        gt = rewrite_and_gate(
            dataset,
            adapter.output,
            shards,
            num_shards,
            rewrite_config,
            gate_config,
            gpu,
            cpu,
            local,
        )
        with dsl.If(run_sft == True, name="sft-requested"):  # noqa: E712
            with dsl.If(gt.outputs["Output"] >= min_acceptance_rate, name="gate-accepted-enough"):
                # `nodes` above 1 in sft_config: a TrainJob placed as these say.
                nodes_at = {
                    "accelerator_type": accelerator_type,
                    "accelerator_count": gpu_count,
                    "node_selector": node_selector,
                    "tolerations": tolerations,
                }
                sft_at = {**nodes_at, "image": image_for("sft")}
                sft_d = sft(config=sft_config, dataset=dataset, **sft_at)
                gpu(sft_d.set_display_name("sft on D"), cache=True)
                sft_dr = sft(config=sft_config, dataset=gt.outputs["dataset_r"], **sft_at)
                gpu(sft_dr.set_display_name("sft on D_R"), cache=True)
                ev = evaluate(
                    config=evaluate_config,
                    sft_d=sft_d.outputs["model"],
                    sft_dr=sft_dr.outputs["model"],
                )
                gpu(ev.set_display_name("evaluate"), cache=True)

    return rewrite_pipeline


PIPELINE = build()
