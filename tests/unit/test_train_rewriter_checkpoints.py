"""Checkpoints of the rewriter training in a local store folder: only complete, verified ones are
resumed from, foreign ones are refused, old ones pruned; and the metrics rows that ride along."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchgap.errors import ConfigError
from patchgap.storage.store import MANIFEST_NAME, Store
from patchgap.training.checkpoints import METRICS_FILE, CheckpointStore
from patchgap.training.metrics import MetricsLog, plot_reward_curves, row_from_logs, summarize


def _local_checkpoint(root: Path, step: int) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "adapter_model.safetensors").write_bytes(bytes([step]) * 64)
    return d


def _store(tmp_path: Path, fp: str = "f" * 64) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "remote"), fp, store=Store())


def test_latest_complete_checkpoint_is_restored(tmp_path: Path) -> None:
    ck = _store(tmp_path)
    for step in (2, 4):
        ck.upload(_local_checkpoint(tmp_path / "local", step), step)
    # A pod killed mid-upload of step 6: files but no manifest.
    partial = tmp_path / "remote" / "checkpoint-6"
    partial.mkdir()
    (partial / "trainer_state.json").write_text(json.dumps({"global_step": 6}))

    assert [c.step for c in ck.complete()] == [4, 2]
    got = ck.restore_latest(tmp_path / "work")
    assert got == tmp_path / "work" / "checkpoint-4"
    assert json.loads((got / "trainer_state.json").read_text())["global_step"] == 4


def test_corrupted_checkpoint_falls_back_to_an_older_one(tmp_path: Path) -> None:
    ck = _store(tmp_path)
    for step in (2, 4):
        ck.upload(_local_checkpoint(tmp_path / "local", step), step)
    (tmp_path / "remote" / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"bad")
    got = ck.restore_latest(tmp_path / "work")
    assert got is not None and got.name == "checkpoint-2"


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert _store(tmp_path).restore_latest(tmp_path / "work") is None


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _store(tmp_path, "a" * 64).upload(_local_checkpoint(tmp_path / "local", 2), 2)
    with pytest.raises(ConfigError, match="different training run"):
        _store(tmp_path, "b" * 64).restore_latest(tmp_path / "work")


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    ck = _store(tmp_path)
    for step in (1, 2, 3):
        ck.upload(_local_checkpoint(tmp_path / "local", step), step)
    assert ck.prune(2) == [1]
    assert [c.step for c in ck.complete()] == [3, 2]
    assert not (tmp_path / "remote" / "checkpoint-1").exists()
    assert (tmp_path / "remote" / "checkpoint-2" / MANIFEST_NAME).is_file()


def test_metrics_rows_survive_a_resume(tmp_path: Path) -> None:
    first = MetricsLog(tmp_path / "a" / "metrics.jsonl")
    for step in (1, 2, 3):
        first.append(row_from_logs({"reward": step / 10, "loss": 0.1}, step, 2.0, 0.5))
    first.save_copy(tmp_path / METRICS_FILE)
    # Resumed from the checkpoint of step 2: step 3 is redone, so its old row goes.
    second = MetricsLog(tmp_path / "b" / "metrics.jsonl")
    second.restore(tmp_path / METRICS_FILE, up_to_step=2)
    second.append(row_from_logs({"reward": 0.9, "loss": 0.1}, 3, 2.0, 0.5))
    lines = [json.loads(x) for x in second.path.read_text().splitlines()]
    assert [(r["step"], r["reward"]) for r in lines] == [(1, 0.1), (2, 0.2), (3, 0.9)]


def test_row_names_follow_the_paper_and_time_the_reward() -> None:
    logs = {
        "reward": 1.1,
        "reward/r_task": 0.6,
        "reward/r_dist": 0.5,
        "reward/r_div": 0.02,
        "reward/nll": 1.7,
        "kl": 0.003,
        "loss": 0.01,
        "completions/mean_length": 40.0,
    }
    row = row_from_logs(logs, 7, step_seconds=4.0, reward_seconds=1.0)
    assert row["step"] == 7 and row["gate_pass_rate"] == 0.6 and row["r_div"] == 0.02
    assert (row["kl"], row["nll"], row["reward_share"]) == (0.003, 1.7, 0.25)
    assert row["judge_p_yes"] is None  # judge off: missing, not zero


def test_summary_and_plot(tmp_path: Path) -> None:
    rows = [
        row_from_logs({"reward": r, "reward/r_task": r / 2, "kl": 0.01, "loss": 0.0}, i + 1, 2, 1)
        for i, r in enumerate([0.2, 0.4, 0.8, 1.0])
    ]
    s = summarize(rows)
    assert (s["steps"], s["reward_first"], s["reward_last"]) == (4.0, pytest.approx(0.3), 0.9)
    assert s["reward_share_mean"] == 0.5
    png = plot_reward_curves(rows, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
