"""The preflight's checks that need no store and no data directory: each failure is one line
naming the file, the key and what to do; a YAML that does not validate stops the checks at once;
several failures are each listed and summed up in one error line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from patchgap.errors import ConfigError
from patchgap.run.preflight import ENDPOINT_ENV, run_preflight, scratch_cache

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "records"
#: No evaluation set, so that no data directory is needed.
NO_EVAL = {"math": [], "general": [], "heldout": {"enabled": False}, "drift": {"enabled": False}}


@pytest.fixture(autouse=True)
def _no_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def _write(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cfg(tmp: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": str(_model(tmp / "pi0")),
        "run": {"dataset": {"source": str(ASSETS / "gsm8k_mini.jsonl"), "fields": "gsm8k"}},
        "evaluate": NO_EVAL,
    }
    return {**cfg, **over}


def _check(path: Path, **kwargs: Any) -> tuple[Any, list[str]]:
    lines: list[str] = []
    return run_preflight(path, say=lines.append, **kwargs), lines


def test_a_good_config_passes_with_counts_and_a_sample(tmp_path: Path) -> None:
    report, lines = _check(_write(tmp_path, _cfg(tmp_path)))
    assert not report.failures, lines
    data = next(line for line in lines if line.startswith("ok    data run.dataset"))
    assert "(gsm8k): 3 read / 3 valid / 0 rejected, 3 used; sample " in data
    assert f"ok    model {tmp_path / 'pi0'} [model]: local folder" in lines[-2]
    assert lines[-1].startswith("ok    embedder all-MiniLM-L6-v2 [train_rewriter.reward.embedder")
    report.raise_for_failures()  # nothing to raise


def test_an_invalid_yaml_is_one_line_and_stops_the_checks(tmp_path: Path) -> None:
    path = _write(tmp_path, _cfg(tmp_path, gatee={}))
    report, lines = _check(path)
    assert len(lines) == 1
    assert lines[0].startswith(f"FAIL  {path}: unknown top-level key 'gatee'")
    assert len(report.checks) == 1
    with pytest.raises(ConfigError, match="unknown top-level key 'gatee'"):
        report.raise_for_failures()


def test_a_source_without_valid_records_names_its_key_and_first_reject(tmp_path: Path) -> None:
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"question": "no answer"}) + "\n")
    run = {"dataset": {"source": str(bad), "fields": "gsm8k"}}
    path = _write(tmp_path, _cfg(tmp_path, run=run))
    report, lines = _check(path)
    (fail,) = [line for line in lines if line.startswith("FAIL")]
    assert fail.startswith(f"FAIL  {path} [run.dataset]: {bad} has no valid records (1 read / 0 ")
    assert f"first reject {bad}:1: " in fail and "patchgap data validate" in fail
    assert [c.what for c in report.failures] == ["data run.dataset"]


def test_a_stage_dataset_is_read_too_and_a_copy_of_d_only_once(tmp_path: Path) -> None:
    d = {"source": str(ASSETS / "gsm8k_mini.jsonl"), "fields": "gsm8k"}
    path = _write(tmp_path, _cfg(tmp_path, train_rewriter={"dataset": d}))
    _, lines = _check(path)
    assert "ok    data train_rewriter.dataset: the same source as run.dataset" in lines
    path = _write(
        tmp_path, _cfg(tmp_path, train_rewriter={"dataset": {"source": "nonesuch.jsonl"}})
    )
    report, lines = _check(path)
    assert f"FAIL  {path} [train_rewriter.dataset]: nonesuch.jsonl: no such file or folder" in lines
    assert len(report.failures) == 1


def test_model_references_fail_one_line_each_and_are_summed_up(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = _cfg(
        tmp_path,
        model=str(tmp_path / "empty"),
        run={
            "pipeline": "rewrite",
            "dataset": {"source": str(ASSETS / "gsm8k_mini.jsonl"), "fields": "gsm8k"},
            "adapter_uri": str(tmp_path / "no-adapter"),
        },
        gate={"reward": {"judge_kind": "pi0", "judge_model": "not a hub id!", "embedder": "./x"}},
    )
    path = _write(tmp_path, cfg)
    report, lines = _check(path)
    fails = [line for line in lines if line.startswith("FAIL")]
    assert fails == [
        f"FAIL  {path} [model]: {tmp_path / 'empty'} has no config.json (not a transformers model)",
        f"FAIL  {path} [gate.reward.judge_model]: 'not a hub id!' is neither a local folder, an "
        "s3:// folder, a known alias nor a hub id (owner/name); fix the name",
        f"FAIL  {path} [gate.reward.embedder]: embedder folder ./x does not exist",
        f"FAIL  {path} [run.adapter_uri]: {tmp_path / 'no-adapter'} does not exist (or is not a "
        "folder); fix the path",
    ]
    # The rewrite pipeline trains no rewriter: its reward section's models are not asked for.
    assert not any("train_rewriter" in line for line in lines)
    with pytest.raises(ConfigError) as err:
        report.raise_for_failures()
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: 4 preflight checks failed, each listed above")


def test_s3_models_wait_for_the_store_and_hub_ids_for_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(tmp_path, model="s3://patchgap/models/pi0")
    cfg["gate"] = {"reward": {"embedder": "someone/not-cached-embedder"}}
    path = _write(tmp_path, cfg)
    report, lines = _check(path)
    assert (
        "later model s3://patchgap/models/pi0 [model]: s3://patchgap/models/pi0: its manifest is "
        "checked when the store is up (no endpoint set)"
    ) in lines
    (fail,) = [line for line in lines if line.startswith("FAIL")]
    assert fail.startswith(
        f"FAIL  {path} [gate.reward.embedder]: hub id someone/not-cached-embedder is not in the "
        "local HF cache and HF_HUB_OFFLINE=1; copy its folder"
    )
    # Steps that run elsewhere (a cluster submission) resolve hub ids there.
    report, lines = _check(path, hub_here=False)
    assert not report.failures and "2 left to the run (later)" in report.summary()
    assert any("hub id: resolved where the steps run" in line for line in lines)
    # With the hub allowed, the hub's own answer decides (the real request is tested against a
    # closed loopback port in tests/integration/test_preflight.py; no test asks the real hub).
    from patchgap.run import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(preflight, "_ask_hub", lambda repo_id: None)
    report, lines = _check(path)
    assert not report.failures and "2 left to the run (later)" in report.summary()
    assert any("on the hub, downloaded when a stage loads it" in line for line in lines)
    monkeypatch.setattr(preflight, "_ask_hub", lambda repo_id: "the hub cannot be reached (x)")
    report, lines = _check(path)
    (fail,) = [line for line in lines if line.startswith("FAIL")]
    assert "someone/not-cached-embedder is not in the local HF cache and the hub cannot" in fail


def test_no_container_engine_is_one_line_and_no_image_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    report, lines = _check(_write(tmp_path, _cfg(tmp_path)), docker=True)
    (fail,) = [line for line in lines if line.startswith("FAIL")]
    assert fail.startswith("FAIL  no container engine answers at unix://")
    assert "podman system service" in fail
    assert report.checks[-1].what == "docker engine"  # the images are not looked up


def test_scratch_cache_leaves_the_cache_setting_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHGAP_CACHE_DIR", "/somewhere")
    with scratch_cache():
        inside = os.environ["PATCHGAP_CACHE_DIR"]
        assert Path(inside).is_dir()
    assert os.environ["PATCHGAP_CACHE_DIR"] == "/somewhere" and not Path(inside).exists()
