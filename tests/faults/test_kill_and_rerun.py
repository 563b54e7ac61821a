"""Kill each long stage with SIGKILL at seeded random points, and at the worst point (every object
written, the manifest not), rerun the same command, and compare the outputs with an uninterrupted
run: same ids, no duplicates, no missing records, identical greedy texts, identical tensors.

Each stage runs as a container would (``python -m patchgap.stages.<name>`` with s3:// inputs and
outputs on the real SeaweedFS), chained: the interrupted chain's outputs feed its next stage.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.faults

HARNESS = Path(__file__).with_name("harness.py")
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "records"
SEED = 16
# Stage, its inputs (name -> output of an earlier stage or "data"), its outputs, and the files
# whose content must not depend on the interruption.
CHAIN = [
    ("rewrite", {"dataset": "data/gsm8k_mini.jsonl"}, ["candidates"]),
    (
        "gate",
        {"dataset": "data/gsm8k_mini.jsonl", "candidates": "candidates"},
        ["dataset_r", "report"],
    ),
    ("sft", {"dataset": "dataset_r/d_r.jsonl"}, ["model", "metrics"]),
    ("evaluate", {}, ["report"]),
]


def _run(kill: str, stage: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HARNESS), kill, stage, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _clean_run(stage: str, args: list[str]) -> int:
    """The uninterrupted run, in this process (no second interpreter start-up); returns how
    many store writes it made, the range the kill points are drawn from."""
    import importlib

    from patchgap.stages.base import main
    from patchgap.storage.store import Store

    writes = 0
    real_file, real_bytes = Store.put_file, Store.put_bytes

    def count(method):
        def write(self, first, uri):
            nonlocal writes
            writes += 1
            return method(self, first, uri)

        return write

    mp = pytest.MonkeyPatch()
    mp.setattr(Store, "put_file", count(real_file))
    mp.setattr(Store, "put_bytes", count(real_bytes))
    try:
        assert main(importlib.import_module(f"patchgap.stages.{stage}"), args) == 0
    finally:
        mp.undo()
    return writes


def _args(cfg: Path, base: str, stage: str, inputs: dict[str, str], outputs: list[str]) -> list:
    args = ["--config", str(cfg)]
    for name, src in inputs.items():
        args += ["--input", f"{name}={base}/{src}"]
    for name in outputs:
        args += ["--output", f"{name}={base}/{name}"]
    return args


def _config(tmp: Path, tiny: Path, base: str) -> Path:
    cfg = {
        "model": str(tiny),
        "seed": 0,
        "rewrite": {
            "fields": "gsm8k",
            "generation": {"max_new_tokens": 8, "batch_size": 2},
            "batch_records": 2,
        },
        "gate": {
            "fields": "gsm8k",
            "batch_records": 2,
            "reward": {"judge": False},
            "write_parquet": False,
        },
        "sft": {
            "learning_rate": 3e-3,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "per_device_batch_size": 2,
            "max_steps": 4,
            "device": "cpu",
            "distributed": "none",
            "checkpoint_uri": f"{base}/sft-checkpoints",
            "checkpoint_every": 2,
        },
        "evaluate": {
            "models": [
                {"label": "base", "path": str(tiny)},
                {"label": "sft_d", "path": f"{base}/model"},
            ],
            "baseline": None,
            "math": ["gsm8k"],
            "general": [],
            "limit": 3,
            "generation": {"max_new_tokens": 8, "device": "cpu"},
            "bootstrap_reps": 100,
        },
    }
    path = tmp / f"run-{base.rsplit('/', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fingerprint(store, prefix: str, stage: str) -> dict[str, object]:
    """What must not depend on an interruption, per output file."""
    out: dict[str, object] = {}
    for obj in store.list(prefix):
        name = obj.key
        if name.endswith(".safetensors"):
            out[name] = _tensors(store.get_bytes(obj.uri))
        elif re.search(r"(candidates-.*|d_r|items/.*)\.jsonl$", name):
            rows = [json.loads(x) for x in store.get_bytes(obj.uri).splitlines() if x.strip()]
            ids = [r["id"] for r in rows]
            assert len(ids) == len(set(ids)), f"{stage}: duplicate ids in {name}"
            out[name] = rows
    return out


def _tensors(blob: bytes) -> dict[str, list]:
    from safetensors.torch import load

    return {k: v.float().flatten().tolist() for k, v in sorted(load(blob).items())}


def test_each_stage_survives_sigkill_and_reruns_to_the_same_outputs(
    s3_server, s3_bucket: str, tiny_llama: Path, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("PATCHGAP_DATA_DIR", str(data_dir))
    store = s3_server.store
    rng = random.Random(SEED)
    clean, faulty = f"s3://{s3_bucket}/clean", f"s3://{s3_bucket}/faulty"
    for base in (clean, faulty):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "gsm8k_mini.jsonl").write_bytes(
            (ASSETS / "gsm8k_mini.jsonl").read_bytes()
        )
        store.upload_dir(tmp_path / "data", f"{base}/data")
    configs = {base: _config(tmp_path, tiny_llama, base) for base in (clean, faulty)}
    n_records = len((ASSETS / "gsm8k_mini.jsonl").read_text().splitlines())

    for stage, inputs, outputs in CHAIN:
        writes = _clean_run(stage, _args(configs[clean], clean, stage, inputs, outputs))
        args = _args(configs[faulty], faulty, stage, inputs, outputs)
        # A seeded random write, then the worst moment (objects written, manifest not).
        for kill in (str(rng.randint(1, max(1, writes - 1))), "manifest"):
            killed = _run(kill, stage, args)
            assert killed.returncode == -9, (stage, kill, killed.stderr[-3000:])
            if kill == "manifest":  # its objects are all there; without a manifest, unused
                assert store.list(f"{faulty}/{outputs[0]}")
                assert store.read_manifest(f"{faulty}/{outputs[0]}") is None
        rerun = _run("0", stage, args)
        assert rerun.returncode == 0, (stage, rerun.stderr[-3000:])
        for name in outputs:
            want = _fingerprint(store, f"{clean}/{name}", stage)
            got = _fingerprint(store, f"{faulty}/{name}", stage)
            assert got == want, f"{stage}: {name} differs after kill and rerun"
        if stage == "rewrite":
            (cands,) = [v for k, v in want.items() if k.startswith("candidates-")]
            assert len(cands) == n_records  # no missing records
