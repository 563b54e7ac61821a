"""The scheduled ``watch`` pipeline: find dataset objects under an S3 prefix whose content hash
is not in the ledger, claim each one (so an overlapping run skips it), run rewrite -> gate on
it (ParallelFor), and record it in the ledger only after its gate step succeeded. Make it
recurring with ``patchgap schedule`` (KFP), or with cron or a systemd timer calling
``patchgap run`` (README, "Recurring runs on one machine").

With an ``adapter_uri`` the rewriter is pi0 + that adapter; with none (the default, empty) it is
pi0 with the fixed prompt, the prompt-only baseline. Both branches are in the one graph, so the
compiled pipeline and the local run (``build(local=True)``) are the same DAG; locally only the
Kubernetes placement is left out and the datasets run one after another.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl

from patchgap.components.gate.component import gate
from patchgap.components.ops.component import find_new_datasets, record_processed, stage_dataset
from patchgap.components.rewrite.component import rewrite
from patchgap.pipelines import defaults as d
from patchgap.pipelines.placement import placers

#: Datasets rewritten at once on the cluster (each holds GPUs for its rewrite and gate).
CLUSTER_PARALLELISM = 2


def rewrite_one(item, adapter, dataset_fields, ledger_uri, rewrite_config, gate_config, gpu, cpu):
    """One claimed dataset: stage it, rewrite it (with ``adapter``, or prompt-only when None),
    gate the candidates, and record it in the ledger only after the gate succeeded."""
    staged = stage_dataset(dataset_uri=item.uri, fields=dataset_fields)
    cpu(staged.set_display_name("stage dataset"), cache=False)
    wired = {"adapter": adapter} if adapter is not None else {}
    rw = rewrite(config=rewrite_config, dataset=staged.outputs["dataset"], **wired)
    # A dataset is rewritten once (the ledger says so); KFP caching would only hide reruns.
    gpu(rw.set_display_name("rewrite"), cache=False)
    gt = gate(
        config=gate_config,
        dataset=staged.outputs["dataset"],
        candidates=rw.outputs["candidates"],
    )
    gpu(gt.set_display_name("gate"), cache=False)
    rec = record_processed(
        ledger_uri=ledger_uri,
        item=item,
        staged_sha256=staged.outputs["sha256"],
        acceptance_rate=gt.outputs["Output"],
        pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )
    cpu(rec.set_display_name("record in ledger"), cache=False)


def build(local: bool = False):
    """The pipeline; ``local`` builds it for kfp.local (no Kubernetes placement, one dataset at
    a time: two CPU-bound rewrites on one small machine each run many times slower)."""
    parallelism = 1 if local else CLUSTER_PARALLELISM

    @dsl.pipeline(
        name="patchgap-watch",
        description="Rewrite every new dataset that lands under an S3 prefix, once.",
    )
    def watch(
        prefix_uri: str,
        adapter_uri: str = "",
        ledger_uri: str = "s3://patchgap/ledger/watch",
        max_datasets: int = 8,
        claim_hours: float = 24.0,
        dataset_fields: str = "auto",
        rewrite_config: str = d.paper_section("rewrite"),
        gate_config: str = d.paper_section("gate"),
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
        per_dataset = (dataset_fields, ledger_uri, rewrite_config, gate_config, gpu, cpu)

        found = find_new_datasets(
            prefix_uri=prefix_uri,
            ledger_uri=ledger_uri,
            max_datasets=max_datasets,
            claim_hours=claim_hours,
        )
        # The listing must look at the bucket every time.
        cpu(found.set_display_name("find new datasets"), cache=False)
        with dsl.If(adapter_uri != "", name="with-adapter"):
            adapter = dsl.importer(
                artifact_uri=adapter_uri, artifact_class=dsl.Model, reimport=False
            ).set_display_name("rewriter adapter")
            with dsl.ParallelFor(found.output, parallelism=parallelism) as item:
                rewrite_one(item, adapter.output, *per_dataset)
        with dsl.Else(name="prompt-only"):
            with dsl.ParallelFor(found.output, parallelism=parallelism) as item:
                rewrite_one(item, None, *per_dataset)

    return watch


PIPELINE = build()
