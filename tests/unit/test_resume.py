"""The one resume mechanism: run fingerprints stay byte-identical across releases (users' kept
batches, results and checkpoints must still be found after an upgrade), every stage declares the
fields left out of them the same way, and the state of finished units, its clean-up, the
checkpoint step and the gradient-checkpointing argument behave as the stages rely on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from patchgap.config import validate
from patchgap.stages import evaluate, rewrite, sft
from patchgap.stages import train_rewriter as tr
from patchgap.stages.resume import STATE_FOLDER, LeftOut, StageState, fingerprint, run_folder
from patchgap.training.checkpoints import checkpoint_step
from patchgap.training.trainer_args import gradient_checkpointing_arg

# Computed with the stages' own fingerprint code before it moved into patchgap.stages.resume.
TRAIN_REWRITER_DEFAULT = "5c0d1e6ded381bf59256fe85723f0ec16a36d8ca230211ee6ce49831612c2952"
SFT_DEFAULT = "85031e7924359740efa03ba552ac7c0739a281729b076847150fc06fa3600ffd"
REWRITE_DEFAULT = "dbee0efbcc514e1a"
# heldout.form (neutral scoring of reference solutions) joined the evaluate settings.
EVALUATE_DEFAULT = "8c9cbae956f5c906"


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset file and a staged dataset folder, with fixed names and bytes."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    folder = tmp_path / "staged"
    folder.mkdir()
    (folder / "records.jsonl").write_text('{"question": "2+2?", "answer": "#### 4"}\n')
    return data, folder


def _tr(**data: object) -> tr.Config:
    return validate(tr.Config, dict(data), "test")


def test_train_rewriter_fingerprints_are_pinned(inputs: tuple[Path, Path]) -> None:
    _, folder = inputs
    assert tr.fingerprint(_tr()) == TRAIN_REWRITER_DEFAULT
    assert (
        tr.fingerprint(_tr(), "s3://b/datasets/d.jsonl")
        == "0d0102788f1315e7ee610b3b3d86a189513113861f8e55fb2b77b49319823ce1"
    )
    # How and how long it runs, and where it keeps things, are left out.
    volatile = _tr(max_steps=3, checkpoint_uri="s3://b/c", report_to="tensorboard", device="cpu")
    assert tr.fingerprint(volatile, "gsm8k:train") == TRAIN_REWRITER_DEFAULT
    changed = _tr(learning_rate=1e-5, reward={"judge": False})
    assert (
        tr.fingerprint(changed, tr._dataset_identity(_tr(), folder))
        == "d5f877632acb49054681bbd4c545755614840faab6ce0ee4e8f4f3f90f254b9c"
    )


def test_rewrite_fingerprints_are_pinned(inputs: tuple[Path, Path]) -> None:
    data, folder = inputs
    assert rewrite.fingerprint(rewrite.Config(), data, None) == REWRITE_DEFAULT
    elsewhere = rewrite.Config(
        generation={"device": "cpu", "batch_size": 2}, state_uri="s3://b/s", progress=False
    )
    assert rewrite.fingerprint(elsewhere, data, None) == REWRITE_DEFAULT
    best_of_n = rewrite.Config(
        generation={"n": 2, "temperature": 1.0}, include_greedy=True, max_retries=1
    )
    assert rewrite.fingerprint(best_of_n, folder, None) == "9c539f7bacea8715"


def test_sft_fingerprints_are_pinned(inputs: tuple[Path, Path]) -> None:
    data, folder = inputs
    assert sft.fingerprint(sft.Config(model="m"), data) == SFT_DEFAULT
    volatile = sft.Config(
        model="m", max_steps=5, checkpoint_uri="s3://b/c", report_to="tensorboard"
    )
    assert sft.fingerprint(volatile, data) == SFT_DEFAULT
    lora = sft.Config(model="m", finetuning="lora", learning_rate=2e-5)
    assert (
        sft.fingerprint(lora, folder)
        == "2fb685c171d2c3498bd30b4d5d0793105e3e7d97604d1b6ae73206dfa9aba125"
    )


def test_evaluate_fingerprints_are_pinned(tmp_path: Path) -> None:
    assert evaluate.fingerprint(evaluate.Config()) == EVALUATE_DEFAULT
    table_only = evaluate.Config(
        gold_logprob=False, bootstrap_reps=500, state_uri="s3://b/e", model="m"
    )
    assert evaluate.fingerprint(table_only) == EVALUATE_DEFAULT
    fewer = evaluate.Config(limit=5, general=["piqa"], generation={"batch_size": 4})
    assert evaluate.fingerprint(fewer) == "9aada5d2ef9f4a11"
    # The kept results sit under that fingerprint.
    state = evaluate.EvalState.open(None, tmp_path, evaluate.fingerprint(evaluate.Config()))
    assert Path(state.prefix) == tmp_path / STATE_FOLDER / EVALUATE_DEFAULT


@pytest.mark.parametrize("stage", [tr, rewrite, sft, evaluate], ids=lambda m: m.NAME)
def test_every_stage_leaves_out_fields_it_has(stage: object) -> None:
    """A misspelt name would be hashed after all, and a restart would start over."""
    declared = stage.NOT_IN_FINGERPRINT  # type: ignore[attr-defined]
    fields = stage.Config.model_fields  # type: ignore[attr-defined]
    assert isinstance(declared, LeftOut)
    assert declared.fields | declared.while_off <= set(fields)
    for section, names in declared.sub_fields.items():
        assert names <= set(fields[section].annotation.model_fields)


def test_left_out_fields_and_inputs_shape_the_hash(tmp_path: Path) -> None:
    config = rewrite.Config()
    left_out = LeftOut.of("progress", generation={"device"}, while_off={"include_greedy"})
    settings = left_out.settings(config)
    assert "progress" not in settings and "include_greedy" not in settings
    assert "device" not in settings["generation"] and "seed" in settings["generation"]
    assert "progress" in left_out and "generation" not in left_out
    on = left_out.settings(config.model_copy(update={"include_greedy": True}))
    assert on["include_greedy"] is True  # a switch that is on counts
    # Settings alone, or beside the inputs under "config".
    alone = fingerprint(config, left_out)
    assert len(alone) == 64 and len(fingerprint(config, left_out, length=16)) == 16
    assert alone != fingerprint(config, left_out, {"data": "x"})
    assert fingerprint(config, left_out, {"data": "x"}) != fingerprint(
        config, left_out, {"data": "y"}
    )
    assert run_folder("s3://b/ckpt", alone) == f"s3://b/ckpt/{alone[:16]}"


def test_state_inside_the_output_goes_at_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = StageState.open(None, out, "fp", "part")
    state.write_unit("u.json", b'{"a": 1}')
    assert (out / STATE_FOLDER / "fp" / "part" / "u.json").is_file()
    assert state.kept() == {"u.json"}
    assert state.read_unit("u.json", json.loads) == {"a": 1}
    assert state.read_unit("absent.json", json.loads) is None
    state.discard()
    assert not (out / STATE_FOLDER).exists()


def test_state_elsewhere_is_cleared_and_a_corrupt_unit_is_redone(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    state = StageState.open(str(kept), tmp_path / "out", "fp")
    assert state.in_output is None
    state.write_unit("m/bench.json", b'{"items": [')
    assert state.read_unit("m/bench.json", json.loads) is None
    state.write_unit("m/bench.json", b'{"items": []}')
    assert state.read_unit("m/bench.json", json.loads) == {"items": []}
    state.discard()  # outside execute(): the outputs are already where they stay
    assert state.kept() == set()


def test_checkpoint_step_reads_the_trainer_state_else_the_name(tmp_path: Path) -> None:
    assert checkpoint_step(None) == 0
    named = tmp_path / "checkpoint-7"
    named.mkdir()
    assert checkpoint_step(named) == 7
    (named / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    assert checkpoint_step(named) == 9


def test_gradient_checkpointing_follows_the_installed_name() -> None:
    @dataclasses.dataclass
    class Older:
        gradient_checkpointing: bool = False

    @dataclasses.dataclass
    class Newer:
        gradient_checkpointing: bool = False
        activation_checkpointing: bool = False

    assert gradient_checkpointing_arg(Older, True) == {"gradient_checkpointing": True}
    assert gradient_checkpointing_arg(Newer, True) == {"activation_checkpointing": True}
    # Both trainers' real config classes take what it builds.
    from trl import GRPOConfig, SFTConfig

    for cls in (GRPOConfig, SFTConfig):
        ((name, on),) = gradient_checkpointing_arg(cls, False).items()
        assert name in {f.name for f in dataclasses.fields(cls)} and on is False
