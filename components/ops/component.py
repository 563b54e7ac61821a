"""CPU helper components: stage a dataset URI as a validated artifact, list shard indices, find
new datasets for the watch pipeline, and record a processed dataset in the ledger.

No ``from __future__ import annotations``: KFP reads these annotations at runtime.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from patchgap.kfp.images import image_for

OPS_IMAGE = image_for("ops")


@dsl.component(base_image=OPS_IMAGE, install_kfp_package=False)
def stage_dataset(
    dataset_uri: str,
    fields: str,
    dataset: Output[Dataset],
    rejects: Output[Dataset],
    metrics: Output[Metrics],
) -> NamedTuple("Counts", [("valid", int), ("rejected", int), ("sha256", str)]):
    """Read D from a path or s3:// URI through the data contract and write it as normalized
    records with a manifest; bad records go to ``rejects`` with line and reason. This is the one
    step that reads a user's data without a manifest. Fails before any GPU step when the file
    cannot be parsed at all. ``fields``: a preset name, ``auto``, or a FieldMap as JSON."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from patchgap.data.sources import DatasetSpec
    from patchgap.data.stream import load_records
    from patchgap.data.writers import write_records_jsonl
    from patchgap.storage.store import write_manifest

    out = Path(dataset.path)
    out.mkdir(parents=True, exist_ok=True)
    rej = Path(rejects.path)
    rej.mkdir(parents=True, exist_ok=True)
    # A pipeline parameter is a string: a FieldMap arrives as its JSON.
    field_map = json.loads(fields) if fields.lstrip().startswith("{") else (fields or "auto")
    spec = DatasetSpec(source=dataset_uri, fields=field_map)
    result = load_records(spec, rejects_path=rej / "rejects.jsonl", external=True)
    write_records_jsonl(result.records, out / "records.jsonl")
    # The staged copy of external data carries a manifest like every output of ours.
    write_manifest(out, {"source": dataset_uri, "fields": field_map})
    metrics.log_metric("records_read", float(result.counts.read))
    metrics.log_metric("records_valid", float(result.counts.valid))
    metrics.log_metric("records_rejected", float(result.counts.rejected_total))
    dataset.metadata["source"] = dataset_uri
    Counts = namedtuple("Counts", ["valid", "rejected", "sha256"])
    # sha256: of the bytes read here, which is what the ledger must record (the object may have
    # been replaced since it was listed).
    return Counts(result.counts.valid, result.counts.rejected_total, result.counts.sha256)


@dsl.component(base_image=OPS_IMAGE, install_kfp_package=False)
def shard_indices(num_shards: int) -> list[int]:
    """[0, 1, ..., num_shards-1] for the rewrite fan-out."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return list(range(num_shards))


@dsl.component(base_image=OPS_IMAGE, install_kfp_package=False)
def merge_shards(shards: Input[list[Dataset]], merged: Output[Dataset]) -> int:
    """Gather the rewrite shards' outputs into one folder (``shard-00000/`` ...), in order."""
    import shutil
    from pathlib import Path

    out = Path(merged.path)
    out.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        shutil.copytree(shard.path, out / f"shard-{i:05d}", dirs_exist_ok=True)
    return len(shards)


@dsl.component(base_image=OPS_IMAGE, install_kfp_package=False)
def find_new_datasets(
    prefix_uri: str, ledger_uri: str, max_datasets: int, claim_hours: float = 24.0
) -> list[dict]:
    """Dataset objects under ``prefix_uri`` whose content hash is not in the ledger yet, each
    claimed for this run (a conditional write with a lease of ``claim_hours``), so an
    overlapping run skips them."""
    from patchgap.data.ledger import Ledger, find_datasets
    from patchgap.storage.store import Store

    store = Store.from_env()
    ledger = Ledger(store, ledger_uri)
    found = find_datasets(store, prefix_uri, cache_uri=ledger.hash_cache_uri())
    claimed = ledger.claim_pending(found, claim_hours * 3600.0, limit=max_datasets)
    return [{"uri": o.uri, "sha256": o.sha256, "size": o.size} for o in claimed]


@dsl.component(base_image=OPS_IMAGE, install_kfp_package=False)
def record_processed(
    ledger_uri: str,
    item: dict,
    staged_sha256: str,
    acceptance_rate: float,
    pipeline_run: str = "",
) -> str:
    """Record one dataset as processed under the hash of the bytes that were staged, and let
    its claim go; runs only after its rewrite and gate succeeded. ``pipeline_run`` (the KFP run
    name; kfp.local appends the loop iteration) says which run's artifacts hold its D_R."""
    from patchgap.data.ledger import DatasetObject, Ledger
    from patchgap.storage.store import Store

    ledger = Ledger(Store.from_env(), ledger_uri)
    sha = staged_sha256 or item["sha256"]
    obj = DatasetObject(uri=item["uri"], sha256=sha, size=int(item["size"]))
    uri = ledger.record(
        obj,
        acceptance_rate=acceptance_rate,
        listed_sha256=item["sha256"],
        pipeline_run=pipeline_run,
    )
    ledger.release(item["sha256"])
    return uri


@dsl.component(base_image=OPS_IMAGE, install_kfp_package=False)
def build_arms(
    study_config: str,
    dataset: Input[Dataset],
    gate_rl: Input[Dataset],
    swap_pool: Input[Dataset],
    arms: Output[Dataset],
    gate_prompt: Input[Dataset] = None,
) -> list:
    """The study's training sets: one folder ``<arm>/data.jsonl`` per arm of ``study_config``
    (the ``study:`` section as JSON) built from D, the gates' D_R folders and the staged swap
    pool, and ``arms.json``. Returns the SFT jobs, ``[{arm, seed, epochs}]``, for the
    ``ParallelFor``."""
    from pathlib import Path

    from patchgap.config import safe_load_yaml, validate
    from patchgap.data.stream import load_records
    from patchgap.study.arms import build_arms as build
    from patchgap.study.config import StudySettings

    settings = validate(
        StudySettings, safe_load_yaml(study_config, "study config") or {}, "study config"
    )
    # The pool as staged by the pipeline; the spec's name stays in the messages.
    pool = load_records(Path(swap_pool.path)).records
    described = build(
        Path(dataset.path),
        Path(gate_rl.path),
        Path(gate_prompt.path) if gate_prompt is not None else None,
        pool,
        settings,
        Path(arms.path),
    )
    arms.metadata["arms"] = list(described["arms"])
    return described["jobs"]
