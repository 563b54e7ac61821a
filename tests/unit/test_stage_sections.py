"""Nested settings sections of the stages: rewrite and evaluate take `generation:`, the gate takes
the same `reward:` section as train-rewriter. Old flat keys name their new place, top-level shared
keys still reach the settings, a section given in part keeps the stage's own defaults, and the
rewrite fingerprint leaves out the same settings as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from patchgap.errors import ConfigError
from patchgap.stages import evaluate, gate, rewrite, train_rewriter
from patchgap.stages.base import load_stage_config, section_config


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("stage", "key", "value", "place"),
    [
        (rewrite, "max_new_tokens", 64, "generation.max_new_tokens"),
        (rewrite, "seed", 3, "generation.seed"),
        (evaluate, "gpu_memory_utilization", 0.5, "generation.gpu_memory_utilization"),
        (gate, "share_prefix", True, "reward.share_prefix"),
        (gate, "judge", False, "reward.judge"),
    ],
    ids=lambda v: v.NAME if hasattr(v, "NAME") else str(v),
)
def test_an_old_flat_key_names_its_new_place(
    tmp_path: Path, stage: object, key: str, value: object, place: str
) -> None:
    name = stage.NAME  # type: ignore[attr-defined]
    path = _write(tmp_path / "x.yaml", {"seed": 0, name: {key: value}})
    with pytest.raises(ConfigError) as err:
        load_stage_config(stage.Config, path, name)  # type: ignore[attr-defined]
    assert str(err.value) == f"{path} [{name}]: {key}: moved to {place}"


def test_top_level_shared_keys_reach_the_nested_settings() -> None:
    data = {
        "seed": 7,
        "device": "cpu",
        "dtype": "float32",
        "trust_remote_code": True,
        "rewrite": {"generation": {"seed": 1}},
    }
    gen = section_config(rewrite.Config, data, "rewrite", "t").generation
    assert (gen.seed, gen.device, gen.dtype, gen.trust_remote_code) == (1, "cpu", "float32", True)
    ev = section_config(evaluate.Config, data, "evaluate", "t")
    assert (ev.seed, ev.generation.device, ev.generation.dtype) == (7, "cpu", "float32")
    rw = section_config(gate.Config, data, "gate", "t").reward
    assert (rw.device, rw.dtype) == ("cpu", "float32")
    # train-rewriter declares device itself; its reward keeps choosing a device per process.
    tr = section_config(train_rewriter.Config, data, "train_rewriter", "t")
    assert (tr.device, tr.reward.device) == ("cpu", None)


def test_a_section_given_in_part_keeps_the_stage_defaults() -> None:
    data = {
        "seed": 0,
        "evaluate": {"generation": {"batch_size": 2}},
        "gate": {"reward": {"judge": False}},
    }
    gen = section_config(evaluate.Config, data, "evaluate", "t").generation
    assert (gen.batch_size, gen.max_new_tokens, gen.backend) == (2, 512, "auto")
    assert section_config(gate.Config, data, "gate", "t").reward.share_prefix is False
    assert (
        section_config(train_rewriter.Config, data, "train_rewriter", "t").reward.share_prefix
        is True
    )
    with pytest.raises(ConfigError, match="greedy"):
        section_config(
            evaluate.Config, {"evaluate": {"generation": {"temperature": 1.0}}}, "evaluate", "t"
        )


def test_rewrite_fingerprint_ignores_device_and_batch_size_only(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')

    def fp(**generation: object) -> str:
        return rewrite.fingerprint(rewrite.Config(generation=generation), data, None)

    base = fp()
    assert fp(device="cpu", batch_size=2) == base
    assert fp(max_new_tokens=9) != base
    assert fp(seed=1) != base
    elsewhere = rewrite.Config(state_uri="s3://b/s", progress=False)
    assert rewrite.fingerprint(elsewhere, data, None) == base


def test_the_same_data_staged_twice_keeps_every_stage_fingerprint(tmp_path: Path) -> None:
    """A rerun of the pipeline stages D again, with a manifest written at another time: the
    stages must still find their checkpoints and kept batches, so no fingerprint may see it."""
    import json

    from patchgap.stages import sft
    from patchgap.stages.base import path_hash
    from patchgap.storage.store import MANIFEST_NAME, write_manifest

    def staged(name: str, created_at: str, answer: str = "#### 1") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "records.jsonl").write_text(json.dumps({"question": "q", "answer": answer}))
        write_manifest(folder, {"source": "s3://b/datasets/d.jsonl"})
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "created_at": created_at}))
        return folder

    first = staged("first", "2026-11-30T07:51:29+00:00")
    again = staged("again", "2026-11-30T08:26:34+00:00")
    other = staged("other", "2026-11-30T07:51:29+00:00", answer="#### 2")
    assert (first / MANIFEST_NAME).read_bytes() != (again / MANIFEST_NAME).read_bytes()

    assert path_hash(first) == path_hash(again) != path_hash(other)
    rw = rewrite.Config()
    assert rewrite.fingerprint(rw, first, None) == rewrite.fingerprint(rw, again, None)
    assert rewrite.fingerprint(rw, first, None) != rewrite.fingerprint(rw, other, None)
    st = sft.Config(model="m")
    assert sft.fingerprint(st, first) == sft.fingerprint(st, again) != sft.fingerprint(st, other)
    tr = train_rewriter.Config(model="m")
    assert train_rewriter.fingerprint(
        tr, train_rewriter._dataset_identity(tr, first)
    ) == train_rewriter.fingerprint(tr, train_rewriter._dataset_identity(tr, again))
