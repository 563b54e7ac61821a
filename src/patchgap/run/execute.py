"""Run a pipeline on this machine with ``kfp.local`` and publish the run to S3.

The subprocess runner (the embedded default) executes each component in this Python environment;
the Docker runner executes the stage images (:mod:`patchgap.run.containers`: checks first, pi0
through S3, GPUs requested when present, podman through ``DOCKER_HOST``). Afterwards every
artifact of the local pipeline root is uploaded to ``s3://<bucket>/runs/<run-id>/artifacts/`` and
a run manifest (git commit, package versions, configs, input hashes, timings) to
``s3://<bucket>/runs/<run-id>/run.json``; a ``watch`` run's manifest also says which datasets it
claimed, rewrote, gated and recorded in the ledger.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from patchgap.data.ledger import content_sha256
from patchgap.errors import ConfigError, PatchgapError
from patchgap.fsutil import write_text_atomic
from patchgap.reports.evaluation import render_text
from patchgap.run.containers import prepare_docker
from patchgap.run.prepare import PreparedRun, RunSettings, Say
from patchgap.settings import home_dir
from patchgap.stages import STAGES
from patchgap.stages.base import config_json, environment_info, section_json
from patchgap.storage.store import Store, fetch_to_local
from patchgap.study.config import StudySettings

#: The stage sections each pipeline passes to its components.
PIPELINE_SECTIONS = {
    "full": STAGES,
    "rewrite": tuple(s for s in STAGES if s != "train_rewriter"),
    "watch": ("rewrite", "gate"),
    "study": STAGES,
}


def ledger_uri(settings: RunSettings) -> str:
    """The watch pipeline's ledger: ``run.ledger_uri``, else ``s3://<bucket>/ledger/watch``."""
    return settings.ledger_uri or f"s3://{settings.bucket}/ledger/watch"


def pipeline_arguments(prepared: PreparedRun) -> dict[str, Any]:
    s = prepared.settings
    args: dict[str, Any] = {}
    if s.pipeline == "watch":
        fields = s.dataset_fields
        args.update(
            prefix_uri=prepared.dataset_uri.rstrip("/") + "/",
            # Empty: no adapter, the prompt-only rewriter (pi0 with the fixed prompt).
            adapter_uri=s.adapter_uri or "",
            ledger_uri=ledger_uri(s),
            max_datasets=s.max_datasets,
            claim_hours=s.claim_hours,
            dataset_fields=fields if isinstance(fields, str) else json.dumps(fields),
        )
    elif s.pipeline == "study":
        study = prepared.study or StudySettings()
        args.update(
            dataset_uri=prepared.dataset_uri,
            swap_pool_uri=prepared.swap_pool_uri,
            num_shards=s.num_shards,
            study_config=config_json(study),
        )
    else:
        args.update(
            dataset_uri=prepared.dataset_uri,
            num_shards=s.num_shards,
            min_acceptance_rate=s.min_acceptance_rate,
        )
    for section in PIPELINE_SECTIONS[s.pipeline]:
        # Every stage declares pi0 as `model`: the prepared local folder, so no stage ever
        # resolves a hub name.
        overrides = [f"model={prepared.model_path}"]
        if s.pipeline == "study" and section == "sft":
            # Every job is evaluated at the study's snapshots.
            overrides.append(f"snapshots={(prepared.study or StudySettings()).snapshots}")
        args[f"{section}_config"] = section_json(prepared.raw, section, f"[{section}]", overrides)
    if s.pipeline == "full":
        args["prompt_only_baseline"] = s.prompt_only_baseline
    if s.pipeline == "rewrite":
        if not s.adapter_uri:
            raise PatchgapError("run.adapter_uri is required for the rewrite pipeline")
        args["adapter_uri"] = s.adapter_uri
    return args


def local_adapter(
    prepared: PreparedRun, args: dict[str, Any], pipeline_root: Path, say: Say
) -> None:
    """Point ``adapter_uri`` at a copy of the adapter under the pipeline root.

    kfp.local runs ``dsl.importer`` but downloads nothing: an ``s3://`` artifact reaches the
    next step as the path ``/s3/<bucket>/<key>``, which only KFP's launcher on a cluster fills
    in. A folder inside the pipeline root is seen by both runners (the Docker runner mounts the
    root at the same path, and no other host folder), so the importer, and the graph, stay as
    the cluster runs them; the published run then holds the adapter it used.
    """
    uri = args.get("adapter_uri") or ""
    if not uri:
        return
    where = f"{prepared.config_path} [run]: adapter_uri: {uri}"
    inputs = pipeline_root / "inputs"
    try:
        # external: an adapter inside a published run has no manifest of its own (the run's
        # artifacts have one), and a cluster's importer reads it as it is too.
        local = Path(fetch_to_local(uri, inputs, external=True))
    except PatchgapError as err:
        raise ConfigError(f"{where}: {err}") from None
    if not (local / "adapter_config.json").is_file():
        raise ConfigError(f"{where}: not a LoRA adapter folder (no adapter_config.json)")
    if not local.resolve().is_relative_to(inputs.resolve()):  # a local folder, given as is
        local = Path(shutil.copytree(local, inputs / local.name, dirs_exist_ok=True))
    say(f"adapter: {uri} -> {local}")
    args["adapter_uri"] = str(local.resolve())


def _init_kfp_local(prepared: PreparedRun, pipeline_root: Path, say: Say) -> None:
    from kfp import local

    if prepared.settings.runner == "subprocess":
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
        return

    kwargs = prepare_docker(prepared, say)
    local.init(runner=local.DockerRunner(**kwargs), pipeline_root=str(pipeline_root))


def run_pipeline(prepared: PreparedRun, *, say: Say = print) -> dict[str, Any]:
    """Run ``prepared`` under kfp.local, upload the pipeline root and the run manifest; returns
    the manifest."""
    import importlib

    s = prepared.settings
    root = home_dir() / "runs" / prepared.run_id
    root.mkdir(parents=True, exist_ok=True)
    # First: the Docker runner's checks, and pi0 moved to S3, change the arguments.
    _init_kfp_local(prepared, root / "pipeline-root", say)
    args = pipeline_arguments(prepared)
    local_adapter(prepared, args, root / "pipeline-root", say)
    module = importlib.import_module(f"patchgap.pipelines.{s.pipeline}")
    say(f"running pipeline `{s.pipeline}` locally ({s.runner} runner); work folder {root}")
    t0 = time.time()
    status = "succeeded"
    error = None
    try:
        module.build(local=True)(**args)
    except Exception as err:  # record the failure in the manifest, then re-raise
        status, error = "failed", f"{type(err).__name__}: {err}"
        if s.pipeline == "watch" and isinstance(err, RuntimeError):
            # kfp.local's "inner task failed": the step's own traceback is in the log above, and
            # the lines below name each dataset and the step it stopped at.
            raise PatchgapError(
                f"watch run {prepared.run_id}: not every dataset was recorded (see the lines "
                f"above and s3://{s.bucket}/runs/{prepared.run_id}/run.json); a later run "
                "tries them again once their claims expire"
            ) from err
        raise
    finally:
        seconds = time.time() - t0
        store = Store.from_env()
        prefix = f"s3://{s.bucket}/runs/{prepared.run_id}"
        manifest = {
            "run_id": prepared.run_id,
            "pipeline": s.pipeline,
            "status": status,
            "error": error,
            "uri": prefix + "/",
            "config_file": str(prepared.config_path),
            "config": prepared.raw,
            "arguments": args,
            "inputs": _inputs(prepared, store),
            "timings": {"pipeline_seconds": round(seconds, 1)},
            "environment": environment_info(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        art = root / "pipeline-root"
        if s.pipeline == "watch":
            manifest["watch"] = watch_summary(art, args)
            for line in watch_lines(manifest["watch"], s.claim_hours):
                say(line)
        if art.is_dir() and any(art.iterdir()):
            exclude = None if s.publish_weights else _is_weights
            if exclude is not None:
                manifest["left_out"] = left_out(art, exclude)
            store.upload_dir(
                art, f"{prefix}/artifacts", metadata={"run_id": prepared.run_id}, exclude=exclude
            )
        write_text_atomic(
            root / "run.json", json.dumps(manifest, indent=2, sort_keys=True, default=str)
        )
        store.put_file(root / "run.json", f"{prefix}/run.json")
        say(f"run {status} in {seconds:.0f}s; manifest {prefix}/run.json")
    report = _find_report(root / "pipeline-root")
    if s.pipeline == "study":
        # Every snapshot is a row of evaluate's table: the study's verdicts say more.
        for md in sorted((root / "pipeline-root").rglob("study/study.md")):
            say(md.read_text(encoding="utf-8"))
            say(f"study: {md.parent} (study.json, frontiers.png, reward_curve.png beside it)")
    elif report is not None:
        say(run_summary(report, root / "pipeline-root", prepared.run_id, s.bucket))
    say(json.dumps({"run_id": prepared.run_id, "uri": manifest.get("uri")}))
    return manifest


def _is_weights(key: str) -> bool:
    """Model weight files, which ``run.publish_weights: false`` keeps local."""
    return key.endswith(".safetensors")


def left_out(folder: Path, exclude: Callable[[str], bool]) -> dict[str, Any]:
    """What a publish leaves out of ``folder``: count, bytes, why, and where it stays."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    picked = [p for p in files if exclude(p.relative_to(folder).as_posix())]
    return {
        "files": len(picked),
        "bytes": sum(p.stat().st_size for p in picked),
        "why": "run.publish_weights: false (model weights stay in the local work folder)",
        "local": str(folder),
    }


def _inputs(prepared: PreparedRun, store: Any) -> dict[str, Any]:
    s = prepared.settings
    if s.pipeline == "watch":
        # The datasets themselves are listed, with their hashes, in the manifest's `watch`.
        return {
            "prefix_uri": prepared.dataset_uri,
            "ledger_uri": ledger_uri(s),
            "adapter_uri": s.adapter_uri,
            "model": prepared.model_path,
        }
    return {
        "dataset_uri": prepared.dataset_uri,
        "dataset_sha256": _object_sha(store, prepared.dataset_uri),
        "dataset_counts": prepared.dataset_counts,
        "adapter_uri": s.adapter_uri,
        "model": prepared.model_path,
    }


def _task_output(folder: Path) -> dict[str, Any]:
    """A finished kfp.local task's executor_output.json (empty when the task did not finish)."""
    path = folder / "executor_output.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


#: A watch dataset's steps, in order; a row's `stopped_at` is the first one that did not finish.
WATCH_STEPS = ("stage-dataset", "rewrite", "gate", "record-processed")


def watch_summary(pipeline_root: Path, args: dict[str, Any]) -> dict[str, Any]:
    """What a watch run did, read from its local pipeline root: the datasets it claimed and, for
    each one it started, how far it got (staged, rewritten, gated, recorded in the ledger).

    The layout is kfp.local's: ``<pipeline>/<task>/`` for the listing and
    ``<pipeline>/for-loop-N-iteration-I/<task>[-2]/`` for the I-th claimed dataset (``-2``: the
    prompt-only branch), each finished task with its ``executor_output.json``.
    """
    claimed: list[dict[str, Any]] = []
    for folder in sorted(pipeline_root.glob("*/find-new-datasets")):
        claimed += _task_output(folder).get("parameterValues", {}).get("Output") or []
    iterations = sorted(
        pipeline_root.glob("*/for-loop-*-iteration-*"),
        key=lambda p: int(p.name.rsplit("-", 1)[1]),
    )
    datasets = []
    for it in iterations:
        index = int(it.name.rsplit("-", 1)[1])
        tasks = {p.name.rstrip("-0123456789"): _task_output(p) for p in it.iterdir() if p.is_dir()}
        staged = tasks.get("stage-dataset", {})
        params = staged.get("parameterValues", {})
        item = claimed[index] if index < len(claimed) else {}
        datasets.append(
            {
                "uri": item.get("uri"),
                "sha256": params.get("sha256"),
                "records_valid": params.get("valid"),
                "records_rejected": params.get("rejected"),
                "rewritten": bool(tasks.get("rewrite")),
                "acceptance_rate": tasks.get("gate", {}).get("parameterValues", {}).get("Output"),
                "ledger_entry": tasks.get("record-processed", {})
                .get("parameterValues", {})
                .get("Output"),
                "stopped_at": next((s for s in WATCH_STEPS if not tasks.get(s)), None),
                "work_folder": it.relative_to(pipeline_root).as_posix(),
            }
        )
    # The KFP run name, which the ledger entries of this run carry as `pipeline_run`.
    runs = sorted(p.name for p in pipeline_root.glob("patchgap-watch-*") if p.is_dir())
    return {
        "prefix_uri": args.get("prefix_uri"),
        "ledger_uri": args.get("ledger_uri"),
        "pipeline_run": runs[-1] if runs else None,
        "claimed": [c.get("uri") for c in claimed],
        "datasets": datasets,
    }


def watch_lines(summary: dict[str, Any], claim_hours: float) -> list[str]:
    """The end-of-run lines of a watch run: one per dataset it claimed."""
    claimed = summary["claimed"]
    if not claimed:
        return [f"watch: no new dataset under {summary['prefix_uri']}"]
    rows = {row["uri"]: row for row in summary["datasets"]}
    lines = [f"watch: {len(claimed)} new dataset(s) under {summary['prefix_uri']}"]
    for uri in claimed:
        row = rows.get(uri) or {"stopped_at": WATCH_STEPS[0]}
        if row["stopped_at"] is None:
            state = f"recorded (acceptance rate {float(row['acceptance_rate']):.2f})"
        else:
            state = (
                f"stopped at {row['stopped_at']}, not recorded; a run after its claim expires "
                f"({claim_hours:g} h) tries it again"
            )
        lines.append(f"  {uri}: {state}")
    return lines


def _object_sha(store: Any, uri: str) -> str | None:
    try:
        return content_sha256(store, uri)
    except PatchgapError:
        return None


def _find_report(root: Path) -> Path | None:
    hits = sorted(root.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def run_summary(results_json: Path, pipeline_root: Path, run_id: str, bucket: str) -> str:
    """The end-of-run summary: the evaluate tables at the terminal's width, where the HTML report
    and plots are, and the command that fetches them from the store."""
    folder = results_json.parent
    table = json.loads(results_json.read_text())["forgetting_table"]
    rel = folder.relative_to(pipeline_root).as_posix()
    lines = [
        render_text(table, shutil.get_terminal_size().columns),
        f"report: {folder / 'report.html'} (plots: bars.png, scatter.png beside it)",
        f"fetch:  patchgap artifacts get {run_id} ./{run_id} --bucket {bucket}",
        f"        then open ./{run_id}/artifacts/{rel}/report.html",
    ]
    return "\n".join(lines)
