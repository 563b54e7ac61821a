"""The one way into a stage: config loading from a run YAML, input/output checks, moving inputs
and outputs between S3 and local folders, manifests, and skipping finished work.

A stage's ``run()`` only ever sees local paths, and every caller goes through :func:`execute`:
``python -m patchgap.stages.<name>`` and ``patchgap stage`` through :func:`run_from_args`, a KFP
component body through :func:`run_component` (the launcher has already moved its artifacts).
``s3://`` inputs are downloaded (checksums verified), the stage runs in a work folder, and each
``s3://`` output is uploaded with its manifest written last; a stage's resume state is removed
only after that (:func:`after_outputs_kept`). An output whose manifest already records the same
input hashes and config is not recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from patchgap.args import split_key_value
from patchgap.config import StrictModel, apply_overrides, read_yaml, safe_load_yaml, validate
from patchgap.errors import ConfigError, PatchgapError, user_message
from patchgap.fsutil import refuse_output_over_input, write_text_atomic
from patchgap.logs import setup_logging
from patchgap.settings import project_root
from patchgap.stages import STAGES
from patchgap.storage.store import MANIFEST_NAME, Store, fetch_to_local, published_folder

log = logging.getLogger("patchgap.stages")

C = TypeVar("C", bound=StrictModel)

#: The provenance record each stage writes into every local output folder.
STAGE_RECORD = "_stage.json"

#: Top-level keys of a run YAML that a stage section inherits when it, or else one of its nested
#: sections (``generation``, ``reward``), declares the field.
SHARED_KEYS = ("model", "seed", "trust_remote_code", "device", "dtype")

#: Every top-level key a run YAML may have.
# `study`: the study pipeline's settings (patchgap.study.config), validated by patchgap.run.
RUN_YAML_KEYS = ("run", "study", *STAGES, *SHARED_KEYS)

#: Packages whose versions go into every manifest.
TRACKED_PACKAGES = (
    "patchgap",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "math-verify",
    "sentence-transformers",
    "lm-eval",
    "vllm",
    "kfp",
)


class StageModule(Protocol):
    NAME: str
    Config: type[StrictModel]
    INPUTS: tuple[str, ...]
    #: Inputs a stage can do without (the rewrite stage without an adapter is prompt-only).
    OPTIONAL_INPUTS: tuple[str, ...]
    OUTPUTS: tuple[str, ...]

    def run(
        self, config: Any, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
    ) -> dict[str, float]: ...


def stage_module(name: str) -> StageModule:
    """The stage module for ``name`` (``train-rewriter`` and ``train_rewriter`` alike)."""
    key = name.replace("-", "_")
    if key not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    return importlib.import_module(f"patchgap.stages.{key}")  # type: ignore[return-value]


def load_stage_config(
    model: type[C],
    path: str | Path | None,
    section: str,
    overrides: list[str] | None = None,
) -> C:
    """Load one stage's config from a run YAML.

    The stage reads its own section (``sft:``, ``gate:``, ...); a key in :data:`SHARED_KEYS` at the
    top level (``model: smollm2``) is inherited by every section that declares that field and does
    not set it, or, when the stage itself does not declare it, by its nested sections that do
    (``seed`` -> ``rewrite.generation.seed``). A file without the section gives the stage's
    defaults.
    """
    data = read_yaml(path) if path is not None else {}
    if path is not None:
        check_top_level_keys(data, str(path), extra=(section,))
    source = f"{path} [{section}]" if path is not None else f"[{section}]"
    return section_config(model, data, section, source, overrides)


def check_top_level_keys(data: Mapping[str, Any], source: str, extra: tuple[str, ...] = ()) -> None:
    """A misspelled section (``gatee:``) would be ignored and its stage run with defaults:
    refuse every top-level key a run YAML does not have, suggesting the closest one."""
    import difflib

    known = (*RUN_YAML_KEYS, *extra)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown top-level key {str(key)[:80]!r}{hint}")


def validate_run_yaml(data: Mapping[str, Any], source: str) -> None:
    """Check a whole run YAML (top-level keys and every stage section) without side effects."""
    import importlib

    check_top_level_keys(data, source)
    for section in STAGES:
        module = importlib.import_module(f"patchgap.stages.{section}")
        section_config(module.Config, dict(data), section, f"{source} [{section}]")


def section_config(
    model: type[C],
    data: dict[str, Any],
    section: str,
    source: str,
    overrides: list[str] | None = None,
) -> C:
    """Validate one section of an already-read run YAML, inheriting :data:`SHARED_KEYS`."""
    sub = data.get(section, {}) or {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{source}: expected a mapping")
    merged = dict(sub)
    for key in (k for k in SHARED_KEYS if k in data):
        if key in model.model_fields:
            merged.setdefault(key, data[key])
            continue
        # A stage that keeps the setting in a nested section (rewrite: generation.seed) passes
        # it on to every such section that declares it and does not set it.
        for name, field in model.model_fields.items():
            kind, inner = field.annotation, merged.get(name) or {}
            if isinstance(kind, type) and issubclass(kind, BaseModel) and key in kind.model_fields:
                merged[name] = {key: data[key], **inner} if isinstance(inner, dict) else inner
    return validate(model, apply_overrides(merged, overrides), source)


def section_json(
    data: dict[str, Any], section: str, source: str, overrides: list[str] | None = None
) -> str:
    """One stage section of a run YAML, validated, as the one-line JSON its component receives."""
    return config_json(
        section_config(stage_module(section).Config, data, section, source, overrides)
    )


def config_json(config: BaseModel) -> str:
    """A config as one line of JSON (valid YAML): what a KFP component receives. One line
    because KFP copies parameter defaults into a comment header of the compiled YAML, and a
    multi-line default breaks that file."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def config_hash(config: BaseModel) -> str:
    """Stable hash of a validated config (sorted JSON of its dump)."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def path_hash(path: Path) -> str:
    """sha256 over a file, or over every file of a folder (relative names and contents).

    A folder's manifests and stage records are left out: they carry the time they were written
    (and the stage's timings), so the same data staged or produced again, by a rerun of the
    pipeline after a crash, would otherwise hash differently, and every stage keyed on it
    (checkpoints, kept batches, finished outputs) would start over. The manifest lists the other
    files' hashes, so leaving it out loses nothing of the content.
    """
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
        base = path.parent
    else:
        skip = {MANIFEST_NAME, STAGE_RECORD}
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip)
        base = path
    for f in files:
        h.update(str(f.relative_to(base)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def environment_info() -> dict[str, Any]:
    """Package versions, Python, platform and the git commit (when run from a checkout)."""
    versions: dict[str, str | None] = {}
    for pkg in TRACKED_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    root = project_root()
    if root is None or not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def with_store_state(config: C, stage: Any, outputs: Mapping[str, str]) -> C:
    """Keep a resumable stage's finished work in the store beside its first output
    (``<output>.state``) when that output goes to S3 and ``state_uri`` is unset: a restarted
    pod then finds it, which a folder inside the pod's scratch space would not survive."""
    uri = outputs.get(stage.OUTPUTS[0]) if stage.OUTPUTS else None
    if "state_uri" not in type(config).model_fields or getattr(config, "state_uri", None):
        return config
    if uri is None or not _is_remote(uri):
        return config
    return config.model_copy(update={"state_uri": uri.rstrip("/") + ".state"})


#: Clean-ups a stage asked for while :func:`execute` runs it, run once its outputs are kept.
_AFTER_OUTPUTS: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "patchgap_after_outputs", default=None
)


def after_outputs_kept(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` (removing a stage's resume state) once the stage's outputs are kept.

    Under :func:`execute` that is after every ``s3://`` output's manifest is written; a stage
    that removed its state at the end of ``run()`` would leave a kill during the upload with
    neither the state nor a complete output, and the rerun would redo all the work. Called
    outside :func:`execute` (a direct ``run()``), the outputs are already where they stay and
    ``cleanup`` runs at once. A stage that fails never reaches it: its state is kept.
    """
    pending = _AFTER_OUTPUTS.get()
    if pending is None:
        cleanup()
    else:
        pending.append(cleanup)


def _run_cleanups(stage_name: str, cleanups: list[Callable[[], None]]) -> None:
    for cleanup in cleanups:
        try:
            cleanup()
        except PatchgapError as err:
            # The outputs are complete; leftover state only costs space, so the stage succeeds.
            log.warning(
                "%s: outputs kept, but their resume state was not removed: %s", stage_name, err
            )


@dataclass
class StageResult:
    metrics: dict[str, float]
    skipped: bool
    seconds: float
    outputs: dict[str, str]


def is_world_main_process() -> bool:
    """False in a process that torchrun or accelerate started with a global rank other than 0."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def execute(
    stage: StageModule,
    config: StrictModel,
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    *,
    workdir: Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> StageResult:
    """Run ``stage`` with inputs and outputs given as local paths or ``s3://`` prefixes.

    Remote inputs are downloaded and verified, remote outputs uploaded with a manifest that records
    the config, the input hashes and the environment. When every remote output already has a
    manifest for the same config and inputs, the stage is skipped and its recorded metrics
    returned (``force`` recomputes).
    """
    _check_io_names(stage, inputs, outputs)
    say = progress or (lambda msg: log.info(msg))
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix=f"patchgap-{stage.NAME}-")
    root = Path(workdir) if workdir is not None else Path(tmp.name)
    try:
        local_in = _local_inputs(stage, inputs, root, say)
        input_hashes = {name: path_hash(p) for name, p in sorted(local_in.items())}
        chash = config_hash(config)

        remote_out = {n: u for n, u in outputs.items() if _is_remote(u)}
        if remote_out and not force:
            done = _finished_metrics(remote_out, chash, input_hashes)
            if done is not None:
                say(f"{stage.NAME}: outputs already complete for these inputs and config; skipped")
                return StageResult(done, True, time.time() - t0, dict(outputs))

        config = with_store_state(config, stage, outputs)
        local_out = _local_outputs(stage, outputs, root)
        metrics, cleanups = _run_collecting_cleanups(stage, config, local_in, local_out)
        seconds = time.time() - t0
        metrics = {**metrics, "stage_seconds": round(seconds, 3)}

        if not is_world_main_process():
            # Under torchrun (a TrainJob's nodes) every rank runs the stage; the outputs, their
            # manifests and the clean-ups are global rank 0's alone, never written twice.
            return StageResult(metrics, False, seconds, dict(outputs))
        record = _stage_record(stage, config, chash, input_hashes, inputs, metrics)
        _keep_outputs(stage, record, local_out, remote_out, say)
        # Only now, with every manifest written, may the state go (see after_outputs_kept).
        _run_cleanups(stage.NAME, cleanups)
        return StageResult(metrics, False, seconds, dict(outputs))
    finally:
        tmp.cleanup()


def _check_io_names(
    stage: StageModule, inputs: Mapping[str, str], outputs: Mapping[str, str]
) -> None:
    """Refuse a missing required input and any input or output name the stage does not know."""
    missing_in = [n for n in stage.INPUTS if n not in inputs and n not in stage.OPTIONAL_INPUTS]
    if missing_in:
        raise ConfigError(f"stage {stage.NAME}: missing input(s): {', '.join(missing_in)}")
    unknown = sorted(set(inputs) - set(stage.INPUTS)) + sorted(set(outputs) - set(stage.OUTPUTS))
    if unknown:
        raise ConfigError(f"stage {stage.NAME}: unknown input/output name(s): {', '.join(unknown)}")


def _local_inputs(
    stage: StageModule, inputs: Mapping[str, str], root: Path, say: Callable[[str], None]
) -> dict[str, Path]:
    """Each input as a local path: ``s3://`` ones fetched under ``root/in``, local ones checked."""
    local_in: dict[str, Path] = {}
    for name, uri in inputs.items():
        if _is_remote(uri):
            say(f"{stage.NAME}: fetching input {name} from {uri}")
            local_in[name] = fetch_to_local(uri, root / "in" / name)
        else:
            p = Path(uri.removeprefix("file://"))
            if not p.exists():
                raise ConfigError(f"stage {stage.NAME}: input {name}: {p} does not exist")
            local_in[name] = published_folder(p)
    return local_in


def _local_outputs(stage: StageModule, outputs: Mapping[str, str], root: Path) -> dict[str, Path]:
    """A created local folder per output: the given path, or one under ``root/out`` for an
    ``s3://`` output (uploaded afterwards) or an output the caller did not name."""
    local_out: dict[str, Path] = {}
    for name in stage.OUTPUTS:
        uri = outputs.get(name)
        if uri is None or _is_remote(uri):
            local_out[name] = root / "out" / name
        else:
            local_out[name] = Path(uri.removeprefix("file://"))
        local_out[name].mkdir(parents=True, exist_ok=True)
    return local_out


def _run_collecting_cleanups(
    stage: StageModule, config: StrictModel, local_in: dict[str, Path], local_out: dict[str, Path]
) -> tuple[dict[str, float], list[Callable[[], None]]]:
    """``stage.run`` with the clean-ups it asks for (after_outputs_kept) held back, not run."""
    cleanups: list[Callable[[], None]] = []
    token = _AFTER_OUTPUTS.set(cleanups)
    try:
        metrics = stage.run(config, local_in, local_out)
    finally:
        _AFTER_OUTPUTS.reset(token)
    return metrics, cleanups


def _stage_record(
    stage: StageModule,
    config: StrictModel,
    chash: str,
    input_hashes: Mapping[str, str],
    inputs: Mapping[str, str],
    metrics: dict[str, float],
) -> dict[str, Any]:
    """The provenance record written into every output folder and each upload's manifest."""
    return {
        "stage": stage.NAME,
        "config": config.model_dump(mode="json"),
        "config_hash": chash,
        "input_hashes": input_hashes,
        "inputs": dict(inputs),
        "metrics": metrics,
        "environment": environment_info(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _keep_outputs(
    stage: StageModule,
    record: dict[str, Any],
    local_out: dict[str, Path],
    remote_out: Mapping[str, str],
    say: Callable[[str], None],
) -> None:
    """Write the record into each local output, then upload the ``s3://`` ones with it."""
    for p in local_out.values():
        write_text_atomic(p / STAGE_RECORD, json.dumps(record, indent=2, sort_keys=True))
    if remote_out:
        store = Store.from_env()
        for name, uri in remote_out.items():
            say(f"{stage.NAME}: uploading output {name} to {uri}")
            store.upload_dir(local_out[name], uri, metadata=record)


def _finished_metrics(
    remote_out: Mapping[str, str], chash: str, input_hashes: Mapping[str, str]
) -> dict[str, float] | None:
    store = Store.from_env()
    metrics: dict[str, float] | None = None
    for uri in remote_out.values():
        manifest = store.read_manifest(uri)
        if manifest is None:
            return None
        meta = manifest.metadata or {}
        if meta.get("config_hash") != chash or meta.get("input_hashes") != dict(input_hashes):
            return None
        metrics = dict(meta.get("metrics") or {})
    return metrics


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, uri = split_key_value(item, flag, expected="NAME=URI")
        out[name] = uri.strip()
    return out


def build_parser(stage: StageModule) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m patchgap.stages.{stage.NAME}",
        description=(stage.__doc__ or "").strip().splitlines()[0] if stage.__doc__ else None,
    )
    p.add_argument("--config", help="run YAML; the stage reads its own section")
    p.add_argument("--section", default=stage.NAME, help="YAML section (default: %(default)s)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="KEY=VALUE override"
    )
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        help=f"NAME=PATH_OR_S3_URI; names: {', '.join(stage.INPUTS)}",
    )
    p.add_argument(
        "--output",
        dest="outputs",
        action="append",
        default=[],
        help=f"NAME=PATH_OR_S3_URI; names: {', '.join(stage.OUTPUTS)}",
    )
    p.add_argument("--metrics", help="write the metrics JSON here too")
    p.add_argument("--force", action="store_true", help="recompute even when outputs are complete")
    return p


def run_from_args(
    stage: StageModule,
    config_path: str | Path | None,
    section: str,
    overrides: list[str],
    inputs: list[str],
    outputs: list[str],
    *,
    force: bool = False,
) -> StageResult:
    """``--config``, ``--set``, ``--input NAME=URI`` and ``--output NAME=URI`` as the stage
    entrypoint and ``patchgap stage`` take them."""
    config = load_stage_config(stage.Config, config_path, section, overrides)
    ins, outs = parse_pairs(inputs, "--input"), parse_pairs(outputs, "--output")
    for name, uri in outs.items():
        refuse_output_over_input(uri, [*ins.values(), config_path], f"--output {name}")
    return execute(stage, config, ins, outs, force=force)


def run_component(
    stage_name: str,
    config: str,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    metrics: Any | None = None,
    overrides: list[str] | None = None,
) -> dict[str, float]:
    """The body every KFP component shares: validate ``config`` (the stage section as one line of
    JSON, any YAML mapping text accepted) with ``overrides``, run the stage on the artifacts'
    local paths (``None`` for an optional input not wired), log finite numeric metrics. Imports
    no kfp: artifacts are duck-typed (``.path``, ``.metadata``, ``log_metric``)."""
    setup_logging()
    stage = stage_module(stage_name)
    data = safe_load_yaml(config, f"component {stage_name} config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"component {stage_name}: config must be a mapping")
    cfg = validate(stage.Config, apply_overrides(data, overrides), f"component {stage_name}")
    # The launcher passes the same output URIs to a retried pod: state beside them survives.
    uris = {n: str(getattr(a, "uri", "")) for n, a in outputs.items()}
    cfg = with_store_state(cfg, stage, uris)
    result = execute(
        stage,
        cfg,
        {n: a.path for n, a in inputs.items() if a is not None},
        {n: a.path for n, a in outputs.items()},
    ).metrics
    if metrics is not None:
        for key, value in sorted(result.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(float(value)):
                    metrics.log_metric(key, float(value))
    for art in outputs.values():
        if hasattr(art, "metadata"):
            art.metadata["stage"] = stage.NAME
    return result


def main(stage: StageModule | ModuleType, argv: list[str] | None = None) -> int:
    """The container entrypoint: ``python -m patchgap.stages.<name> --config ... --input ...``."""
    setup_logging()
    args = build_parser(stage).parse_args(argv)  # type: ignore[arg-type]
    try:
        result = run_from_args(
            stage,  # type: ignore[arg-type]
            args.config,
            args.section,
            args.overrides,
            args.inputs,
            args.outputs,
            force=args.force,
        )
    except Exception as err:  # noqa: BLE001 - the one mapping decides; defects re-raise
        message = user_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    text = json.dumps(result.metrics, indent=2, sort_keys=True)
    if args.metrics and is_world_main_process():  # under torchrun, rank 0's figures alone
        write_text_atomic(args.metrics, text)
    print(text)
    return 0
