"""``patchgap run --check`` and the preflight every run starts with: a broken input fails in
seconds, as one line naming the file, section and key, before any store starts or anything is
written; the shipped configs pass; ``s3://`` inputs are checked against a real store when one is
configured; custom local evaluation sets reach S3 for runs whose steps see no host folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets" / "records"
ENDPOINT_ENV = ("PATCHGAP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _olympiad_set(path: Path) -> Path:
    """Three olympiad-style problems whose final answer is a one-element list."""
    rows = [
        {"id": f"p{i}", "problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}."}
        | {"final_answer": [str(i + 1)]}
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_yaml(tmp: Path, evalset: Path, fields: dict[str, Any], **extra: Any) -> Path:
    cfg = {
        "model": "smollm2",
        "run": {"dataset": {"source": "gsm8k:train", "limit": 8, "seed": 0}},
        "gate": {"reward": {"judge": False}},
        "evaluate": {
            "math": [{"name": "olympiad", "path": str(evalset), "fields": fields}],
            "general": [],
            "heldout": {"sets": ["gsm8k"], "limit": 4},
        },
        **extra,
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _patchgap(
    args: list[str], tmp: Path, data_dir: Path, **env: str
) -> subprocess.CompletedProcess:
    """The installed command in a fresh process, with its state and cache folders in ``tmp`` and
    no S3 endpoint: whatever it starts or writes lands there."""
    base = {k: v for k, v in os.environ.items() if k not in ENDPOINT_ENV}
    base.update(
        {
            "PATCHGAP_HOME": str(tmp / "home"),
            "PATCHGAP_CACHE_DIR": str(tmp / "cache"),
            "PATCHGAP_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1",
            **env,
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "patchgap.cli.main", *args],
        capture_output=True,
        text=True,
        env=base,
        cwd=tmp,
        timeout=300,
    )


FIELDS = {"question": "problem", "solution": "solution", "answer": "final_answer"}


@pytest.mark.parametrize("check", [True, False], ids=["run --check", "run"])
def test_list_answer_without_lists_fails_in_seconds_before_any_store(
    tmp_path: Path, data_dir: Path, check: bool
) -> None:
    cfg = _run_yaml(tmp_path, _olympiad_set(tmp_path / "olympiad.jsonl"), FIELDS)
    t0 = time.monotonic()
    res = _patchgap(
        ["run", *(["--check"] if check else []), "--config", str(cfg)], tmp_path, data_dir
    )
    seconds = time.monotonic() - t0
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    fails = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1, res.stdout
    # One line naming the file, the section and entry, the record, and the fix.
    line = fails[0]
    assert f"{cfg} [evaluate] math[0] olympiad" in line
    assert "olympiad.jsonl:1: field 'final_answer' (answer) is a list" in line
    assert "set lists: {answer: join|first|last}" in line
    assert res.stderr.strip().splitlines() == [f"error: {line.removeprefix('FAIL  ')}"]
    # The checks before and after it still ran and said so, D with its counts.
    assert "ok    data run.dataset: gsm8k:train (gsm8k): 7473 read / 7473 valid" in res.stdout
    assert "ok    eval heldout gsm8k" in res.stdout
    # Nothing started, nothing written: no S3 server state, no model conversion.
    assert not (tmp_path / "home").exists() and not (tmp_path / "cache").exists()
    # Seconds, not a staged dataset or a converted model: a generous bound for a loaded machine.
    assert seconds < 60, seconds


def test_the_same_set_with_lists_passes_and_shows_a_sample(tmp_path: Path, data_dir: Path) -> None:
    evalset = _olympiad_set(tmp_path / "olympiad.jsonl")
    cfg = _run_yaml(tmp_path, evalset, {**FIELDS, "lists": {"answer": "first"}})
    res = _patchgap(["run", "--check", "--config", str(cfg)], tmp_path, data_dir)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "ok    eval math olympiad: 3 items, all valid; 3 used; sample " in res.stdout
    assert "'What is 0 + 1?' -> '1'" in res.stdout
    assert f"preflight of {cfg}: " in res.stdout.splitlines()[-1]
    assert " 0 failed" in res.stdout
    assert not (tmp_path / "home").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["demo.yaml", "repro-small.yaml"])
def test_shipped_configs_pass_without_writing(tmp_path: Path, data_dir: Path, name: str) -> None:
    res = _patchgap(
        ["run", "--check", "--config", str(ROOT / "configs" / name)], tmp_path, data_dir
    )
    assert res.returncode == 0, (res.stdout, res.stderr)
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"ok    config: {ROOT / 'configs' / name} valid")
    for what in ("data run.dataset", "eval math gsm8k", "eval general hellaswag", "model smollm2"):
        assert any(line.startswith(f"ok    {what}") for line in lines), what
    # The alias is not converted by a check, only found (the cache folder is never created).
    assert not (tmp_path / "cache").exists() and not (tmp_path / "home").exists()


def test_paper_settings_name_only_the_hub_models_a_machine_without_hub_lacks(
    tmp_path: Path, data_dir: Path
) -> None:
    from huggingface_hub import try_to_load_from_cache

    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    for repo in (paper["model"], paper["gate"]["reward"]["embedder"]):
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            pytest.skip(f"{repo} is in this machine's HF cache")
    # As shipped, D is NuminaMath-CoT from the hub: without the hub that is one line more, with
    # its fix, and nothing about the config's shape.
    shipped = _patchgap(
        ["run", "--check", "--config", str(ROOT / "configs" / "paper.yaml")], tmp_path, data_dir
    )
    assert shipped.returncode == 2, (shipped.stdout, shipped.stderr)
    fails = [line for line in shipped.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 3 and "ok    config:" in shipped.stdout, shipped.stdout
    assert "[run.dataset]: hf://AI-MO/NuminaMath-CoT [train]: cannot load from the hub" in fails[0]
    assert "$PATCHGAP_HUB_DIR/AI-MO/NuminaMath-CoT/ or use a local source" in fails[0]
    # With the local stand-in its comment names, only the hub models are left.
    assert "source: math_train" in (ROOT / "configs" / "paper.yaml").read_text()
    paper["run"]["dataset"] = {"source": "math_train"}
    cfg = tmp_path / "paper.yaml"
    cfg.write_text(yaml.safe_dump(paper, sort_keys=False))
    res = _patchgap(["run", "--check", "--config", str(cfg)], tmp_path, data_dir)
    assert res.returncode == 2, (res.stdout, res.stderr)
    fails = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == [
        f"FAIL  {cfg} [model]: hub id mistralai/Mistral-7B-Instruct-v0.3 is not in the local HF "
        "cache and HF_HUB_OFFLINE=1; on a machine with hub access run `patchgap models push "
        "mistralai/Mistral-7B-Instruct-v0.3 s3://patchgap/models/mistral-7b-instruct-v0.3` and "
        "set model: to that URI, or allow the hub (unset HF_HUB_OFFLINE; set HF_TOKEN for gated "
        "models)",
        f"FAIL  {cfg} [gate.reward.embedder]: hub id Qwen/Qwen3-Embedding-0.6B is not in the "
        "local HF cache and HF_HUB_OFFLINE=1; copy its folder to this machine and set "
        "gate.reward.embedder to that path, or allow the hub (unset HF_HUB_OFFLINE; set HF_TOKEN "
        "for gated models)",
    ]
    assert "ok    config:" in res.stdout and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # With the hub allowed but not answering (a closed loopback port stands in for a machine
    # without hub access), the check asks it and names the same models, in seconds.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    started = time.monotonic()
    online = _patchgap(
        ["run", "--check", "-c", str(cfg)],
        tmp_path,
        data_dir,
        HF_HUB_OFFLINE="",
        HF_ENDPOINT=f"http://127.0.0.1:{closed}",
    )
    assert time.monotonic() - started < 60
    assert online.returncode == 2, (online.stdout, online.stderr)
    fails = [line for line in online.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2, online.stdout
    assert (
        "hub id mistralai/Mistral-7B-Instruct-v0.3 is not in the local HF cache and the hub "
        "cannot be reached" in fails[0]
    )
    assert "Qwen/Qwen3-Embedding-0.6B" in fails[1] and "Traceback" not in online.stderr


# ----------------------------------------------------------------------------- with a store


def test_s3_inputs_are_checked_against_the_store(
    tmp_path: Path, data_dir: Path, s3_server: Any, s3_bucket: str
) -> None:
    from patchgap.run.preflight import run_preflight

    store = s3_server.store
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mini.jsonl").write_bytes((ASSETS / "gsm8k_mini.jsonl").read_bytes())
    store.upload_dir(tmp_path / "d", f"s3://{s3_bucket}/datasets/mini")
    evalset = _olympiad_set(tmp_path / "olympiad.jsonl")
    store.put_file(evalset, f"s3://{s3_bucket}/evalsets/olympiad.jsonl")
    adapter = f"s3://{s3_bucket}/adapters/none"
    cfg = _run_yaml(
        tmp_path,
        Path("unused"),
        FIELDS,
        run={
            "pipeline": "rewrite",
            "bucket": s3_bucket,
            "dataset": {"source": f"s3://{s3_bucket}/datasets/mini/mini.jsonl", "fields": "gsm8k"},
            "adapter_uri": adapter,
        },
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["evaluate"]["math"][0]["path"] = f"s3://{s3_bucket}/evalsets/olympiad.jsonl"
    cfg.write_text(yaml.safe_dump(raw))
    lines: list[str] = []
    report = run_preflight(cfg, say=lines.append)
    text = "\n".join(lines)
    # D is read from the store through its field map; the eval set's list answer is caught there.
    assert f"ok    data run.dataset: s3://{s3_bucket}/datasets/mini/mini.jsonl (gsm8k): " in text
    assert "olympiad.jsonl:1: field 'final_answer' (answer) is a list" in text
    assert (
        f"FAIL  {cfg} [run.adapter_uri]: {adapter} has no _manifest.json, so it is not a "
        f"complete adapter folder; upload one with `patchgap models push NAME {adapter}`"
    ) in lines
    assert [c.what.split(" ")[0] for c in report.failures] == ["eval", "adapter"]

    # Without an endpoint the same s3:// inputs are left for when the store is up.
    mp = pytest.MonkeyPatch()
    try:
        for name in ENDPOINT_ENV:
            mp.delenv(name, raising=False)
        later: list[str] = []
        offline = run_preflight(cfg, say=later.append)
    finally:
        mp.undo()
    assert not offline.failures, later
    assert sum(line.startswith("later") for line in later) == 3, later


def test_custom_local_evalsets_go_to_s3_and_load_from_there(
    tmp_path: Path, data_dir: Path, s3_server: Any, s3_bucket: str
) -> None:
    from patchgap.run.inputs import evalsets_to_s3
    from patchgap.stages import evaluate as ev
    from patchgap.stages.base import section_config

    evalset = _olympiad_set(tmp_path / "olympiad.jsonl")
    cfg = _run_yaml(tmp_path, evalset, {**FIELDS, "lists": {"answer": "first"}})
    raw = yaml.safe_load(cfg.read_text())
    raw["evaluate"]["math"].insert(0, "gsm8k")
    lines: list[str] = []
    moved = evalsets_to_s3(raw, s3_bucket, str(cfg), lines.append)
    section = moved["evaluate"]
    uri = f"s3://{s3_bucket}/benchmarks/custom/olympiad/olympiad.jsonl"
    assert section["math"][0] == "gsm8k" and section["math"][1]["path"] == uri
    assert section["math"][1]["fields"]["lists"] == {"answer": "first"}
    assert section["benchmark_paths"]["gsm8k"] == f"s3://{s3_bucket}/benchmarks/gsm8k/test.jsonl"
    assert raw["evaluate"]["math"][1]["path"] == str(evalset)  # the caller's config is kept
    # What the evaluate stage reads from the copies, with no data directory: the same items.
    here = section_config(ev.Config, raw, "evaluate", "here")
    there = section_config(ev.Config, moved, "evaluate", "there")
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("PATCHGAP_CACHE_DIR", str(tmp_path / "cache"))
        from_s3 = ev._math_items(there, tmp_path / "no-data-dir")
    finally:
        mp.undo()
    assert from_s3 == ev._math_items(here, data_dir)


def test_submit_config_checks_puts_local_inputs_in_s3_and_sends_the_arguments(
    tmp_path: Path, data_dir: Path, tiny_llama: Path, s3_server: Any, s3_bucket: str, fake_kfp: Any
) -> None:
    from typer.testing import CliRunner

    from patchgap.cli.main import cli

    store = s3_server.store
    evalset = _olympiad_set(tmp_path / "olympiad.jsonl")
    cfg = _run_yaml(
        tmp_path,
        evalset,
        {**FIELDS, "lists": {"answer": "first"}},
        run={"bucket": s3_bucket, "dataset": {"source": "gsm8k:train", "limit": 8, "seed": 0}},
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = str(tiny_llama)
    cfg.write_text(yaml.safe_dump(raw))
    args = ["submit", "--config", str(cfg), "--host", fake_kfp.url, "-p", "num_shards=3"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "preflight of" in res.output and "run id: run-0001" in res.output
    (run,) = fake_kfp.find("POST", "/apis/v2beta1/runs")
    assert '"name": "patchgap-full"' in json.dumps(run.body["pipeline_spec"])
    params = run.body["runtime_config"]["parameters"]
    assert params["num_shards"] == 3  # --param wins over the run YAML
    assert params["dataset_uri"].startswith(f"s3://{s3_bucket}/datasets/") and store.exists(
        params["dataset_uri"]
    )
    model_uri = f"s3://{s3_bucket}/models/{tiny_llama.name}"
    assert json.loads(params["sft_config"])["model"] == model_uri
    assert store.read_manifest(model_uri) is not None
    evaluate = json.loads(params["evaluate_config"])
    (custom,) = evaluate["math"]
    assert custom["path"] == f"s3://{s3_bucket}/benchmarks/custom/olympiad/olympiad.jsonl"
    assert store.exists(custom["path"])
    assert evaluate["benchmark_paths"]["gsm8k"] == f"s3://{s3_bucket}/benchmarks/gsm8k/test.jsonl"

    # A run YAML that fails its preflight uploads and submits nothing.
    before = len(fake_kfp.requests)
    raw["evaluate"]["math"][0]["fields"] = FIELDS
    cfg.write_text(yaml.safe_dump(raw))
    bad = CliRunner().invoke(cli, ["submit", "--config", str(cfg), "--host", fake_kfp.url])
    assert bad.exit_code == 2 and "set lists: {answer: join|first|last}" in bad.output
    assert len(fake_kfp.requests) == before
