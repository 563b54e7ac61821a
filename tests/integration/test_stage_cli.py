"""``patchgap stage NAME`` runs one stage alone from a run YAML and S3 URIs, as a container
would: inputs downloaded and verified, outputs uploaded with a manifest, a second run skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from patchgap.cli.main import cli

pytestmark = pytest.mark.integration

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "records"


def _invoke(args: list[str]) -> str:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


def test_rewrite_then_gate_alone_over_s3(tmp_path: Path, tiny_llama: Path, s3_server, s3_bucket):
    store = s3_server.store
    data_uri = f"s3://{s3_bucket}/datasets/mini/gsm8k_mini.jsonl"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "gsm8k_mini.jsonl").write_bytes((ASSETS / "gsm8k_mini.jsonl").read_bytes())
    store.upload_dir(tmp_path / "d", f"s3://{s3_bucket}/datasets/mini")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_llama),
                "rewrite": {
                    "fields": "gsm8k",
                    "generation": {"max_new_tokens": 8, "batch_size": 4},
                },
                "gate": {"fields": "gsm8k", "batch_records": 4},
            }
        )
    )
    cand_uri = f"s3://{s3_bucket}/out/candidates"
    out = _invoke(
        [
            "stage",
            "rewrite",
            "-c",
            str(cfg),
            "-i",
            f"dataset={data_uri}",
            "--output",
            f"candidates={cand_uri}",
        ]
    )
    assert "rewrite: done" in out
    manifest = store.read_manifest(cand_uri)
    assert manifest is not None and manifest.metadata["stage"] == "rewrite"
    assert len(manifest.metadata["input_hashes"]["dataset"]) == 64
    # Its resumable state went beside the output in the store, and was pruned once complete.
    assert manifest.metadata["config"]["state_uri"] == f"{cand_uri}.state"
    assert store.list(f"{cand_uri}.state") == []

    dr_uri, rep_uri = f"s3://{s3_bucket}/out/d_r", f"s3://{s3_bucket}/out/report"
    args = [
        "stage",
        "gate",
        "-c",
        str(cfg),
        "-i",
        f"dataset={data_uri}",
        "-i",
        f"candidates={cand_uri}",
        "--output",
        f"dataset_r={dr_uri}",
        "--output",
        f"report={rep_uri}",
    ]
    out = _invoke(args)
    assert "gate: done" in out
    d_r = [json.loads(ln) for ln in store.get_published(f"{dr_uri}/d_r.jsonl").splitlines() if ln]
    n_in = sum(1 for ln in (ASSETS / "gsm8k_mini.jsonl").read_text().splitlines() if ln.strip())
    assert len(d_r) == n_in and len({r["id"] for r in d_r}) == n_in
    assert store.get_published(f"{rep_uri}/gate_report.html")

    # Same inputs and config: the finished outputs are recognised and not recomputed.
    assert "skipped (already complete)" in _invoke(args)


def test_unknown_stage_is_one_clear_line() -> None:
    res = CliRunner().invoke(cli, ["stage", "nonesuch"])
    assert res.exit_code == 2
    assert "unknown stage 'nonesuch'" in res.output and "Traceback" not in res.output
