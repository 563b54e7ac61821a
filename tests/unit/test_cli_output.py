"""``-o json`` and the default tables: what a script piping patchgap's output would read."""

# No `from __future__ import annotations` here: KFP reads the component annotations at runtime.

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.cli.main import cli

ASSETS = Path(__file__).parents[1] / "assets" / "records"


def _json(args: list[str], code: int = 0) -> object:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == code, res.output
    return json.loads(res.stdout)  # stdout is the JSON document alone


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def echo(text: str) -> str:
        return text

    @dsl.pipeline(name="probe")
    def probe(text: str = "a") -> None:
        echo(text=text)

    out = tmp_path_factory.mktemp("pkg") / "probe.yaml"
    compiler.Compiler().compile(probe, str(out))
    return out


def test_data_validate_json_counts(tmp_path: Path) -> None:
    rejects = tmp_path / "r.jsonl"
    data = _json(
        [
            "data",
            "validate",
            str(ASSETS / "bad_lines.jsonl"),
            "-f",
            "gsm8k",
            "--rejects",
            str(rejects),
            "-o",
            "json",
        ]
    )
    assert data["fields"] == "gsm8k" and data["rejected"] == 7
    assert data["rejected_by_kind"]["duplicate_id"] >= 1
    assert data["read"] == data["valid"] + data["rejected"]
    assert data["rejects_path"] == str(rejects)


def test_data_ls_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    monkeypatch.setenv("PATCHGAP_DATA_DIR", str(tmp_path))
    data = _json(["data", "ls", "-o", "json"])
    assert data["data_dir"] == str(tmp_path)
    by_name = {s["name"]: s for s in data["sets"]}
    assert by_name["gsm8k:train"]["local"] is True and by_name["gsm8k:test"]["local"] is False
    assert by_name["gsm8k:test"]["hub"] == "openai/gsm8k"


def test_models_ls_json_and_an_unwrapped_table_when_piped(tmp_path: Path) -> None:
    cache = tmp_path / ("a-cache-folder-with-a-long-name-" * 3)
    (rows,) = [_json(["models", "ls", "--cache-dir", str(cache), "--output-format", "json"])]
    smol = next(r for r in rows if r["alias"] == "smollm2")
    assert smol["prepared"] is False and smol["path"].startswith(str(cache))

    # CliRunner's stdout is not a terminal: each row stays on one line, the path unbroken.
    res = CliRunner().invoke(cli, ["models", "ls", "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("│ smollm2")]
    assert smol["path"] in line and len(line) > 80


def test_artifacts_ls_json(tmp_path: Path) -> None:
    from patchgap.storage.store import S3Settings, Store

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.jsonl").write_text('{"a": 1}\n')
    runs = tmp_path / "runs"
    store = Store(S3Settings())
    store.upload_dir(out, runs / "r1" / "rewrite", {"stage": "rewrite"})
    store.put_bytes(b"half", runs / "r1" / "sft" / "partial.bin")
    data = _json(["artifacts", "ls", "r1", "--root", str(runs), "-o", "json"])
    states = {o["key"]: o["manifest"] for o in data["objects"]}
    assert states["rewrite/a.jsonl"] == "listed" and states["sft/partial.bin"] == "incomplete"
    assert data["complete_outputs"] == 1


def test_submit_and_schedule_list_json(fake_kfp, package: Path) -> None:
    data = _json(["submit", str(package), "--host", fake_kfp.url, "-o", "json"])
    assert data == {"run_id": "run-0001", "url": f"{fake_kfp.url}/#/runs/details/run-0001"}
    CliRunner().invoke(
        cli,
        ["schedule", "create", "w", "--pipeline", str(package), "--interval", "3600"]
        + ["--host", fake_kfp.url],
    )
    (row,) = _json(["schedule", "list", "--host", fake_kfp.url, "-o", "json"])
    assert row["name"] == "w" and row["no_catchup"] is True


def test_doctor_json_lists_every_check(
    fake_kfp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    # No such bucket: some check fails whether or not S3 credentials are set here.
    args = ["doctor", "--host", fake_kfp.url, "--bucket", "no-such-bucket-patchgap", "-o", "json"]
    checks = _json(args, code=2)
    by_name = {c["name"]: c for c in checks}
    assert by_name["kfp host"]["ok"] is True
    assert set(by_name["kfp host"]) == {"name", "ok", "detail"}


def test_stage_output_has_no_short_flag_and_completion_is_on() -> None:
    res = CliRunner().invoke(cli, ["stage", "gate", "-o", "report=/tmp/x"])
    assert res.exit_code == 2 and "No such option: -o" in res.output
    assert "--install-completion" in CliRunner().invoke(cli, ["--help"]).output
