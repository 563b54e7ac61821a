"""The ``full`` pipeline: stage D -> train-rewriter -> rewrite (ParallelFor over shards) ->
gate -> SFT on D_R and SFT on D -> evaluate (base, SFT on D, SFT on D_R), optionally with the
prompt-only rewriting baseline as a fourth model. SFT and evaluation are skipped when the gate
accepts less than ``min_acceptance_rate`` of the records.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl

from patchgap.components.evaluate.component import evaluate
from patchgap.components.gate.component import gate
from patchgap.components.ops.component import merge_shards, shard_indices, stage_dataset
from patchgap.components.rewrite.component import rewrite
from patchgap.components.sft.component import sft
from patchgap.components.train_rewriter.component import train_rewriter
from patchgap.kfp.images import image_for
from patchgap.pipelines import defaults as d
from patchgap.pipelines.placement import placers


def rewrite_and_gate(
    dataset,
    adapter,
    shards,
    num_shards,
    rewrite_config: str,
    gate_config: str,
    gpu,
    cpu,
    local: bool = False,
):
    """Fan the rewrite out over shards, merge the shard outputs, gate them.

    Locally the shards run one after another: two CPU-bound shards on one small machine
    oversubscribe its cores and each runs many times slower than alone."""
    # Without an adapter the rewriter is pi0 with the fixed prompt: the prompt-only baseline.
    wired = {"adapter": adapter} if adapter is not None else {}
    with dsl.ParallelFor(shards.output, parallelism=1 if local else 0) as shard:
        rw = rewrite(
            config=rewrite_config,
            dataset=dataset,
            shard_index=shard,
            num_shards=num_shards,
            **wired,
        ).set_display_name("rewrite shard")
        gpu(rw, cache=True)
    merged = merge_shards(shards=dsl.Collected(rw.outputs["candidates"]))
    cpu(merged.set_display_name("merge shards"))
    gt = gate(
        config=gate_config,
        dataset=dataset,
        candidates=merged.outputs["merged"],
    )
    gpu(gt, cache=True)
    return gt


def build(local: bool = False):
    """The pipeline; ``local`` builds it for kfp.local (no Kubernetes placement)."""

    @dsl.pipeline(
        name="patchgap-full",
        description="Train the RL rewriter, build D_R with Generate-Verify-Fallback, fine-tune on "
        "D and D_R, and measure downstream gain and forgetting.",
    )
    def full(
        dataset_uri: str,
        dataset_fields: str = "auto",
        train_rewriter_config: str = d.paper_section("train_rewriter"),
        rewrite_config: str = d.paper_section("rewrite"),
        gate_config: str = d.paper_section("gate"),
        sft_config: str = d.paper_section("sft"),
        evaluate_config: str = d.paper_section("evaluate"),
        num_shards: int = 1,
        min_acceptance_rate: float = 0.0,
        prompt_only_baseline: bool = False,
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

        # The dataset URI's content can change under the same name: never cached.
        staged = stage_dataset(dataset_uri=dataset_uri, fields=dataset_fields)
        cpu(staged.set_display_name("stage dataset"), cache=False)
        dataset = staged.outputs["dataset"]

        # A training step with `nodes` above 1 in its config runs as a TrainJob placed as the
        # single-pod step would be (patchgap.kfp.trainjob); these say where.
        nodes_at = {
            "accelerator_type": accelerator_type,
            "accelerator_count": train_gpu_count,
            "node_selector": node_selector,
            "tolerations": tolerations,
        }
        sft_at = {**nodes_at, "image": image_for("sft")}
        trained = train_rewriter(
            config=train_rewriter_config,
            dataset=dataset,
            image=image_for("train_rewriter"),
            **nodes_at,
        )
        gpu(trained.set_display_name("train rewriter"), cache=True, count=train_gpu_count)

        shards = shard_indices(num_shards=num_shards)
        cpu(shards.set_display_name("shards"))
        gt = rewrite_and_gate(
            dataset,
            trained.outputs["adapter"],
            shards,
            num_shards,
            rewrite_config,
            gate_config,
            gpu,
            cpu,
            local,
        )

        # Baseline: the same SFT on the original D (runs whatever the gate decides).
        sft_d = sft(config=sft_config, dataset=dataset, **sft_at).set_display_name("sft on D")
        gpu(sft_d, cache=True, count=train_gpu_count)

        with dsl.If(gt.outputs["Output"] >= min_acceptance_rate, name="gate-accepted-enough"):
            sft_dr = sft(config=sft_config, dataset=gt.outputs["dataset_r"], **sft_at)
            gpu(sft_dr.set_display_name("sft on D_R"), cache=True, count=train_gpu_count)

            with dsl.If(prompt_only_baseline == True, name="with-prompt-only-baseline"):  # noqa: E712
                gt_p = rewrite_and_gate(
                    dataset, None, shards, num_shards, rewrite_config, gate_config, gpu, cpu, local
                )
                sft_p = sft(config=sft_config, dataset=gt_p.outputs["dataset_r"], **sft_at)
                gpu(
                    sft_p.set_display_name("sft on D_R (prompt-only)"),
                    cache=True,
                    count=train_gpu_count,
                )
                ev4 = evaluate(
                    config=evaluate_config,
                    sft_d=sft_d.outputs["model"],
                    sft_dr=sft_dr.outputs["model"],
                    sft_dr_prompt=sft_p.outputs["model"],
                )
                gpu(ev4.set_display_name("evaluate (4 models)"), cache=True)
            with dsl.Else(name="rl-rewriter-only"):
                ev3 = evaluate(
                    config=evaluate_config,
                    sft_d=sft_d.outputs["model"],
                    sft_dr=sft_dr.outputs["model"],
                )
                gpu(ev3.set_display_name("evaluate"), cache=True)

    return full


PIPELINE = build()
