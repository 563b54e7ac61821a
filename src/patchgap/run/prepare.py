"""Prepare the main job (``patchgap run`` / ``patchgap demo``): read and validate a run YAML,
start the embedded S3 when asked, stage the dataset in the store and resolve the model, so that
:mod:`patchgap.run.execute` only has to run the pipeline. The commands run the preflight of
:mod:`patchgap.run.preflight` first (its ``check_and_prepare``), which checks every input
before anything here starts or writes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from patchgap.config import StrictModel, read_yaml, validate
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.data.writers import write_records_jsonl
from patchgap.errors import ConfigError
from patchgap.lm.models import known_model, prepare_smollm2, resolve_model
from patchgap.names import check_bucket, check_key, check_s3_uri
from patchgap.stages.base import validate_run_yaml
from patchgap.storage.server import EmbeddedS3
from patchgap.storage.store import Store
from patchgap.study.config import StudySettings

Say = Callable[[str], None]


class RunSettings(StrictModel):
    """The ``run:`` section of a run YAML: what to process and where results go."""

    pipeline: Literal["full", "rewrite", "watch", "study"] = Field(
        "full", description="which pipeline to run"
    )
    bucket: str = Field("patchgap", description="S3 bucket for datasets, artifacts and runs")
    dataset: dict[str, Any] | None = Field(
        None,
        description="full, rewrite and study pipelines: the downstream dataset D, a "
        "patchgap.data.sources DatasetSpec mapping (the watch pipeline finds its own)",
    )
    dataset_key: str | None = Field(
        None, description="object key D is staged under (default datasets/<name>.jsonl)"
    )
    num_shards: int = Field(1, ge=1, description="rewrite shards (ParallelFor fan-out)")
    min_acceptance_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="skip SFT when the gate accepts less than this"
    )
    prompt_only_baseline: bool = Field(
        False, description="also rewrite with pi0 and the fixed prompt (no RL), as a 4th row"
    )
    adapter_uri: str | None = Field(
        None,
        description="rewrite pipeline: an existing rewriter adapter (s3:// or path); watch "
        "pipeline: the same, or none for the prompt-only rewriter",
    )
    runner: Literal["subprocess", "docker"] = Field("subprocess", description="kfp.local runner")
    publish_weights: bool = Field(
        True,
        description="publish the model weights (*.safetensors) among the run's artifacts; false "
        "keeps them in the local work folder only (a study's dozens of SFT snapshots would "
        "double its disk use); the run manifest counts what was left out",
    )
    # The watch pipeline: every dataset object that lands under `prefix`, once.
    prefix: str | None = Field(
        None, description="watch pipeline: the s3://<bucket>/... prefix new datasets land under"
    )
    ledger_uri: str | None = Field(
        None,
        description="watch pipeline: the ledger of processed datasets "
        "(default s3://<bucket>/ledger/watch)",
    )
    max_datasets: int = Field(8, ge=1, description="watch pipeline: new datasets taken per run")
    claim_hours: float = Field(
        24.0,
        gt=0,
        description="watch pipeline: how long a run's claim on a dataset lasts; a run that dies "
        "holding one frees the dataset for a later run after this",
    )
    dataset_fields: str | dict[str, Any] = Field(
        "auto", description="watch pipeline: field preset or FieldMap of the datasets found"
    )

    @field_validator("bucket", "dataset_key", "prefix")
    @classmethod
    def _identifiers_match_in_full(cls, value: str | None, info: Any) -> str | None:
        # A bucket with '/', a key with '..' or a trailing newline would address another
        # object than the one the user meant: refused here, with the rule, before anything runs.
        if value is None:
            return value
        try:
            if info.field_name == "bucket":
                return check_bucket(value, "")
            if info.field_name == "dataset_key":
                return check_key(value, "")
            return check_s3_uri(value, "", folder=True)
        except ConfigError as err:
            raise ValueError(str(err).strip()) from None


@dataclass
class PreparedRun:
    config_path: Path
    raw: dict[str, Any]
    settings: RunSettings
    run_id: str
    dataset_uri: str
    model_path: str
    dataset_counts: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    #: The study pipeline: its settings and the staged swap pool.
    study: StudySettings | None = None
    swap_pool_uri: str = ""


def load_run_settings(path: Path) -> tuple[dict[str, Any], RunSettings]:
    """Read and validate the whole run YAML (every section, the dataset spec), before anything
    is started, staged or downloaded."""
    raw = read_yaml(path)
    if "run" not in raw:
        raise ConfigError(f"{path}: missing the `run:` section (dataset, bucket, pipeline)")
    settings = validate(RunSettings, raw["run"] or {}, f"{path} [run]")
    if settings.pipeline == "rewrite" and not settings.adapter_uri:
        raise ConfigError(f"{path} [run]: adapter_uri is required for the rewrite pipeline")
    validate_run_yaml(raw, str(path))
    if settings.pipeline == "watch":
        check_watch_settings(settings, str(path))
        return raw, settings
    if settings.dataset is None:
        raise ConfigError(f"{path} [run]: dataset is required for the {settings.pipeline} pipeline")
    validate(DatasetSpec, settings.dataset, f"{path} [run.dataset]")
    if settings.pipeline == "study" or "study" in raw:
        study_settings(raw, path)
    return raw, settings


def study_settings(raw: dict[str, Any], path: Path | str) -> StudySettings:
    """The ``study:`` section, validated (the defaults when absent)."""
    return validate(StudySettings, raw.get("study") or {}, f"{path} [study]")


def check_watch_settings(settings: RunSettings, source: str) -> None:
    """The watch pipeline reads no D of its own: it needs an s3:// prefix in the run's bucket
    (where the run's credentials and the embedded S3 reach) and a valid field map."""
    where = f"{source} [run]"
    if settings.dataset is not None:
        raise ConfigError(
            f"{where}: dataset: not used by the watch pipeline, which finds its datasets under "
            "prefix; remove it"
        )
    prefix = settings.prefix or ""
    if not prefix.startswith(f"s3://{settings.bucket}/") or prefix.rstrip("/").count("/") < 3:
        raise ConfigError(
            f"{where}: prefix: {prefix or '(missing)'} must be a folder in the run's bucket, "
            f"e.g. s3://{settings.bucket}/incoming/"
        )
    if settings.ledger_uri is not None and not settings.ledger_uri.startswith("s3://"):
        raise ConfigError(f"{where}: ledger_uri: {settings.ledger_uri} is not an s3:// URI")
    validate(
        DatasetSpec,
        {"source": prefix, "fields": settings.dataset_fields},
        f"{where} dataset_fields",
    )


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def prepare_run(
    config_path: Path, *, start_embedded_s3: bool = True, hub_here: bool = True, say: Say = print
) -> PreparedRun:
    """Start (or reuse) the embedded S3, validate and stage D, and prepare pi0. ``hub_here``
    False keeps a hub id or ``s3://`` pi0 as it is, for steps that resolve it themselves (pods)."""
    import os

    raw, settings = load_run_settings(config_path)
    if start_embedded_s3 and not os.environ.get("AWS_ENDPOINT_URL_S3"):
        server = EmbeddedS3(bucket=settings.bucket)
        status = server.start()
        os.environ.update(server.env())
        say(f"S3: embedded SeaweedFS at {server.endpoint} (pid {status.pid}); {server.env_file}")
    store = Store.from_env()
    store.ensure_bucket(settings.bucket)

    if settings.pipeline == "watch":
        # No D to stage: each run finds its datasets under the prefix.
        dataset_uri, counts = str(settings.prefix).rstrip("/") + "/", {}
        say(f"datasets: new ones under {dataset_uri}")
    else:
        dataset_uri, counts = stage_dataset(config_path, settings, store, say)
    study, swap_pool_uri = None, ""
    if settings.pipeline == "study":
        study = study_settings(raw, config_path)
        pool = study.swap_pool.model_dump(mode="json", exclude_defaults=True)
        swap_pool_uri, _ = stage_dataset(
            config_path, settings, store, say, spec=pool, what="study.swap_pool"
        )
    model = str(raw.get("model", "smollm2"))
    if not hub_here and not Path(model).expanduser().is_dir() and known_model(model) is None:
        model_path = model
    elif model.lower() in ("smollm2", "smollm2-135m-instruct"):
        model_path = str(prepare_smollm2())
    else:
        model_path = str(resolve_model(model))
    say(f"model: {model} -> {model_path}")
    run_id = new_run_id()
    say(f"run id: {run_id}; results will be under s3://{settings.bucket}/runs/{run_id}/")
    return PreparedRun(
        config_path=Path(config_path),
        raw=raw,
        settings=settings,
        run_id=run_id,
        dataset_uri=dataset_uri,
        model_path=model_path,
        dataset_counts=counts,
        env={k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PATCHGAP_"))},
        study=study,
        swap_pool_uri=swap_pool_uri,
    )


def stage_dataset(
    config_path: Path,
    settings: RunSettings,
    store: Any,
    say: Say = print,
    *,
    spec: dict[str, Any] | None = None,
    what: str = "run.dataset",
) -> tuple[str, dict[str, int]]:
    """Read D (or ``spec``, the config's ``what``) through its field map and put the selected
    records (and any rejects beside them) in the store; returns its URI and its counts."""
    import tempfile

    given = settings.dataset if spec is None else spec
    spec = validate(DatasetSpec, given, f"{config_path} [{what}]")
    with tempfile.TemporaryDirectory(prefix="patchgap-stage-") as tmp:
        rejects = Path(tmp) / "rejects.jsonl"
        result = load_records(spec, rejects_path=rejects, external=True)
        counts = {
            "read": result.counts.read,
            "valid": result.counts.valid,
            "selected": len(result.records),
            "rejected": result.counts.rejected_total,
        }
        if not result.records:
            raise ConfigError(f"{config_path}: dataset {spec.source} has no valid records")
        name = f"datasets/{_slug(spec.source)}-{len(result.records)}.jsonl"
        if what == "run.dataset" and settings.dataset_key:
            name = settings.dataset_key
        local = Path(tmp) / "dataset.jsonl"
        write_records_jsonl(result.records, local)
        dataset_uri = f"s3://{settings.bucket}/{name}"
        store.put_file(local, dataset_uri)
        if result.counts.rejected_total:
            store.put_file(rejects, dataset_uri + ".rejects.jsonl")
    say(
        f"{'dataset' if what == 'run.dataset' else what}: {spec.source} -> {dataset_uri} "
        f"({counts['selected']} selected; {counts['valid']} valid of {counts['read']} read, "
        f"{counts['rejected']} rejected)"
    )
    return dataset_uri, counts


def _slug(text: str) -> str:
    keep = [c if c.isalnum() or c in "-_" else "-" for c in text.rsplit("/", 1)[-1]]
    return "".join(keep).strip("-").lower() or "dataset"
