"""One study SFT job as its component runs it: the config with the job's seed and epochs, the
arm's folder as the dataset, and the labels the evaluation gives each of its snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchgap.errors import ConfigError, DataError
from patchgap.study import jobs


class Art:
    def __init__(self, path: Path, uri: str = "") -> None:
        self.path = str(path)
        self.uri = uri
        self.metadata: dict = {}


def test_names_match_the_sft_stage() -> None:
    from patchgap.stages import sft
    from patchgap.training import snapshots

    assert jobs.SUMMARY_JSON == sft.SUMMARY_JSON
    assert jobs.SNAPSHOTS_DIR == snapshots.SNAPSHOTS_DIR
    assert f"{jobs.SNAPSHOTS_DIR}/step-3" == f"{snapshots.SNAPSHOTS_DIR}/" + (
        snapshots.snapshot_folder(3)
    )


def test_job_config_sets_seed_and_epochs_only_when_given() -> None:
    base = '{"learning_rate": 2e-5, "seed": 0, "num_epochs": 1}'
    assert json.loads(jobs.job_config(base)) == json.loads(base)
    got = json.loads(jobs.job_config(base, seed=2, epochs=3.5))
    assert got == {"learning_rate": 2e-5, "seed": 2, "num_epochs": 3.5}
    with pytest.raises(ConfigError):
        jobs.job_config("[1, 2]", seed=1)


def test_subset_is_a_folder_of_the_artifact(tmp_path: Path) -> None:
    (tmp_path / "rw_rl").mkdir()
    art = Art(tmp_path, "s3://b/run/arms")
    assert jobs.subset_artifact(art, "") is art
    sub = jobs.subset_artifact(art, "rw_rl")
    assert sub.path == str(tmp_path / "rw_rl") and sub.uri == "s3://b/run/arms/rw_rl"
    for bad in ("missing", "../x", "a/b"):
        with pytest.raises(ConfigError, match="no such folder"):
            jobs.subset_artifact(art, bad)


def _model(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")


def test_labels_name_every_snapshot_and_the_final_model(tmp_path: Path) -> None:
    model, metrics = tmp_path / "model", tmp_path / "training"
    _model(model)
    _model(model / "snapshots" / "step-2")
    _model(model / "snapshots" / "step-3")
    metrics.mkdir()
    (metrics / "summary.json").write_text(json.dumps({"steps": 6.0, "snapshot_steps": [2, 3, 6]}))
    label = jobs.write_job_label(model, metrics, "rw_rl", '{"seed": 1}')
    assert label == {"arm": "rw_rl", "seed": 1, "steps": [2, 3, 6], "final_step": 6}
    assert jobs.model_labels(model) == {
        "rw_rl.s1.step2": model / "snapshots" / "step-2",
        "rw_rl.s1.step3": model / "snapshots" / "step-3",
        "rw_rl.s1.step6": model,
    }


def test_without_snapshots_the_final_step_is_the_one_label(tmp_path: Path) -> None:
    model, metrics = tmp_path / "model", tmp_path / "training"
    _model(model)
    metrics.mkdir()
    (metrics / "summary.json").write_text(json.dumps({"steps": 4.0, "snapshot_steps": []}))
    jobs.write_job_label(model, metrics, "d", "seed: 0")
    assert list(jobs.model_labels(model)) == ["d.s0.step4"]


def test_missing_label_or_snapshot_is_named(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _model(model)
    with pytest.raises(DataError, match="not a study job's model"):
        jobs.model_labels(model)
    info = {"arm": "d", "seed": 0, "steps": [1, 2], "final_step": 2}
    (model / "study.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="snapshot of step 1 is missing"):
        jobs.model_labels(model)
