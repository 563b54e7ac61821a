"""The ``full`` pipeline end to end under kfp.local (subprocess runner) with a tiny random model
on the real embedded S3: every stage runs, the run manifest and the artifacts land in the bucket,
and the same run YAML run again (as after a crash) finds the first run's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "records"


def _config(tmp: Path, model: Path, bucket: str, *, prompt_only: bool) -> Path:
    dataset = {"source": str(ASSETS / "gsm8k_mini.jsonl"), "fields": "gsm8k"}
    cfg = {
        "model": str(model),
        "seed": 0,
        "run": {
            "pipeline": "full",
            "bucket": bucket,
            "dataset": dataset,
            "num_shards": 2,
            "min_acceptance_rate": 0.0,
            "prompt_only_baseline": prompt_only,
        },
        "train_rewriter": {
            "dataset": dict(dataset),  # a copy: the same object twice is a YAML alias, refused
            "num_generations": 2,
            "prompts_per_step": 2,
            "per_device_batch_size": 2,
            "max_prompt_length": 256,
            "max_completion_length": 8,
            "max_steps": 2,
            "checkpoint_uri": f"s3://{bucket}/checkpoints/rewriter",
            "checkpoint_every": 1,
        },
        "rewrite": {
            "generation": {"max_new_tokens": 8, "batch_size": 4},
            "state_uri": f"s3://{bucket}/state",
        },
        "gate": {"batch_records": 4},
        "sft": {"max_length": 256, "num_epochs": 1, "per_device_batch_size": 2},
        "evaluate": {
            "math": ["gsm8k"],
            "general": ["arc_easy"],
            "limit": 3,
            "generation": {"max_new_tokens": 8},
            "bootstrap_reps": 100,
        },
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# Two pipeline runs: twice the suite's 900 s limit, for a loaded 2-core machine.
@pytest.mark.timeout(1800)
def test_full_pipeline_runs_and_publishes_the_run(
    tmp_path: Path, tiny_llama: Path, s3_server, s3_bucket: str, data_dir: Path, monkeypatch
) -> None:
    from patchgap.run.execute import run_pipeline
    from patchgap.run.prepare import prepare_run

    monkeypatch.setenv("PATCHGAP_HOME", str(tmp_path / "home"))
    cfg = _config(tmp_path, tiny_llama, s3_bucket, prompt_only=True)
    lines: list[str] = []
    prepared = prepare_run(cfg, start_embedded_s3=False, say=lines.append)
    assert prepared.dataset_counts["valid"] >= 3
    manifest = run_pipeline(prepared, say=lines.append)
    assert manifest["status"] == "succeeded"

    store = s3_server.store
    prefix = f"s3://{s3_bucket}/runs/{prepared.run_id}"
    run = json.loads(store.get_bytes(f"{prefix}/run.json"))
    assert run["run_id"] == prepared.run_id and run["status"] == "succeeded"
    assert run["environment"]["packages"]["patchgap"]
    assert run["inputs"]["dataset_sha256"] and len(run["inputs"]["dataset_sha256"]) == 64
    assert run["timings"]["pipeline_seconds"] > 0
    assert set(run["config"]) >= {"run", "train_rewriter", "rewrite", "gate", "sft", "evaluate"}

    art = store.read_manifest(f"{prefix}/artifacts")
    assert art is not None
    keys = list(art.files)
    joined = "\n".join(str(k) for k in keys)
    for piece in ("train-rewriter", "gate", "sft", "evaluate", "results.json"):
        assert piece in joined, piece
    # Four rows: base, SFT on D, SFT on D_R (RL rewriter) and the prompt-only baseline.
    results_key = next(k for k in keys if str(k).endswith("results.json"))
    results = json.loads(store.get_published(f"{prefix}/artifacts/{results_key}"))
    text = json.dumps(results)
    for label in ("base", "sft_d", "sft_dr", "sft_dr_prompt"):
        assert label in text, label
    assert any("forgetting" in ln.lower() or "accuracy" in ln.lower() for ln in lines)

    # The reproduction report, rendered from the published run alone, keeps hand-written text
    # around its markers: both gates (RL rewriter and prompt-only), four rows, the verdicts.
    from typer.testing import CliRunner

    from patchgap.cli.main import cli
    from patchgap.reports.results import BEGIN, END

    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"# Results\n\nintro kept\n\n{BEGIN}\nold table\n{END}\n\nclosing kept\n")
    res = CliRunner().invoke(
        cli, ["artifacts", "report", prepared.run_id, "--bucket", s3_bucket, "--out", str(doc)]
    )
    assert res.exit_code == 0, (res.output, res.exception)
    report = doc.read_text()
    assert report.startswith("# Results\n\nintro kept\n") and report.endswith("closing kept\n")
    assert "old table" not in report and f"## Run `{prepared.run_id}`" in report
    assert "| figure (under pi0) | prompt-only | RL rewriter |" in report
    assert "| acceptance rate |" in report and "| mean NLL of D_R |" in report
    for label in ("sft_d", "sft_dr", "sft_dr_prompt"):
        assert f"| {label} |" in report, label
    assert "forgetting(sft_dr) < forgetting(sft_d)" in report
    assert "forgetting(sft_dr_prompt) < forgetting(sft_d)" in report
    assert (doc.parent / "results-scatter.png").read_bytes()[:4] == b"\x89PNG"

    # Run again, as a user does after a crash: D is staged anew (a manifest with another time)
    # and the pipeline gets a new run id, yet train-rewriter must find its checkpoints (here the
    # last one, so it trains no step again) and every stage must see the same input hashes.
    again = prepare_run(cfg, start_embedded_s3=False, say=lines.append)
    assert again.run_id != prepared.run_id
    assert run_pipeline(again, say=lines.append)["status"] == "succeeded"

    from patchgap.stages.base import STAGE_RECORD

    def pipeline_root(run_id: str) -> Path:
        return tmp_path / "home" / "runs" / run_id / "pipeline-root"

    def stage_records(run_id: str) -> dict[str, dict]:
        return {
            p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
            for p in pipeline_root(run_id).glob(f"*/*/*/{STAGE_RECORD}")
        }

    first, second = stage_records(prepared.run_id), stage_records(again.run_id)
    assert first.keys() == second.keys() and len(first) >= 5
    trained = second["train-rewriter/training"]["metrics"]
    assert trained["resumed_from_step"] == 2 and trained["global_step"] == 2
    for name, record in first.items():
        want, got = dict(record["input_hashes"]), dict(second[name]["input_hashes"])
        if name.startswith("gate"):  # the rewrite's shard summaries carry its timings
            want.pop("candidates"), got.pop("candidates")
        assert got == want, name

    def rewrite_fingerprints(run_id: str) -> list[str]:
        merged = pipeline_root(run_id).glob("*/merge-shards*/merged/shard-*/summary-*.json")
        summaries = sorted(merged)
        return [json.loads(p.read_text())["fingerprint"] for p in summaries]

    # The restored adapter is the trained one, so the rewrite would find its kept batches.
    assert len(rewrite_fingerprints(prepared.run_id)) == 4
    assert rewrite_fingerprints(again.run_id) == rewrite_fingerprints(prepared.run_id)
