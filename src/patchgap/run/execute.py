"""Run a pipeline on this machine with ``kfp.local`` and publish the run to S3.

The subprocess runner (the embedded default) executes each component in this Python environment;
the Docker runner executes the stage images (:mod:`patchgap.run.containers`: checks first, pi0
through S3, GPUs requested when present, podman through ``DOCKER_HOST``). Afterwards every
artifact of the local pipeline root is uploaded to ``s3://<bucket>/runs/<run-id>/artifacts/`` and
a run manifest (git commit, package versions, configs, input hashes, timings) to
``s3://<bucket>/runs/<run-id>/run.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from patchgap.errors import PatchgapError
from patchgap.run.prepare import PreparedRun, Say
from patchgap.stages.base import STAGE_SECTIONS, section_json


def pipeline_arguments(prepared: PreparedRun) -> dict[str, Any]:
    s = prepared.settings
    args: dict[str, Any] = {
        "dataset_uri": prepared.dataset_uri,
        "num_shards": s.num_shards,
        "min_acceptance_rate": s.min_acceptance_rate,
    }
    for section in STAGE_SECTIONS:
        # Every stage declares pi0 as `model`: the prepared local folder, so no stage ever
        # resolves a hub name.
        overrides = [f"model={prepared.model_path}"]
        args[f"{section}_config"] = section_json(prepared.raw, section, f"[{section}]", overrides)
    if s.pipeline == "full":
        args["prompt_only_baseline"] = s.prompt_only_baseline
    if s.pipeline == "rewrite":
        if not s.adapter_uri:
            raise PatchgapError("run.adapter_uri is required for the rewrite pipeline")
        args["adapter_uri"] = s.adapter_uri
        args.pop("train_rewriter_config")
    return args


def _init_kfp_local(prepared: PreparedRun, pipeline_root: Path, say: Say) -> None:
    from kfp import local

    if prepared.settings.runner == "subprocess":
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
        return
    from patchgap.run.containers import prepare_docker

    kwargs = prepare_docker(prepared, say)
    local.init(runner=local.DockerRunner(**kwargs), pipeline_root=str(pipeline_root))


def run_pipeline(prepared: PreparedRun, *, say: Say = print) -> dict[str, Any]:
    """Run ``prepared`` under kfp.local, upload the pipeline root and the run manifest; returns
    the manifest."""
    import importlib

    from patchgap.settings import home_dir
    from patchgap.stages.base import environment_info
    from patchgap.storage.store import Store

    s = prepared.settings
    root = home_dir() / "runs" / prepared.run_id
    root.mkdir(parents=True, exist_ok=True)
    # First: the Docker runner's checks, and pi0 moved to S3, change the arguments.
    _init_kfp_local(prepared, root / "pipeline-root", say)
    args = pipeline_arguments(prepared)
    module = importlib.import_module(f"patchgap.pipelines.{s.pipeline}")
    say(f"running pipeline `{s.pipeline}` locally ({s.runner} runner); work folder {root}")
    t0 = time.time()
    status = "succeeded"
    error = None
    try:
        module.build(local=True)(**args)
    except Exception as err:  # record the failure in the manifest, then re-raise
        status, error = "failed", f"{type(err).__name__}: {err}"
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
            "inputs": {
                "dataset_uri": prepared.dataset_uri,
                "dataset_sha256": _object_sha(store, prepared.dataset_uri),
                "dataset_counts": prepared.dataset_counts,
                "model": prepared.model_path,
            },
            "timings": {"pipeline_seconds": round(seconds, 1)},
            "environment": environment_info(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        art = root / "pipeline-root"
        if art.is_dir() and any(art.iterdir()):
            store.upload_dir(art, f"{prefix}/artifacts", metadata={"run_id": prepared.run_id})
        (root / "run.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        store.put_file(root / "run.json", f"{prefix}/run.json")
        say(f"run {status} in {seconds:.0f}s; manifest {prefix}/run.json")
    report = _find_report(root / "pipeline-root")
    if report is not None:
        say(run_summary(report, root / "pipeline-root", prepared.run_id, s.bucket))
    say(json.dumps({"run_id": prepared.run_id, "uri": manifest.get("uri")}))
    return manifest


def _object_sha(store: Any, uri: str) -> str | None:
    try:
        from patchgap.data.ledger import content_sha256

        return content_sha256(store, uri)
    except PatchgapError:
        return None


def _find_report(root: Path) -> Path | None:
    hits = sorted(root.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def run_summary(results_json: Path, pipeline_root: Path, run_id: str, bucket: str) -> str:
    """The end-of-run summary: the evaluate tables at the terminal's width, where the HTML report
    and plots are, and the command that fetches them from the store."""
    from patchgap.reports.evaluation import render_text

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
