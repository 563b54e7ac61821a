"""Snapshots along sft on the tiny model: saved at the configured fractions of the optimizer
steps as loadable model folders, listed in summary.json, and still present after a restart
that resumed past one of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures.datasets import addition_records
from pydantic import ValidationError

from patchgap.stages import sft
from patchgap.training.snapshots import snapshot_steps

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


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_snapshot_steps_round_up_and_deduplicate() -> None:
    assert snapshot_steps([0.25, 0.5, 1.0], 6) == [2, 3, 6]
    assert snapshot_steps([0.01, 0.1], 5) == [1]  # at least step 1, once
    assert snapshot_steps([0.5, 1.0], 0) == []


def test_snapshot_fractions_are_validated(tiny_llama: Path) -> None:
    with pytest.raises(ValidationError, match=r"\(0, 1\]"):
        _config(tiny_llama, snapshots=[0.0, 0.5])
    with pytest.raises(ValidationError, match=r"\(0, 1\]"):
        _config(tiny_llama, snapshots=[1.5])
    assert _config(tiny_llama, snapshots=[1.0, 0.5, 0.5]).snapshots == [0.5, 1.0]


def test_empty_snapshots_keep_the_fingerprint_of_older_configs(tiny_llama: Path) -> None:
    """A run from before snapshots existed must still find its checkpoints."""
    from patchgap.stages import resume

    cfg = _config(tiny_llama)
    settings = sft.NOT_IN_FINGERPRINT.settings(cfg)
    assert "snapshots" not in settings
    with_snaps = sft.NOT_IN_FINGERPRINT.settings(_config(tiny_llama, snapshots=[0.5]))
    assert with_snaps["snapshots"] == [0.5]
    assert resume.fingerprint(cfg, sft.NOT_IN_FINGERPRINT) != resume.fingerprint(
        _config(tiny_llama, snapshots=[0.5]), sft.NOT_IN_FINGERPRINT
    )


def test_snapshots_are_loadable_models_at_their_steps(tiny_llama: Path, tmp_path: Path) -> None:
    from patchgap.lm.generation import GenerationConfig, make_generator
    from patchgap.lm.models import apply_chat

    data = addition_records(tmp_path / "d.jsonl")
    outs = _outs(tmp_path / "run")
    m = sft.run(_config(tiny_llama, snapshots=[0.25, 0.5, 1.0]), {"dataset": data}, outs)
    assert m["snapshot_steps"] == [2, 3, 6]
    summary = json.loads((outs["metrics"] / sft.SUMMARY_JSON).read_text())
    assert summary["snapshot_steps"] == [2, 3, 6]
    snaps = outs["model"] / "snapshots"
    # The final step is the model at the root, not a copy.
    assert sorted(p.name for p in snaps.iterdir()) == ["step-2", "step-3"]
    for step in ("step-2", "step-3"):
        assert (snaps / step / "config.json").is_file()
        assert (snaps / step / "tokenizer_config.json").is_file()
    # Training moved on between the snapshots: the weights differ.
    w2, w3, final = _weights(snaps / "step-2"), _weights(snaps / "step-3"), _weights(outs["model"])
    name = next(iter(w2))
    assert not w2[name].equal(w3[name]) and not w3[name].equal(final[name])
    gen = make_generator(snaps / "step-2", None, GenerationConfig(max_new_tokens=4, device="cpu"))
    assert gen.tokenizer.padding_side == "left"
    prompt = apply_chat(gen.tokenizer, [{"role": "user", "content": "What is 1 + 2?"}])
    (out,) = gen.generate([prompt])
    assert out[0].num_tokens >= 1


def test_lora_snapshot_is_merged(tiny_llama: Path, tmp_path: Path) -> None:
    data = addition_records(tmp_path / "d.jsonl")
    outs = _outs(tmp_path / "run")
    cfg = _config(
        tiny_llama, finetuning="lora", lora={"r": 4, "alpha": 8}, max_steps=2, snapshots=[0.5, 1]
    )
    m = sft.run(cfg, {"dataset": data}, outs)
    assert m["snapshot_steps"] == [1, 2]
    snap = outs["model"] / "snapshots" / "step-1"
    assert (snap / "model.safetensors").is_file() and not (snap / "adapter_config.json").exists()
    assert (outs["model"] / "model.safetensors").is_file()


def test_resumed_run_past_a_snapshot_still_has_it(tiny_llama: Path, tmp_path: Path) -> None:
    data = addition_records(tmp_path / "d.jsonl")
    ckpt = tmp_path / "ckpt"
    cfg = _config(tiny_llama, snapshots=[0.5], checkpoint_uri=str(ckpt), checkpoint_every=4)
    first = _outs(tmp_path / "run1")
    sft.run(cfg, {"dataset": data}, first)
    kept = _weights(first["model"] / "snapshots" / "step-3")
    # A crash after step 4's checkpoint: step 6's checkpoint never made it to the store.
    (run_dir,) = ckpt.iterdir()
    shutil.rmtree(run_dir / "checkpoint-6")
    second = _outs(tmp_path / "run2")
    m = sft.run(cfg, {"dataset": data}, second)
    assert m["resumed_from_step"] == 4 and m["snapshot_steps"] == [3, 6], m
    again = _weights(second["model"] / "snapshots" / "step-3")
    assert all(again[k].equal(kept[k]) for k in kept)


def test_resumed_run_without_the_kept_snapshot_says_so(tiny_llama: Path, tmp_path: Path) -> None:
    from patchgap.errors import PatchgapError

    data = addition_records(tmp_path / "d.jsonl")
    ckpt = tmp_path / "ckpt"
    cfg = _config(tiny_llama, snapshots=[0.5], checkpoint_uri=str(ckpt), checkpoint_every=4)
    sft.run(cfg, {"dataset": data}, _outs(tmp_path / "run1"))
    (run_dir,) = ckpt.iterdir()
    shutil.rmtree(run_dir / "checkpoint-6")
    shutil.rmtree(run_dir / "snapshots")
    with pytest.raises(PatchgapError, match="snapshot of step 3 is missing"):
        sft.run(cfg, {"dataset": data}, _outs(tmp_path / "run2"))


def test_component_trains_a_study_job_and_labels_it(tiny_llama: Path, tmp_path: Path) -> None:
    """The study's sft job: the arm's folder, the job's seed and epochs, and study.json."""
    import yaml

    from patchgap.components.sft.component import sft as component
    from patchgap.study.jobs import model_labels

    class Art:
        def __init__(self, path: Path) -> None:
            self.path, self.uri = str(path), ""
            self.metadata: dict = {}

    class Metrics:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metric(self, k: str, v: float) -> None:
            self.logged[k] = v

    arms = tmp_path / "arms"
    (arms / "rw_rl").mkdir(parents=True)
    addition_records(arms / "rw_rl" / "data.jsonl")
    # 16 records, 8 a step: 2 steps an epoch, 3 epochs from the job.
    cfg = _config(tiny_llama, max_steps=-1, num_epochs=1, snapshots=[0.5, 1.0])
    metrics = Metrics()
    component.python_func(
        config=yaml.safe_dump(cfg.model_dump(mode="json")),
        dataset=Art(arms),
        model=Art(tmp_path / "model"),
        training=Art(tmp_path / "training"),
        metrics=metrics,
        subset="rw_rl",
        seed=3,
        epochs=3.0,
        label="rw_rl",
    )
    assert metrics.logged["steps"] == 6 and metrics.logged["records"] == 16
    info = json.loads((tmp_path / "model" / "study.json").read_text())
    assert info == {"arm": "rw_rl", "seed": 3, "steps": [3, 6], "final_step": 6}
    assert list(model_labels(tmp_path / "model")) == ["rw_rl.s3.step3", "rw_rl.s3.step6"]
