"""The preflight of a run YAML (``patchgap run --check``, and the first step of every ``patchgap
run`` and ``patchgap demo``): every check that can fail on this machine runs before the embedded
S3 starts or anything is written, so a wrong path, field map or model name costs seconds, not a
staged dataset or hours of training.

In order: the whole YAML; every data source through its field map (records parsed, counts and one
sample); every evaluation set of the ``evaluate:`` section through the evaluate stage's own
loaders (an evaluation set must be fully valid); every model reference resolved without loading
weights or converting anything; for the Docker runner the engine and the pipeline's images. Each
check gives one line; a failure's line names the file, section, key or record and the fix.
Checks that need the store (``s3://`` inputs) run here when an endpoint is configured and are
otherwise marked ``later``: the run checks them when it reads them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from patchgap.config import validate
from patchgap.data import evalsets as bm
from patchgap.data.evalsets import subset_indices
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.errors import ConfigError, PatchgapError
from patchgap.lm import models
from patchgap.run.containers import check_images, engine_client
from patchgap.run.prepare import (
    PreparedRun,
    RunSettings,
    Say,
    load_run_settings,
    prepare_run,
    study_settings,
)
from patchgap.settings import CACHE_DIR_ENV
from patchgap.settings import data_dir as default_data_dir
from patchgap.stages import STAGES
from patchgap.stages import evaluate as ev
from patchgap.stages.base import section_config, stage_module
from patchgap.storage.store import Store

Status = Literal["ok", "later", "FAIL"]
CheckFn = Callable[[], tuple[Status, str]]
#: Environment variables that name an S3 endpoint (as patchgap.storage.store reads them).
ENDPOINT_ENV = ("PATCHGAP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
SAMPLE_CHARS = 60


@dataclass(frozen=True)
class Check:
    """One preflight check: what was checked, and its result or what to do."""

    what: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    def line(self) -> str:
        # A failure's detail names its file, section and key itself: it is the error line.
        if not self.ok:
            return f"FAIL  {self.detail}"
        return f"{self.status:<5} {self.what}: {self.detail}"


@dataclass
class Preflight:
    """The checks of one run YAML, in the order they ran; ``raw`` and ``settings`` are the
    validated YAML (None when the YAML itself failed)."""

    config_path: Path
    checks: list[Check] = field(default_factory=list)
    raw: dict[str, Any] | None = None
    settings: RunSettings | None = None
    seconds: float = 0.0

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        later = sum(c.status == "later" for c in self.checks)
        return (
            f"preflight of {self.config_path}: {len(self.checks)} checks, "
            f"{len(self.failures)} failed, {later} left to the run (later) "
            f"({self.seconds:.1f}s)"
        )

    def raise_for_failures(self) -> None:
        """A :class:`ConfigError` of one line: the failure itself when there is one, else the
        count and the first (every failure was printed as its own line already)."""
        bad = self.failures
        if not bad:
            return
        if len(bad) == 1:
            raise ConfigError(bad[0].detail)
        raise ConfigError(
            f"{self.config_path}: {len(bad)} preflight checks failed, each listed above with "
            f"its fix: {'; '.join(c.what for c in bad)}"
        )


def endpoint_configured() -> bool:
    """Whether an S3 endpoint is set in the environment (an embedded server is not yet up)."""
    return any(os.environ.get(name) for name in ENDPOINT_ENV)


def run_preflight(
    config_path: Path, *, docker: bool | None = None, hub_here: bool = True, say: Say = print
) -> Preflight:
    """Run every check of ``config_path`` and print one line each; never raises for a user
    mistake (see :meth:`Preflight.raise_for_failures`). ``docker`` None: as ``run.runner``.
    ``hub_here`` False: hub models are resolved elsewhere (pods), so this machine's HF cache
    does not matter."""
    path = Path(config_path)
    report = Preflight(path)
    t0 = time.time()

    def record(what: str, fn: CheckFn) -> Check:
        try:
            status, detail = fn()
        except Exception as err:  # a check reports any failure as its line
            status, detail = "FAIL", _one_line(err)
        check = Check(what, status, detail)
        report.checks.append(check)
        say(check.line())
        return check

    def config() -> tuple[Status, str]:
        report.raw, report.settings = load_run_settings(path)
        s = report.settings
        return "ok", f"{path} valid (pipeline {s.pipeline}, runner {s.runner}, bucket {s.bucket})"

    record("config", config)
    if report.raw is None or report.settings is None:
        report.seconds = time.time() - t0
        return report  # nothing else can be read from a YAML that does not validate
    raw, settings = report.raw, report.settings
    if settings.pipeline == "watch":
        record("data run.prefix", lambda: _check_prefix(settings))
    seen: dict[str, str] = {}
    for where, spec in dataset_sources(raw, settings, path):
        key = spec.model_dump_json()
        if key in seen:  # a stage's own copy of D: read once
            record(f"data {where}", lambda first=seen[key]: ("ok", f"the same source as {first}"))
            continue
        seen[key] = where
        record(f"data {where}", lambda s=spec, w=where: _check_dataset(path, w, s))
    for what, fn in evalset_checks(raw, path) if settings.pipeline != "watch" else []:
        record(what, fn)  # watch rewrites and gates only
    for what, fn in model_checks(raw, settings, path, hub_here=hub_here):
        record(what, fn)
    if settings.runner == "docker" if docker is None else docker:
        # Each needs the one before it: no images are looked up without an engine.
        for what, fn in docker_checks(settings.pipeline):
            if not record(what, fn).ok:
                break
    report.seconds = time.time() - t0
    return report


def check_and_prepare(
    config_path: Path,
    *,
    docker: bool = False,
    start_embedded_s3: bool = True,
    say: Say = print,
) -> PreparedRun:
    """What ``patchgap run`` and ``patchgap demo`` do before the pipeline: the preflight, then
    (only when it passed) the embedded S3, D staged and pi0 prepared. ``docker`` selects the
    Docker runner whatever ``run.runner`` says."""
    report = run_preflight(config_path, docker=docker or None, say=say)
    report.raise_for_failures()
    say(report.summary())
    prepared = prepare_run(config_path, start_embedded_s3=start_embedded_s3, say=say)
    if docker:
        prepared.settings = prepared.settings.model_copy(update={"runner": "docker"})
    return prepared


def _one_line(err: Exception) -> str:
    """An error as one line; one that is not a user error keeps its type for the bug report."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, PatchgapError) else f"{type(err).__name__}: {text}"


# ----------------------------------------------------------------------------- data sources


def dataset_sources(
    raw: dict[str, Any], settings: RunSettings, path: Path
) -> list[tuple[str, Any]]:
    """(where, DatasetSpec) of D and of every ``dataset:`` a stage section sets itself; a
    section's default dataset is not listed (the pipeline wires D in)."""
    out: list[tuple[str, Any]] = []
    if settings.dataset is not None:  # watch has none: it finds its datasets under the prefix
        out.append(
            ("run.dataset", validate(DatasetSpec, settings.dataset, f"{path} [run.dataset]"))
        )
    if settings.pipeline == "study":  # the swap arms' pool, staged beside D
        out.append(("study.swap_pool", study_settings(raw, path).swap_pool))
    for section in STAGES:
        sub = raw.get(section) or {}
        if not isinstance(sub, dict):
            continue
        cfg = section_config(stage_module(section).Config, raw, section, f"{path} [{section}]")
        for key in sub:
            value = getattr(cfg, key, None)
            if isinstance(value, DatasetSpec):
                out.append((f"{section}.{key}", value))
    return out


def _check_prefix(settings: RunSettings) -> tuple[Status, str]:
    """The watch pipeline's prefix: how many objects wait under it (read only)."""
    prefix = str(settings.prefix)
    if not endpoint_configured():
        return "later", f"{prefix}: listed when the store is up (no S3 endpoint set yet)"

    store = Store.from_env()
    found = [
        o for o in store.list_published(prefix) if not o.key.rsplit("/", 1)[-1].startswith("_")
    ]
    return "ok", f"{prefix}: {len(found)} object(s) under it now; the run takes the new ones"


def _check_dataset(path: Path, where: str, spec: Any) -> tuple[Status, str]:
    if spec.source.startswith("s3://") and not endpoint_configured():
        return "later", f"{spec.source}: read when the store is up (no S3 endpoint set yet)"
    try:
        with scratch_cache():
            result = load_records(spec, external=True)
    except Exception as err:  # named with the key it came from
        raise ConfigError(f"{path} [{where}]: {_one_line(err)}") from None
    c = result.counts
    counts = f"{c.read} read / {c.valid} valid / {c.rejected_total} rejected"
    if not result.records:
        first = result.rejects[0] if result.rejects else None
        why = f"; first reject {first.where}: {first.reason}" if first else ""
        raise ConfigError(
            f"{path} [{where}]: {spec.source} has no valid records ({counts}){why}; "
            "fix the source or its `fields:` (`patchgap data validate SOURCE` lists the rejects)"
        )
    rec = result.records[0]
    sample = f"{rec.id}: {_short(rec.question)} -> {_short(rec.answer, 24)}"
    return "ok", f"{spec.source} ({c.fields}): {counts}, {c.selected} used; sample {sample}"


def _short(text: str, limit: int = SAMPLE_CHARS) -> str:
    flat = " ".join(str(text).split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


@contextlib.contextmanager
def scratch_cache() -> Iterator[None]:
    """Point the cache at a temporary folder for the duration: an ``s3://`` source read by a
    check leaves no copy behind (the preflight writes nothing)."""
    old = os.environ.get(CACHE_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="patchgap-check-") as tmp:
        os.environ[CACHE_DIR_ENV] = tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(CACHE_DIR_ENV, None)
            else:
                os.environ[CACHE_DIR_ENV] = old


# ----------------------------------------------------------------------------- evaluation sets


def evalset_checks(raw: dict[str, Any], path: Path) -> list[tuple[str, CheckFn]]:
    """One check per evaluation set of the ``evaluate:`` section, each loaded with the evaluate
    stage's own functions on the whole set (the run then takes its seeded subset)."""
    source = f"{path} [evaluate]"
    cfg = section_config(ev.Config, raw, "evaluate", source)
    folder = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    checks: list[tuple[str, CheckFn]] = []
    checks += _math_set_checks(cfg, folder, source)
    checks += _choice_set_checks(cfg, folder, source)
    checks += _general_set_checks(cfg, folder, source)
    checks += _heldout_set_checks(cfg, folder, source)
    if cfg.drift.enabled and (cfg.drift.benchmarks or cfg.general):
        checks.append(
            (
                "eval drift",
                _guarded(
                    source, "drift", None, lambda: _drift(ev.drift_questions(cfg, folder), cfg)
                ),
            )
        )
    return checks


#: The evaluate config's overrides that load a whole set (the run takes its seeded subset).
_WHOLE_SET = {"limit": None, "limits": {}}


def _counted(items: list[Any], cfg: Any, key: str) -> tuple[Status, str]:
    """The verdict on a loaded set: its size, how many items the run uses, a sample item."""
    used = len(bm.subset_indices(len(items), cfg.limit_for(key), cfg.seed))
    first = items[0]
    text = getattr(first, "question", "")
    gold = getattr(first, "gold", getattr(first, "answer", ""))
    gold = first.gold_letter if isinstance(first, bm.MCItem) else gold
    sample = f"{first.id}: {_short(text)} -> {_short(str(gold), 24)}"
    return "ok", f"{len(items)} items, all valid; {used} used; sample {sample}"


def _guarded(source: str, where: str, location: str | None, load: CheckFn) -> CheckFn:
    """``load`` as a check: deferred while its S3 location has no endpoint, run in a scratch
    cache, and any failure a one-line ConfigError naming the config key it came from."""

    def check() -> tuple[Status, str]:
        if location and location.startswith("s3://") and not endpoint_configured():
            return "later", f"{location}: read when the store is up (no S3 endpoint set yet)"
        try:
            with scratch_cache():
                return load()
        except Exception as err:  # named with the key it came from
            raise ConfigError(f"{source} {where}: {_one_line(err)}") from None

    return check


def _math_set_checks(cfg: Any, folder: Path, source: str) -> list[tuple[str, CheckFn]]:
    """One check per ``math:`` set, named by its index and name."""
    checks: list[tuple[str, CheckFn]] = []
    for i, ms in enumerate(cfg.math):
        one = cfg.model_copy(update={"math": [ms], **_WHOLE_SET})
        where = f"math[{i}] {ms.name}" + (f" ({ms.path})" if ms.path else "")
        location = ms.path or cfg.benchmark_paths.get(ms.name)
        checks.append(
            (
                f"eval math {ms.name}",
                _guarded(
                    source,
                    where,
                    location,
                    lambda one=one, n=ms.name: _counted(ev._math_items(one, folder)[n], cfg, n),
                ),
            )
        )
    return checks


def _choice_set_checks(cfg: Any, folder: Path, source: str) -> list[tuple[str, CheckFn]]:
    """One check per ``choice:`` set (the generative multiple-choice sets)."""
    checks: list[tuple[str, CheckFn]] = []
    for name in cfg.choice:
        one = cfg.model_copy(update={"choice": [name], **_WHOLE_SET})
        checks.append(
            (
                f"eval choice {name}",
                _guarded(
                    source,
                    f"choice {name}",
                    cfg.benchmark_paths.get(name),
                    lambda one=one, n=name: _counted(
                        ev._choice_items(one, folder)[n], cfg, f"{n}_gen"
                    ),
                ),
            )
        )
    return checks


def _general_set_checks(cfg: Any, folder: Path, source: str) -> list[tuple[str, CheckFn]]:
    """One check per ``general:`` benchmark; lm-eval's own tasks are left for evaluate."""
    checks: list[tuple[str, CheckFn]] = []
    for name in cfg.general:
        if name not in bm.LM_EVAL_TASKS:
            checks.append(
                (
                    f"eval general {name}",
                    lambda n=name: (
                        "later",
                        f"an lm-eval task, not a project set: lm-eval fetches {n} at evaluate "
                        "(needs its data in the HF cache when offline)",
                    ),
                )
            )
            continue
        # The call lm_eval_general makes for a project task.
        checks.append(
            (
                f"eval general {name}",
                _guarded(
                    source,
                    f"general {name}",
                    cfg.benchmark_paths.get(name),
                    lambda n=name: _counted(
                        bm.load_mc_set(n, cfg.benchmark_paths.get(n), folder), cfg, n
                    ),
                ),
            )
        )
    return checks


def _heldout_set_checks(cfg: Any, folder: Path, source: str) -> list[tuple[str, CheckFn]]:
    """One check per held-out set, when the held-out NLL is on."""
    checks: list[tuple[str, CheckFn]] = []
    if not cfg.heldout.enabled:
        return checks
    for name in cfg.heldout.sets:
        one = cfg.model_copy(
            update={"heldout": cfg.heldout.model_copy(update={"sets": [name], "limit": None})}
        )
        checks.append(
            (
                f"eval heldout {name}",
                _guarded(
                    source,
                    f"heldout.sets {name}",
                    cfg.benchmark_paths.get(name),
                    lambda one=one, n=name: _heldout(ev.heldout_items(one, folder)[n], cfg),
                ),
            )
        )
    return checks


def _heldout(records: list[Any], cfg: Any) -> tuple[Status, str]:
    used = len(subset_indices(len(records), cfg.heldout.limit, cfg.seed))
    rec = records[0]
    sample = f"{rec.id}: {_short(rec.question)} -> {_short(rec.answer, 24)}"
    return "ok", f"{len(records)} problems with a solution; {used} used; sample {sample}"


def _drift(questions: list[tuple[str, str, str]], cfg: Any) -> tuple[Status, str]:
    if not questions:
        return "ok", "no project multiple-choice set to draw questions from: drift is skipped"
    sets = sorted({b for b, _, _ in questions})
    bench, item, text = questions[0]
    return "ok", (
        f"{len(questions)} questions from {', '.join(sets)}; sample {bench}/{item}: {_short(text)}"
    )


# ----------------------------------------------------------------------------- models


def model_checks(
    raw: dict[str, Any], settings: RunSettings, path: Path, *, hub_here: bool = True
) -> list[tuple[str, CheckFn]]:
    """One check per distinct model reference: pi0, the judge models and embedders of the
    reward sections, and the rewrite pipeline's adapter. Nothing is loaded or converted."""
    refs: dict[tuple[str, str], list[str]] = {}
    refs.setdefault(("model", str(raw.get("model", "smollm2"))), []).append("model")
    for section in STAGES:
        cfg = section_config(stage_module(section).Config, raw, section, f"{path} [{section}]")
        reward = getattr(cfg, "reward", None)
        if reward is None or not hasattr(reward, "embedder"):
            continue
        if section == "train_rewriter" and settings.pipeline == "rewrite":
            continue  # the rewrite pipeline trains no rewriter
        if reward.model_judge and reward.judge_model:
            refs.setdefault(("model", reward.judge_model), []).append(
                f"{section}.reward.judge_model"
            )
        refs.setdefault(("embedder", reward.embedder), []).append(f"{section}.reward.embedder")
    if settings.pipeline in ("rewrite", "watch") and settings.adapter_uri:
        refs.setdefault(("adapter", settings.adapter_uri), []).append("run.adapter_uri")
    checks: list[tuple[str, CheckFn]] = []
    for (kind, ref), keys in refs.items():
        where = f"{path} [{', '.join(keys)}]"
        checks.append(
            (
                f"{kind} {ref} [{', '.join(keys)}]",
                lambda k=kind, r=ref, w=where, key=keys[0]: _check_model(
                    k, r, w, key, settings, hub_here
                ),
            )
        )
    return checks


def _check_model(
    kind: str, ref: str, where: str, key: str, settings: RunSettings, hub_here: bool = True
) -> tuple[Status, str]:
    if kind == "model":
        spec = models.known_model(ref)
        if spec is not None:
            folder = models.models_cache_dir() / spec.folder
            if models.is_prepared(folder):
                return "ok", f"alias {spec.alias}, prepared at {folder}"
            try:
                gguf = models.smollm2_gguf_path()
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            why = models.stale_reason(folder)
            return "ok", f"alias {spec.alias}, {why}: the run converts {gguf.name}"
    if kind == "embedder":
        # Deferred: it loads numpy.
        from patchgap.reward.scoring import resolve_embedder

        try:
            local = resolve_embedder(ref)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if local != ref or Path(ref).expanduser().is_dir():
            return "ok", f"local folder {local}"
        return _check_hub(ref, where, key, settings, embedder=True, here=hub_here)
    if ref.startswith("s3://"):
        return _check_s3_model(ref, where, kind)
    local = Path(ref).expanduser()
    if local.is_dir():
        if kind == "model" and not (local / "config.json").is_file():
            raise ConfigError(f"{where}: {ref} has no config.json (not a transformers model)")
        if kind == "adapter" and not (local / "adapter_config.json").is_file():
            raise ConfigError(f"{where}: {ref} has no adapter_config.json (not a LoRA adapter)")
        return "ok", f"local folder {local}"
    if kind == "adapter" or ref.startswith(("/", "./", "../", "~")) or local.exists():
        raise ConfigError(f"{where}: {ref} does not exist (or is not a folder); fix the path")
    return _check_hub(ref, where, key, settings, embedder=False, here=hub_here)


def _check_s3_model(uri: str, where: str, kind: str) -> tuple[Status, str]:
    if not endpoint_configured():
        return "later", f"{uri}: its manifest is checked when the store is up (no endpoint set)"

    try:
        manifest = Store.from_env().read_manifest(uri)
    except Exception as err:  # unreachable store, bad bucket: one line
        raise ConfigError(f"{where}: {uri}: {_one_line(err)}") from None
    if manifest is None:
        raise ConfigError(
            f"{where}: {uri} has no _manifest.json, so it is not a complete {kind} folder; "
            f"upload one with `patchgap models push NAME {uri}`"
        )
    return "ok", f"{uri}: manifest with {len(manifest.files)} files"


def hub_offline() -> bool:
    """Whether the hub may not be asked (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


#: Seconds the preflight waits for the hub to say whether a model exists.
HUB_TIMEOUT_S = 10.0


def _ask_hub(repo_id: str) -> str | None:
    """``None`` when the hub has ``repo_id`` and lets this machine read it; else what is wrong,
    with its fix. One metadata request, no download."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "the hub refuses it (gated): accept its terms on the hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        return "the hub has no such model (or it is private: set HF_TOKEN); check the name"
    except HfHubHTTPError as err:
        return f"the hub answered {getattr(err.response, 'status_code', '?')}; retry later"
    except Exception as err:  # httpx/requests network errors: the hub cannot be reached
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return (
            f"the hub cannot be reached ({reason}): on a machine with hub access run "
            f"`patchgap models push {repo_id} s3://BUCKET/models/NAME` and use that URI, or "
            "copy the model folder here"
        )
    return None


def _check_hub(
    repo_id: str, where: str, key: str, settings: RunSettings, *, embedder: bool, here: bool
) -> tuple[Status, str]:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"{where}: {repo_id!r} is neither a local folder, an s3:// folder, a known alias "
            "nor a hub id (owner/name); fix the name"
        ) from None
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return "ok", f"hub id, in the local HF cache ({Path(cached).parent})"
    if not here:
        return "later", "hub id: resolved where the steps run (HF_TOKEN there for gated models)"
    if not hub_offline():
        answer = _ask_hub(repo_id)
        if answer is None:
            return (
                "later",
                "hub id, not in the local HF cache: on the hub, downloaded when a stage loads it",
            )
        raise ConfigError(f"{where}: hub id {repo_id} is not in the local HF cache and {answer}")
    if embedder:
        fix = (
            f"copy its folder to this machine and set {key} to that path, or allow the hub "
            "(unset HF_HUB_OFFLINE; set HF_TOKEN for gated models)"
        )
    else:
        name = repo_id.rsplit("/", 1)[-1].lower()
        fix = (
            f"on a machine with hub access run `patchgap models push {repo_id} "
            f"s3://{settings.bucket}/models/{name}` and set {key}: to that URI, or allow the hub "
            "(unset HF_HUB_OFFLINE; set HF_TOKEN for gated models)"
        )
    raise ConfigError(
        f"{where}: hub id {repo_id} is not in the local HF cache and HF_HUB_OFFLINE=1; {fix}"
    )


# ----------------------------------------------------------------------------- containers


def docker_checks(pipeline: str) -> list[tuple[str, CheckFn]]:
    """The Docker runner's checks that need no store: the engine answers, the images exist."""
    state: dict[str, Any] = {}

    def engine() -> tuple[Status, str]:
        state["client"] = engine_client()
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return "ok", f"answers at {where}"

    def images() -> tuple[Status, str]:
        client = state["client"]
        try:
            refs = check_images(client, pipeline)
        finally:
            client.close()
        return "ok", f"{len(refs)} built: {', '.join(refs)}"

    return [("docker engine", engine), (f"docker images ({pipeline})", images)]
