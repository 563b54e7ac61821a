"""The run's local inputs in S3, for runs whose steps see no host folder (``patchgap run
--docker``; a cluster submission of a run YAML): pi0's folder, the named evaluation sets read from
the data directory and every custom evaluation set with a local ``path:`` are uploaded under
``s3://<bucket>/`` and the run's config is rewritten to point at those copies. D itself is staged
by :func:`patchgap.run.prepare.prepare_run` for every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchgap.data.registry import named_sets
from patchgap.data.sources import resolve_path
from patchgap.errors import ConfigError
from patchgap.lm.models import push_model
from patchgap.run.prepare import PreparedRun, Say
from patchgap.settings import data_dir
from patchgap.stages.base import section_config
from patchgap.stages.evaluate import Config as EvaluateConfig
from patchgap.storage.store import Store


def inputs_to_s3(prepared: PreparedRun, say: Say) -> None:
    """Upload pi0 and the evaluation sets, and point ``prepared`` (its model path and its
    ``evaluate:`` section) at the uploaded copies."""
    prepared.model_path = model_to_s3(prepared, say)
    if prepared.settings.pipeline == "watch":  # rewrite and gate only: no evaluation set is read
        return
    prepared.raw = evalsets_to_s3(
        prepared.raw, prepared.settings.bucket, str(prepared.config_path), say
    )


def model_to_s3(prepared: PreparedRun, say: Say) -> str:
    """Upload pi0's prepared folder to ``s3://<bucket>/models/<name>`` (with its manifest) and
    return that URI, which every stage resolves by downloading it into its cache; a reference
    that is no local folder is returned as it is."""
    if not Path(prepared.model_path).is_dir():  # an s3:// folder, or a hub id the steps resolve
        return prepared.model_path

    uri = f"s3://{prepared.settings.bucket}/models/{Path(prepared.model_path).name}"
    push_model(prepared.model_path, uri)
    say(f"model: {prepared.model_path} -> {uri} (the steps load it from S3)")
    return uri


def evalsets_to_s3(raw: dict[str, Any], bucket: str, source: str, say: Say) -> dict[str, Any]:
    """``raw`` with its evaluation sets in S3: the named sets the ``evaluate:`` section reads from
    the data directory go to ``s3://<bucket>/benchmarks/<their path>`` (listed in
    ``benchmark_paths``); each custom math set with a local ``path:`` goes to
    ``s3://<bucket>/benchmarks/custom/<name>/`` and its entry points there. Sets given as
    ``s3://`` already, and lm-eval tasks with their own data, are left as they are."""
    where = f"{source} [evaluate]"
    cfg = section_config(EvaluateConfig, raw, "evaluate", where)
    store = Store.from_env()
    paths = _named_sets_to_s3(cfg, bucket, where, store)
    section = dict(raw.get("evaluate") or {})
    math = _custom_sets_to_s3(cfg, section.get("math"), bucket, where, store)
    moved = sorted(set(paths) - set(cfg.benchmark_paths))
    if moved:
        section["benchmark_paths"] = paths
        say(f"benchmarks: {', '.join(moved)} -> s3://{bucket}/benchmarks/")
    if math is not None:
        section["math"] = math
        say(f"custom evaluation sets -> s3://{bucket}/benchmarks/custom/")
    if not moved and math is None:
        return raw
    return {**raw, "evaluate": section}


def _upload(store: Any, local: Path, uri: str) -> None:
    if local.is_dir():
        store.upload_dir(local, uri)
    else:
        store.put_file(local, uri)


def _named_sets_to_s3(cfg: Any, bucket: str, where: str, store: Any) -> dict[str, str]:
    """``benchmark_paths`` with every named set the section reads from the data directory."""
    names = [m.name for m in cfg.math if m.path is None] + cfg.general + cfg.choice
    # the held-out solutions and the drift questions come from named sets too
    names += cfg.heldout.sets if cfg.heldout.enabled else []
    names += (cfg.drift.benchmarks or []) if cfg.drift.enabled else []
    folder = Path(cfg.data_dir) if cfg.data_dir else data_dir()
    paths = dict(cfg.benchmark_paths)
    for name in dict.fromkeys(names):
        # A name's file: as a math set, else a held-out set, else a multiple-choice set.
        found = (named_sets(role).get(name) for role in ("math", "heldout", "choice"))
        entry = next((e for e in found if e is not None), None)
        rel = entry.path if entry is not None else ""
        if name in paths or not rel:  # given already, or an lm-eval task with its own data
            continue
        src = folder / rel if folder is not None else None
        if src is None or not src.exists():
            raise ConfigError(
                f"{where}: benchmark {name} not found at {src} "
                "(set PATCHGAP_DATA_DIR, or benchmark_paths to an s3:// URI)"
            )
        paths[name] = f"s3://{bucket}/benchmarks/{rel}"
        _upload(store, src, paths[name])
    return paths


def _custom_sets_to_s3(
    cfg: Any, entries: Any, bucket: str, where: str, store: Any
) -> list[Any] | None:
    """The section's ``math`` list with each local custom set uploaded and its ``path``
    replaced by the copy's URI; None when there is none to upload."""
    folder = Path(cfg.data_dir) if cfg.data_dir else None
    out: list[Any] = list(entries or [])
    changed = False
    # The validated list keeps the YAML's order: entry i of one is entry i of the other.
    for i, ms in enumerate(cfg.math):
        if ms.path is None or ms.path.startswith("s3://"):
            continue
        local = resolve_path(ms.path, folder)
        if not local.exists():
            raise ConfigError(f"{where}: math[{i}] {ms.name}: {local} does not exist")
        uri = f"s3://{bucket}/benchmarks/custom/{ms.name}/{local.name}"
        _upload(store, local, uri)
        out[i] = {**out[i], "path": uri}
        changed = True
    return out if changed else None
