"""Hostile and broken inputs: each gives one line naming the file (line:column where there is
one) and exit code 2, or a reject with its reason; never a traceback, a hang, or lost work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from patchgap.config import read_yaml
from patchgap.data.fields import FieldMap
from patchgap.data.rejects import REJECT_RAW_LIMIT
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.errors import ConfigError, DataError

GSM8K = '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# ------------------------------------------------------------------------------ data files


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"question": ' + DEEP + "}", "nested too deeply"),
        ('{"question": "q", "answer": ' + HUGE_INT + "}", "too many digits"),
    ],
)
def test_a_hostile_jsonl_line_is_one_reject(tmp_path: Path, line: str, reason: str) -> None:
    data = _write(tmp_path / "d.jsonl", GSM8K + line + "\n" + GSM8K.replace("1 + 1", "2 + 2"))
    res = load_records(DatasetSpec(source=str(data), fields="gsm8k"), tmp_path / "rej.jsonl")
    assert res.counts.valid == 2 and res.counts.rejected == {"invalid_json": 1}
    (reject,) = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert reject["line"] == 2 and reason in reject["reason"]


@pytest.mark.parametrize("body", [DEEP, "[" + DEEP + "]", '{"a": ' + HUGE_INT + "}"])
def test_a_hostile_json_file_is_one_line_with_its_position(tmp_path: Path, body: str) -> None:
    data = _write(tmp_path / "d.json", "\n" + body)
    with pytest.raises(DataError, match=r"d\.json:2:\d+: invalid JSON: (nested too deeply|a num)"):
        load_records(DatasetSpec(source=str(data), fields="gsm8k"))


def test_rejects_are_capped_and_strict_json(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "d.parquet"
    rows = [
        {"question": "q" * 3_000_000, "answer": None, "score": 1.0},  # no answer: a reject
        {"question": "nan", "answer": None, "score": float("nan")},
        {"question": "What is 1 + 1?", "answer": "#### 2", "score": 0.5},
    ]
    pq.write_table(pa.Table.from_pylist(rows), data)
    load_records(DatasetSpec(source=str(data), fields="gsm8k"), tmp_path / "rej.jsonl")
    text = (tmp_path / "rej.jsonl").read_text()
    assert len(text) < 4 * REJECT_RAW_LIMIT  # not 3 MB

    def no_bare_constants(name: str) -> None:
        raise AssertionError(f"bare {name} in the rejects file")

    big, nan = [json.loads(x, parse_constant=no_bare_constants) for x in text.splitlines()]
    assert big["raw"]["chars"] > 3_000_000 and len(big["raw"]["truncated"]) == REJECT_RAW_LIMIT
    assert "nan" in nan["raw"]


def test_a_catastrophic_answer_pattern_is_bounded(tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", json.dumps({"q": "x", "a": "a" * 40 + "c"}) + "\n")
    # The matcher sees through this nested repeat: no match, the answer is kept as it is.
    fields = FieldMap(question="q", answer="a", answer_pattern="((a+)+)b")
    res = load_records(DatasetSpec(source=str(data), fields=fields))
    assert res.records[0].answer == "a" * 40 + "c"
    # This one backtracks exponentially: stopped at the time bound, with one line.
    fields = FieldMap(question="q", answer="a", answer_pattern="((a|a)+)b")
    with pytest.raises(DataError, match=r"answer_pattern '\(\(a\|a\)\+\)b' took over"):
        load_records(DatasetSpec(source=str(data), fields=fields), tmp_path / "rej.jsonl")
    assert not (tmp_path / "rej.jsonl").exists()


def test_a_failed_read_leaves_no_partial_rejects_and_keeps_the_old_file(tmp_path: Path) -> None:
    old = _write(tmp_path / "rej.jsonl", '{"old": "complete rejects of an earlier read"}\n')
    lines = ["{not json\n", json.dumps({"q": "x", "a": "a" * 40 + "c"}) + "\n"]
    data = _write(tmp_path / "d.jsonl", "".join(lines))
    fields = FieldMap(question="q", answer="a", answer_pattern="((a|a)+)b")
    with pytest.raises(DataError):
        load_records(DatasetSpec(source=str(data), fields=fields), old)
    assert old.read_text() == '{"old": "complete rejects of an earlier read"}\n'
    assert not list(tmp_path.glob(".rej.jsonl.*"))


def test_a_mixed_folder_reads_every_layout_and_rejects_the_bad_file(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _write(folder / "a.jsonl", GSM8K)
    _write(folder / "b.parquet", b"PAR1 this is not parquet")
    math = {"problem": "What is 2 + 3?", "solution": "It is $\\boxed{5}$.", "answer": "5"}
    _write(folder / "c.jsonl", json.dumps(math) + "\n")
    _write(folder / "d.jsonl", json.dumps({"prompt": "?", "completion": "!"}) + "\n")
    res = load_records(DatasetSpec(source=str(folder)), tmp_path / "rej.jsonl")
    assert res.counts.valid == 2  # gsm8k from a.jsonl and math from c.jsonl, each its own layout
    assert res.counts.fields == "auto: gsm8k, math"
    assert res.counts.rejected == {"unreadable_file": 1, "unknown_fields": 1}
    rejects = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert rejects[0]["source"].endswith("b.parquet") and "Parquet" in rejects[0]["reason"]


def test_data_validate_exits_2_when_every_record_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patchgap.cli.data import app

    monkeypatch.chdir(tmp_path)
    data = _write(tmp_path / "d.jsonl", '{"question": "no answer"}\n{"question": "none"}\n')
    res = CliRunner().invoke(app, ["validate", str(data), "--fields", "gsm8k"])
    assert res.exit_code == 2
    assert "no valid records (2 read, all rejected)" in res.output


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a: " + "[" * 100_000, r"c\.yaml: invalid YAML: nested too deeply"),
        ("seed: " + HUGE_INT, r"c\.yaml: invalid YAML: .*digits"),
        (b"seed: 1\nmodel: caf\xe9\n", r"c\.yaml:2: not UTF-8 text \(byte 18\)"),
    ],
)
def test_a_hostile_config_is_one_line(tmp_path: Path, body: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_yaml(_write(tmp_path / "c.yaml", body))


def test_misspelled_section_or_unknown_key_is_refused(tmp_path: Path) -> None:
    from patchgap.stages import gate
    from patchgap.stages.base import load_stage_config

    cfg = _write(tmp_path / "c.yaml", yaml.safe_dump({"gatee": {"judge": False}}))
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown top-level key 'gatee'; did you mean"):
        load_stage_config(gate.Config, cfg, "gate")
    cfg.write_text(yaml.safe_dump({"model": "x", "learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown top-level key 'learning_rate'"):
        load_stage_config(gate.Config, cfg, "gate")


def test_run_validates_the_whole_yaml_before_any_side_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patchgap.run.prepare import prepare_run
    from patchgap.storage import server

    def no_side_effects(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server was started before the YAML was validated")

    monkeypatch.setattr(server.EmbeddedS3, "start", no_side_effects)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    good = {"run": {"dataset": {"source": "gsm8k:train"}}, "gate": {"reward": {"judge": False}}}
    for bad, message in (
        ({**good, "gatee": {}}, "unknown top-level key 'gatee'"),
        ({**good, "sft": {"epochs": "many"}}, r"\[sft\]: epochs"),
        ({**good, "run": {"dataset": {"source": "x", "fieldz": 1}}}, r"\[run.dataset\]"),
    ):
        cfg = _write(tmp_path / "run.yaml", yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=message):
            prepare_run(cfg)


# ------------------------------------------------------------------------------ printing


def test_errors_print_user_text_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    from patchgap.cli import print_error

    text = "c.yaml [gate]: key gsm8k:train: at [/red] [bold]x :smile:"
    print_error(text)
    assert capsys.readouterr().err == f"error: {text}\n"
