"""The ``study`` pipeline end to end under kfp.local (subprocess runner) with the tiny random model
on the real embedded S3: D and the swap pool are staged, both rewriters rewrite and gate, the arms
and their jobs are built, every job trains with snapshots, and one evaluation scores every
snapshot of every job plus pi0; the study report when its module exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

SEEDS = [0, 1]
ARMS = ["d", "dr", "swap_rl"]


def _gsm8k(path: Path, start: int, n: int) -> Path:
    rows = [
        {
            "question": f"Sam has {a} apples and buys {a + 2} more. How many apples does he have?",
            "answer": f"He has {a} + {a + 2} = <<{a}+{a + 2}={2 * a + 2}>>{2 * a + 2} apples.\n"
            f"#### {2 * a + 2}",
        }
        for a in range(start, start + n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp: Path, model: Path, bucket: str) -> Path:
    dataset = {"source": str(_gsm8k(tmp / "d.jsonl", 1, 8)), "fields": "gsm8k"}
    # Three questions of the pool repeat D's: the swap draw must leave them out.
    pool = {"source": str(_gsm8k(tmp / "pool.jsonl", 6, 12)), "fields": "gsm8k"}
    cfg = {
        "model": str(model),
        "seed": 0,
        "run": {"pipeline": "study", "bucket": bucket, "dataset": dataset, "num_shards": 1},
        "study": {
            "arms": ARMS,
            "seeds": SEEDS,
            "snapshots": [0.5, 1.0],
            "epochs": {"full": 1, "concentrated": 2},
            "swap_pool": pool,
            "swap_seed": 3,
        },
        "train_rewriter": {
            "dataset": dict(dataset),
            "num_generations": 2,
            "prompts_per_step": 2,
            "per_device_batch_size": 2,
            "max_prompt_length": 256,
            "max_completion_length": 8,
            "max_steps": 1,
            "checkpoint_uri": f"s3://{bucket}/checkpoints/rewriter",
            "checkpoint_every": 1,
        },
        "rewrite": {
            "generation": {"max_new_tokens": 8, "batch_size": 8},
            "state_uri": f"s3://{bucket}/state",
        },
        "gate": {"batch_records": 8},
        "sft": {"max_length": 128, "per_device_batch_size": 4},
        "evaluate": {
            "math": [],
            "general": ["arc_easy"],
            "limit": 2,
            "drift": {"questions": 2, "max_new_tokens": 4},
            "heldout": {"sets": ["gsm8k"], "limit": 2},
            "bootstrap_reps": 100,
        },
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.timeout(1200)
def test_study_pipeline_trains_every_job_and_evaluates_every_snapshot(
    tmp_path: Path, tiny_llama: Path, s3_server, s3_bucket: str, data_dir: Path, monkeypatch
) -> None:
    from patchgap.run.execute import run_pipeline
    from patchgap.run.prepare import prepare_run

    monkeypatch.setenv("PATCHGAP_HOME", str(tmp_path / "home"))
    lines: list[str] = []
    cfg = _config(tmp_path, tiny_llama, s3_bucket)
    prepared = prepare_run(cfg, start_embedded_s3=False, say=lines.append)
    assert prepared.swap_pool_uri.startswith(f"s3://{s3_bucket}/datasets/")
    manifest = run_pipeline(prepared, say=lines.append)
    assert manifest["status"] == "succeeded", manifest["error"]
    root = tmp_path / "home" / "runs" / prepared.run_id / "pipeline-root"

    (arms_json,) = root.glob("*/build-arms/arms/arms.json")
    described = json.loads(arms_json.read_text())
    arms, jobs = described["arms"], described["jobs"]
    assert list(arms) == ARMS
    assert arms["d"]["records"] == 8 and arms["dr"]["records"] == 8
    k_rl = arms["swap_rl"]["records"]
    # As many swap references as the RL gate accepted; none of them D's questions.
    (gate_rl,) = root.glob("*/gate/dataset_r/_accepted/accepted.jsonl")
    assert k_rl == len(gate_rl.read_text().splitlines())
    d_ids = set(arms["d"]["ids"])
    assert not d_ids & set(arms["swap_rl"]["ids"])
    trained = [a for a in ARMS if arms[a]["records"]]
    assert jobs == [
        {"arm": a, "seed": s, "epochs": 1.0 if a != "swap_rl" else 2.0}
        for a in trained
        for s in SEEDS
    ]
    # Every job trained on its arm with its seed, with a snapshot half-way.
    labels = sorted(p for p in root.glob("*/for-loop-*/sft*/model/study.json"))
    assert len(labels) == len(jobs)
    expected = {"base"}
    for path in labels:
        info = json.loads(path.read_text())
        assert (info["arm"], info["seed"]) in {(j["arm"], j["seed"]) for j in jobs}
        assert len(info["steps"]) == 2 and info["steps"][-1] == info["final_step"]
        step = info["steps"][0]
        assert (path.parent / "snapshots" / f"step-{step}" / "model.safetensors").is_file()
        summary = json.loads((path.parent.parent / "training" / "summary.json").read_text())
        assert summary["records"] == arms[info["arm"]]["records"]
        expected |= {f"{info['arm']}.s{info['seed']}.step{n}" for n in info["steps"]}
    # One evaluation over every snapshot of every job and pi0.
    (items,) = root.glob("*/evaluate/report/items")
    assert {p.name for p in items.iterdir()} == expected
    for label in expected:
        names = {p.name for p in (items / label).iterdir()}
        assert {"drift_nll.jsonl", "heldout_nll_gsm8k.jsonl", "arc_easy.jsonl"} <= names, label

    (study_json,) = root.glob("*/study-report/study/study.json")
    study = json.loads(study_json.read_text())
    # Every pre-registered hypothesis has a verdict or says why it was not tested.
    ids = {h["id"] for h in study["hypotheses"]}
    assert {"H1", "H2", "H3", "H4", "H5", "H6"} <= ids, ids
    for h in study["hypotheses"]:
        assert h["verdict"] in {"supported", "not supported", "refuted"} or h["verdict"].startswith(
            "not tested"
        ), h
    assert set(study["arms"]) == {a for a in ARMS if arms[a]["records"]}
    for name in ("study.md", "frontiers.png", "reward_curve.png"):
        assert (study_json.parent / name).is_file(), name
    # The run ends with the study's own summary, not evaluate's table of every snapshot.
    assert f"study: {study_json.parent} " in "\n".join(lines)
