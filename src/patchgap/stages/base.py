"""What every stage shares: config loading from a run YAML, the ``python -m`` entrypoint, moving
inputs and outputs between S3 and local folders, manifests, and skipping finished work.

A stage's ``run()`` only ever sees local paths. Under KFP the launcher moves artifacts; when a stage
runs alone (``python -m``, ``docker run``, ``patchgap stage``), this module downloads ``s3://``
inputs (verifying checksums), runs the stage in a work folder, and uploads each output with its
manifest written last. An output whose manifest already records the same input hashes and config
is not recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from patchgap.config import StrictModel, apply_overrides, read_yaml, validate
from patchgap.errors import ConfigError, PatchgapError

log = logging.getLogger("patchgap.stages")

C = TypeVar("C", bound=StrictModel)

#: Top-level keys of a run YAML that every stage section inherits when it declares the field.
SHARED_KEYS = ("model", "seed", "trust_remote_code", "device", "dtype")

#: The stage sections of a run YAML, in pipeline order.
STAGE_SECTIONS = ("train_rewriter", "rewrite", "gate", "sft", "evaluate")

#: Every top-level key a run YAML may have.
RUN_YAML_KEYS = ("run", *STAGE_SECTIONS, *SHARED_KEYS)

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
    OUTPUTS: tuple[str, ...]

    def run(
        self, config: Any, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
    ) -> dict[str, float]: ...


def load_stage_config(
    model: type[C],
    path: str | Path | None,
    section: str,
    overrides: list[str] | None = None,
) -> C:
    """Load one stage's config from a run YAML.

    The stage reads its own section (``sft:``, ``gate:``, ...); a key in :data:`SHARED_KEYS` at the
    top level (``model: smollm2``) is inherited by every section that declares that field and does
    not set it. A file without the section gives the stage's defaults.
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
    for section in STAGE_SECTIONS:
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
    for key in SHARED_KEYS:
        if key in data and key in model.model_fields and key not in merged:
            merged[key] = data[key]
    return validate(model, apply_overrides(merged, overrides), source)


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
    """sha256 over a file, or over every file of a folder (relative names and contents)."""
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
        base = path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
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
    from patchgap.settings import project_root

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


@dataclass
class StageResult:
    metrics: dict[str, float]
    skipped: bool
    seconds: float
    outputs: dict[str, str]


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
    missing_in = [n for n in stage.INPUTS if n not in inputs and not _optional(stage, n)]
    if missing_in:
        raise ConfigError(f"stage {stage.NAME}: missing input(s): {', '.join(missing_in)}")
    unknown = sorted(set(inputs) - set(stage.INPUTS)) + sorted(set(outputs) - set(stage.OUTPUTS))
    if unknown:
        raise ConfigError(f"stage {stage.NAME}: unknown input/output name(s): {', '.join(unknown)}")
    say = progress or (lambda msg: log.info(msg))
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix=f"patchgap-{stage.NAME}-")
    root = Path(workdir) if workdir is not None else Path(tmp.name)
    try:
        local_in: dict[str, Path] = {}
        for name, uri in inputs.items():
            if _is_remote(uri):
                from patchgap.storage.store import fetch_to_local

                say(f"{stage.NAME}: fetching input {name} from {uri}")
                local_in[name] = fetch_to_local(uri, root / "in" / name)
            else:
                p = Path(uri.removeprefix("file://"))
                if not p.exists():
                    raise ConfigError(f"stage {stage.NAME}: input {name}: {p} does not exist")
                local_in[name] = p
        input_hashes = {name: path_hash(p) for name, p in sorted(local_in.items())}
        chash = config_hash(config)

        remote_out = {n: u for n, u in outputs.items() if _is_remote(u)}
        if remote_out and not force:
            done = _finished_metrics(remote_out, chash, input_hashes)
            if done is not None:
                say(f"{stage.NAME}: outputs already complete for these inputs and config; skipped")
                return StageResult(done, True, time.time() - t0, dict(outputs))

        config = with_store_state(config, stage, outputs)
        local_out: dict[str, Path] = {}
        for name in stage.OUTPUTS:
            uri = outputs.get(name)
            if uri is None or _is_remote(uri):
                local_out[name] = root / "out" / name
            else:
                local_out[name] = Path(uri.removeprefix("file://"))
            local_out[name].mkdir(parents=True, exist_ok=True)

        metrics = stage.run(config, local_in, local_out)
        seconds = time.time() - t0
        metrics = {**metrics, "stage_seconds": round(seconds, 3)}

        record = {
            "stage": stage.NAME,
            "config": config.model_dump(mode="json"),
            "config_hash": chash,
            "input_hashes": input_hashes,
            "inputs": dict(inputs),
            "metrics": metrics,
            "environment": environment_info(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for p in local_out.values():
            (p / "_stage.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        if remote_out:
            from patchgap.storage.store import Store

            store = Store.from_env()
            for name, uri in remote_out.items():
                say(f"{stage.NAME}: uploading output {name} to {uri}")
                store.upload_dir(local_out[name], uri, metadata=record)
        return StageResult(metrics, False, seconds, dict(outputs))
    finally:
        tmp.cleanup()


def _optional(stage: StageModule, name: str) -> bool:
    return name in getattr(stage, "OPTIONAL_INPUTS", ())


def _finished_metrics(
    remote_out: Mapping[str, str], chash: str, input_hashes: Mapping[str, str]
) -> dict[str, float] | None:
    from patchgap.storage.store import Store

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


def _parse_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: expected NAME=URI")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
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


def main(stage: StageModule | ModuleType, argv: list[str] | None = None) -> int:
    """The container entrypoint: ``python -m patchgap.stages.<name> --config ... --input ...``."""
    from patchgap.logs import setup_logging

    setup_logging()
    args = build_parser(stage).parse_args(argv)  # type: ignore[arg-type]
    try:
        config = load_stage_config(stage.Config, args.config, args.section, args.overrides)
        result = execute(
            stage,  # type: ignore[arg-type]
            config,
            _parse_pairs(args.inputs, "--input"),
            _parse_pairs(args.outputs, "--output"),
            force=args.force,
        )
    except PatchgapError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result.metrics, indent=2, sort_keys=True)
    if args.metrics:
        Path(args.metrics).write_text(text)
    print(text)
    return 0
