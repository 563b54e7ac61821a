"""Every shipped config runs: each run YAML in configs/ is shrunk by the table in
:mod:`config_runs.shrink` (sizes, CPU replacements for GPU-only settings, offline stand-ins; the
substitutions are printed) and run end to end with ``patchgap run`` under kfp.local's subprocess
runner, on the tests' real SeaweedFS with a tiny random pi0; the run must succeed and publish its
manifest, D_R and report in the bucket. Each accelerate config parses with accelerate's loader.

A config that gains a key the shrink table does not know fails here, so no new setting is left
out of the run unnoticed (``make test-configs``; CI runs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from config_runs.shrink import HUB_STAND_INS, TABLE, Context, shrink, stand_in_is_documented
from config_runs.shrink import unknown_keys as unknown_keys_of

pytestmark = pytest.mark.configs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RUN_YAMLS = sorted(CONFIGS.glob("*.yaml"))
ACCELERATE_YAMLS = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def _read(path: Path) -> dict[str, Any]:
    from patchgap.config import read_yaml

    return read_yaml(path)


def _runnable_pipelines() -> tuple[str, ...]:
    from typing import get_args

    from patchgap.run.prepare import RunSettings

    return get_args(RunSettings.model_fields["pipeline"].annotation)


def _run_params() -> list[Any]:
    """One param per run YAML; a pipeline kind `patchgap run` cannot run yet is an xfail."""
    params = []
    for path in RUN_YAMLS:
        kind = (_read(path).get("run") or {}).get("pipeline", "full")
        marks = []
        if kind not in _runnable_pipelines():
            reason = f"`patchgap run` does not run the {kind!r} pipeline yet"
            marks.append(pytest.mark.xfail(reason=reason, strict=True))
        params.append(pytest.param(path, id=path.name, marks=marks))
    return params


def test_there_are_run_yamls() -> None:
    assert {"demo.yaml", "repro-small.yaml", "paper.yaml", "watch.yaml"} <= {
        p.name for p in RUN_YAMLS
    }


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: p.name)
def test_the_shrink_table_knows_every_key(path: Path) -> None:
    unknown = unknown_keys_of(_read(path))
    assert not unknown, (
        f"{path.name}: add these keys to tests/config_runs/shrink.py (a rule or KEEP): {unknown}"
    )


def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        kind = field.annotation
        out.add(prefix + name)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out |= _field_paths(kind, f"{prefix}{name}.")
    return out


def test_every_table_key_is_a_setting() -> None:
    """No stale or misspelt entry: each key of the table is a field of its section."""
    import importlib

    from patchgap.data.sources import DatasetSpec
    from patchgap.run.prepare import RunSettings
    from patchgap.stages import STAGES
    from patchgap.stages.base import SHARED_KEYS
    from patchgap.study.config import StudySettings

    known = set(SHARED_KEYS)
    known |= {f"run.{p}" for p in _field_paths(RunSettings)}
    known |= {f"run.dataset.{p}" for p in _field_paths(DatasetSpec)}
    for section in STAGES:
        config = importlib.import_module(f"patchgap.stages.{section}").Config
        known |= {f"{section}.{p}" for p in _field_paths(config)}
    known |= {f"study.{p}" for p in _field_paths(StudySettings)}
    assert sorted(set(TABLE) - known) == []


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: p.name)
def test_hub_datasets_name_their_stand_in(path: Path) -> None:
    """The stand-in the test swaps in is the one the config tells its users about."""
    text = path.read_text(encoding="utf-8")
    for hub in HUB_STAND_INS:
        if hub in text:
            assert stand_in_is_documented(text, hub), (
                f"{path.name}: say in a comment which local set stands in for {hub} "
                f"(`source: {HUB_STAND_INS[hub]}`)"
            )


@pytest.mark.parametrize("path", _run_params())
def test_config_runs_shrunk(
    path: Path,
    tmp_path: Path,
    tiny_llama_long: Path,
    s3_server,
    s3_bucket: str,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from patchgap.stages.gate import D_R_FILE

    ctx = Context(model=str(tiny_llama_long), model_name="tiny-llama", bucket=s3_bucket)
    shrunk, changes = shrink(_read(path), ctx)
    with capsys.disabled():
        print(f"\n{path.name}: {len(changes)} substitutions")
        for change in changes:
            print(f"  {path.name}: {change}")
    config = tmp_path / path.name
    config.write_text(yaml.safe_dump(shrunk, sort_keys=False))

    monkeypatch.setenv("PATCHGAP_HOME", str(tmp_path / "home"))
    watch = shrunk["run"].get("pipeline") == "watch"
    if watch:  # two new datasets land under the prefix before the run
        for i, name in enumerate(("a", "b")):
            uri = f"{shrunk['run']['prefix']}{name}.jsonl"
            _drop_dataset(s3_server.store, data_dir, uri, offset=i * WATCH_RECORDS)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "patchgap.cli.main", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    with capsys.disabled():
        print(f"  {path.name}: patchgap run exited {proc.returncode} in {seconds:.0f} s")
    log = tmp_path / "run.log"
    log.write_text(proc.stdout + "\n" + proc.stderr)
    assert proc.returncode == 0, f"{path.name}: patchgap run failed\n{_failure(log)}"

    store = s3_server.store
    runs = [o.uri for o in store.list(f"s3://{s3_bucket}/runs/") if o.uri.endswith("/run.json")]
    assert len(runs) == 1, runs
    prefix = runs[0].removesuffix("/run.json")
    run = json.loads(store.get_bytes(f"{prefix}/run.json"))
    assert run["status"] == "succeeded" and run["pipeline"] == shrunk["run"]["pipeline"]
    assert run["config"] == json.loads(json.dumps(shrunk))
    if watch:
        _check_watch_run(run, store, shrunk)
        return
    assert run["inputs"]["dataset_counts"]["selected"] >= 1

    art = store.read_manifest(f"{prefix}/artifacts")
    assert art is not None
    keys = [str(k) for k in art.files]
    # D_R from each gate (the RL rewriter's, and the prompt-only one's when asked for; the
    # study always runs both): one line per record of the staged D, rewritten or fallen back.
    study = shrunk["run"].get("pipeline") == "study"
    prompt_only = bool(shrunk["run"].get("prompt_only_baseline")) or study
    d_r = [k for k in keys if k.endswith(f"/dataset_r/{D_R_FILE}")]
    assert len(d_r) == 1 + prompt_only, f"D_R files among the artifacts: {d_r}"
    selected = run["inputs"]["dataset_counts"]["selected"]
    for key in d_r:
        lines = store.get_published(f"{prefix}/artifacts/{key}").decode().splitlines()
        assert len(lines) == selected, key
    for name in ("results.json", "report.html"):
        hits = [k for k in keys if k.endswith(f"/{name}")]
        assert hits, f"no {name} among the artifacts"
    results_key = next(k for k in keys if k.endswith("/results.json"))
    results = json.loads(store.get_published(f"{prefix}/artifacts/{results_key}"))
    labels = json.dumps(results)
    if study:
        _check_study_run(store, f"{prefix}/artifacts", keys, shrunk, labels)
        return
    rows = ["base", "sft_d", "sft_dr"] + (["sft_dr_prompt"] if prompt_only else [])
    for label in rows:
        assert label in labels, label


#: Records per dataset the watch run finds under its prefix.
WATCH_RECORDS = 3


def _drop_dataset(store: Any, data_dir: Path, uri: str, offset: int) -> None:
    """GSM8K test problems from ``offset`` on, as a user's raw JSONL, put where the watch
    pipeline looks (other offsets: other content, so other datasets to the ledger)."""
    lines = (data_dir / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    body = "\n".join(lines[offset : offset + WATCH_RECORDS]) + "\n"
    store.put_bytes(body.encode(), uri)


def _check_watch_run(run: dict[str, Any], store: Any, shrunk: dict[str, Any]) -> None:
    """Both datasets under the prefix were claimed, staged, rewritten, gated and recorded."""
    summary = run["watch"]
    assert len(summary["claimed"]) == 2, summary
    for row in summary["datasets"]:
        assert row["stopped_at"] is None and row["rewritten"], row
        assert row["records_valid"] == WATCH_RECORDS, row
    ledger = [o.key for o in store.list(shrunk["run"]["ledger_uri"])]
    recorded = [k for k in ledger if "/" not in k and len(k) == len("0" * 64 + ".json")]
    assert len(recorded) == 2, ledger
    assert not [k for k in ledger if k.startswith("claims/")], ledger  # released once recorded


def _check_study_run(
    store: Any, artifacts: str, keys: list[str], shrunk: dict[str, Any], labels: str
) -> None:
    """The arms of the study section, one SFT job per arm with records and seed, every job's
    final model among the evaluated labels beside pi0, and the report."""
    from patchgap.study.config import StudySettings

    settings = StudySettings(**shrunk.get("study", {}))
    arms_key = next(k for k in keys if k.endswith("/arms/arms.json"))
    described = json.loads(store.get_published(f"{artifacts}/{arms_key}"))
    arms = described["arms"]
    assert list(arms) == settings.arms
    with_records = [a for a in settings.arms if arms[a]["records"]]
    assert {"d", "dr"} <= set(with_records) or not {"d", "dr"} & set(settings.arms)
    jobs = {(j["arm"], j["seed"]) for j in described["jobs"]}
    assert jobs == {(a, s) for a in with_records for s in settings.seeds}
    assert '"base"' in labels
    for arm, seed in jobs:
        assert f'"{arm}.s{seed}.step' in labels, (arm, seed)
    for name in ("study.json", "study.md", "frontiers.png", "reward_curve.png"):
        assert [k for k in keys if k.endswith(f"/study/{name}")], name


def _failure(log: Path) -> str:
    """The lines of a failed run's output that say why (the stage's error), then its end: the
    kfp.local output is long, and the reason sits in the middle."""
    lines = log.read_text(errors="replace").splitlines()
    why = [ln for ln in lines if "Error" in ln or "error:" in ln or "Traceback" in ln]
    return "\n".join([*why[:40], "...", *lines[-40:], f"(whole output: {log})"])


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_config_parses(path: Path) -> None:
    """accelerate launch configs are not run YAMLs: each must load with accelerate's own loader
    (running several processes is not part of this tier)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type is not None and config.num_processes >= 1
