"""The scheduled ``watch`` pipeline: find dataset objects under an S3 prefix whose content hash
is not in the ledger, claim each one (so an overlapping run skips it), run rewrite -> gate on
it (ParallelFor), and record it in the ledger only after its gate step succeeded. Make it
recurring with ``patchgap schedule``.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from kfp import dsl

from patchgap.components.gate.component import gate
from patchgap.components.ops.component import find_new_datasets, record_processed, stage_dataset
from patchgap.components.rewrite.component import rewrite
from patchgap.pipelines import defaults as d
from patchgap.pipelines.placement import placers


def build(local: bool = False):
    """The pipeline; ``local`` builds it for kfp.local (no Kubernetes placement)."""

    @dsl.pipeline(
        name="patchgap-watch",
        description="Rewrite every new dataset that lands under an S3 prefix, once.",
    )
    def watch(
        prefix_uri: str,
        adapter_uri: str,
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

        found = find_new_datasets(
            prefix_uri=prefix_uri,
            ledger_uri=ledger_uri,
            max_datasets=max_datasets,
            claim_hours=claim_hours,
        )
        # The listing must look at the bucket every time.
        cpu(found.set_display_name("find new datasets"), cache=False)
        adapter = dsl.importer(
            artifact_uri=adapter_uri, artifact_class=dsl.Model, reimport=False
        ).set_display_name("rewriter adapter")
        with dsl.ParallelFor(found.output, parallelism=2) as item:
            staged = stage_dataset(dataset_uri=item.uri, fields=dataset_fields)
            cpu(staged.set_display_name("stage dataset"), cache=False)
            rw = rewrite(
                config=rewrite_config,
                dataset=staged.outputs["dataset"],
                adapter=adapter.output,
            )
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
            )
            cpu(rec.set_display_name("record in ledger"), cache=False)

    return watch


PIPELINE = build()
