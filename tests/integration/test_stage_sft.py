"""Stage sft on a tiny model: the loss falls, the saved model reloads and generates, a restart
resumes from the stored checkpoint, and the KFP component runs the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.datasets import addition_records

from patchgap.stages import sft

pytestmark = pytest.mark.integration


def _config(model: Path, **kw: object) -> sft.Config:
    base = dict(
        model=str(model),
        learning_rate=3e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        per_device_batch_size=8,
        max_steps=6,
        device="cpu",
        distributed="none",
    )
    return sft.Config(**{**base, **kw})


def _outs(root: Path) -> dict[str, Path]:
    outs = {"model": root / "model", "metrics": root / "metrics"}
    for p in outs.values():
        p.mkdir(parents=True, exist_ok=True)
    return outs


@pytest.fixture(scope="module")
def trained(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sft")
    data = addition_records(root / "d_r.jsonl")
    ckpt = root / "ckpt"
    cfg = _config(tiny_llama, checkpoint_uri=str(ckpt), checkpoint_every=3)
    outs = _outs(root / "run1")
    metrics = sft.run(cfg, {"dataset": data}, outs)
    return {"root": root, "data": data, "ckpt": ckpt, "cfg": cfg, "outs": outs, "m": metrics}


def test_loss_falls_and_curve_is_written(trained: dict) -> None:
    m, outs = trained["m"], trained["outs"]
    assert m["records"] == 16 and m["steps"] == 6
    assert m["loss_last"] < m["loss_first"] - 0.5
    curve = json.loads((outs["metrics"] / sft.LOSS_JSON).read_text())
    assert [c["step"] for c in curve] == [1, 2, 3, 4, 5, 6]
    assert (outs["metrics"] / sft.LOSS_PNG).stat().st_size > 1000


def test_saved_model_reloads_and_generates(trained: dict) -> None:
    from patchgap.lm.generation import GenerationConfig, make_generator
    from patchgap.lm.models import apply_chat

    folder = trained["outs"]["model"]
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    gen = make_generator(folder, None, GenerationConfig(max_new_tokens=8, device="cpu"))
    prompt = apply_chat(gen.tokenizer, [{"role": "user", "content": "What is 1 + 2?"}])
    (out,) = gen.generate([prompt])
    assert out[0].num_tokens >= 1  # the fine-tuned model produces tokens through our backend


def test_restart_resumes_from_stored_checkpoint(trained: dict) -> None:
    (run_dir,) = trained["ckpt"].iterdir()  # one folder per run fingerprint
    # (a local publish leaves its hidden lock file beside each folder)
    steps = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    assert steps == ["checkpoint-3", "checkpoint-6"]
    cfg = trained["cfg"].model_copy(update={"max_steps": 8})
    outs = _outs(trained["root"] / "run2")
    m = sft.run(cfg, {"dataset": trained["data"]}, outs)
    assert m["resumed_from_step"] == 6 and m["steps"] == 8
    curve = json.loads((outs["metrics"] / sft.LOSS_JSON).read_text())
    assert [c["step"] for c in curve][:2] == [1, 2]  # the curve before the restart is kept


def test_sft_runs_on_other_data_share_the_checkpoint_uri(trained: dict) -> None:
    """SFT on D and on D_R take the same sft config in the pipeline: neither resumes from, nor
    refuses, the other's checkpoints."""
    other = trained["root"] / "d_other.jsonl"
    rows = [json.loads(x) for x in trained["data"].read_text().splitlines()]
    other.write_text("".join(json.dumps({**r, "id": r["id"] + "-b"}) + "\n" for r in rows))
    cfg = trained["cfg"].model_copy(update={"max_steps": 3})
    m = sft.run(cfg, {"dataset": other}, _outs(trained["root"] / "run-other"))
    assert m["resumed_from_step"] == 0 and m["steps"] == 3
    assert len(list(trained["ckpt"].iterdir())) == 2


def test_lora_is_merged_into_plain_weights(tiny_llama: Path, tmp_path: Path) -> None:
    data = addition_records(tmp_path / "d.jsonl")
    cfg = _config(tiny_llama, finetuning="lora", max_steps=2, lora={"r": 4, "alpha": 8})
    outs = _outs(tmp_path)
    sft.run(cfg, {"dataset": data}, outs)
    assert (outs["model"] / "model.safetensors").is_file()
    assert not (outs["model"] / "adapter_config.json").exists()


def test_progress_shows_steps_and_loss_instead_of_log_dicts(
    tiny_llama: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="patchgap.progress")
    data = addition_records(tmp_path / "d.jsonl")
    sft.run(_config(tiny_llama, max_steps=2), {"dataset": data}, _outs(tmp_path))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "patchgap.progress"]
    assert line.startswith("sft: 2/2 step [") and "step/s" in line and "loss=" in line
    assert "{'loss'" not in capsys.readouterr().out  # the Trainer's printed log dicts are gone


def test_report_to_tensorboard_puts_event_files_beside_checkpoints_and_in_metrics(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from patchgap.storage.store import MANIFEST_NAME

    data = addition_records(tmp_path / "d.jsonl")
    ckpt = tmp_path / "ckpt"
    tracking = {"report_to": "tensorboard", "checkpoint_uri": str(ckpt), "checkpoint_every": 2}
    cfg = _config(tiny_llama, max_steps=2, **tracking)
    outs = _outs(tmp_path / "run")
    sft.run(cfg, {"dataset": data}, outs)
    (run,) = (outs["metrics"] / "tensorboard").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    (fp_dir,) = ckpt.iterdir()
    assert sorted(p.name for p in fp_dir.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-2",
        "tensorboard",
    ]
    uploaded = fp_dir / "tensorboard" / run.name
    assert (uploaded / MANIFEST_NAME).is_file() and list(uploaded.glob("events.out.tfevents.*"))


def test_report_to_mlflow_logs_the_run_to_the_tracking_server(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's own file store stands in for a tracking server: the Trainer's MLflow integration
    logs the run's parameters and its loss there."""
    mlflow = pytest.importorskip("mlflow")

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "patchgap-sft")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a real server would use a database
    data = addition_records(tmp_path / "d.jsonl")
    sft.run(
        _config(tiny_llama, max_steps=2, report_to="mlflow"), {"dataset": data}, _outs(tmp_path)
    )
    client = mlflow.tracking.MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("patchgap-sft").experiment_id])
    # The file store returns a metric's history in no fixed order (two steps logged within one
    # millisecond came back as [2, 1]): one point per step is what is asserted.
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert run.data.params["learning_rate"]


def test_component_runs_the_stage(tiny_llama: Path, tmp_path: Path) -> None:
    import yaml

    from patchgap.components.sft.component import sft as component

    class Art:
        def __init__(self, path: Path) -> None:
            self.path = str(path)
            self.metadata: dict = {}

    class Metrics:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metric(self, k: str, v: float) -> None:
            self.logged[k] = v

    data = addition_records(tmp_path / "d.jsonl")
    cfg = _config(tiny_llama, max_steps=1).model_dump(mode="json")
    metrics = Metrics()
    component.python_func(
        config=yaml.safe_dump(cfg),
        dataset=Art(data),
        model=Art(tmp_path / "model"),
        training=Art(tmp_path / "training"),
        metrics=metrics,
    )
    assert metrics.logged["steps"] == 1
    assert (tmp_path / "model" / "config.json").is_file()
