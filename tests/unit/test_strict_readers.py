"""The readers refuse what they used to accept in silence: duplicate keys and columns, NaN and
infinite values, field maps naming fields the data lacks, and guessed layouts. Each refusal is
one line naming the file, the line (or row) and a reason."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.data.fields import PRESETS, FieldMap, Record, detect_fields, fitting_layouts
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.data.writers import write_records_jsonl, write_records_parquet
from patchgap.errors import DataError

GSM = '"question": "Q{n}?", "answer": "{n} + 0 = {n}\\n#### {n}"'


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ duplicate keys


def test_jsonl_line_with_a_duplicate_key_is_rejected_with_its_line(tmp_path: Path) -> None:
    lines = [
        "{" + GSM.format(n=1) + "}",
        '{"question": "Q2?", "answer": "#### 2", "answer": "#### 3"}',
        '{"question": "Q3?", "answer": "#### 3", "meta": {"a": 1, "a": 2}}',
        "{" + GSM.format(n=4) + "}",
    ]
    res = load_records(DatasetSpec(source=str(_write(tmp_path / "d.jsonl", "\n".join(lines)))))
    assert [r.question for r in res.records] == ["Q1?", "Q4?"]
    assert [(r.where, r.kind, r.reason) for r in res.rejects] == [
        (f"{tmp_path / 'd.jsonl'}:2", "duplicate_key", "duplicate key 'answer' in a JSON object"),
        (f"{tmp_path / 'd.jsonl'}:3", "duplicate_key", "duplicate key 'a' in a JSON object"),
    ]


def test_json_array_element_and_single_object_with_duplicate_keys(tmp_path: Path) -> None:
    array = (
        '[\n {"question": "Q1?", "answer": "#### 1"},\n'
        ' {"question": "a", "question": "b",\n  "answer": "#### 2"},\n'
        ' {"question": "Q3?", "answer": "#### 3"}\n]'
    )
    res = load_records(DatasetSpec(source=str(_write(tmp_path / "a.json", array))))
    assert [r.question for r in res.records] == ["Q1?", "Q3?"]
    (rej,) = res.rejects
    assert (rej.where, rej.kind) == (f"{tmp_path / 'a.json'}:3", "duplicate_key")
    assert "'question'" in rej.reason
    # A folder of one-problem files (the MATH layout): the bad file is one reject.
    folder = tmp_path / "probs"
    folder.mkdir()
    _write(folder / "1.json", '{"problem": "P", "solution": "\\\\boxed{1}"}')
    _write(folder / "2.json", '{"problem": "P", "problem": "Q", "solution": "\\\\boxed{2}"}')
    res = load_records(DatasetSpec(source=str(folder), fields="math"))
    assert [r.id for r in res.records] == ["probs/1"]
    assert [(r.kind, r.where) for r in res.rejects] == [("duplicate_key", f"{folder}/2.json:1")]


def test_parquet_with_a_duplicate_column_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays(
        [pa.array(["Q?"]), pa.array(["#### 1"]), pa.array(["#### 2"])],
        names=["question", "answer", "answer"],
    )
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"dup\.parquet: duplicate column 'answer'"):
        load_records(DatasetSpec(source=str(path)))


# ------------------------------------------------------------------------------ NaN and infinity


def test_nan_and_infinite_answers_are_rejected(tmp_path: Path) -> None:
    lines = [
        '{"problem": "P1", "answer": NaN}',
        '{"problem": "P2", "answer": Infinity}',
        '{"problem": "P3", "answer": 1e999}',
        '{"problem": "P4", "answer": 4, "extra": [1, {"x": -Infinity}]}',
        '{"problem": "P5", "answer": 5.0}',
    ]
    res = load_records(
        DatasetSpec(source=str(_write(tmp_path / "n.jsonl", "\n".join(lines))), fields="amc23_qwen")
    )
    assert [r.answer for r in res.records] == ["5.0"]
    assert [r.kind for r in res.rejects] == ["not_finite"] * 4
    assert res.rejects[0].reason == "field 'answer' holds nan, which is not a number"
    assert res.rejects[3].reason == "field 'extra' holds -inf, which is not a number"
    assert res.rejects[2].where == f"{tmp_path / 'n.jsonl'}:3"


def test_parquet_nan_answer_is_rejected_with_its_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"problem": ["P1", "P2"], "answer": [1.0, math.nan]}), path)
    res = load_records(DatasetSpec(source=str(path), fields="amc23_qwen"))
    assert [r.answer for r in res.records] == ["1.0"]
    (rej,) = res.rejects
    assert (rej.where, rej.kind) == (f"{path} row 1", "not_finite")


def test_writers_never_write_bare_nan(tmp_path: Path) -> None:
    bad = Record("a", "Q", "S", "1", {"score": math.nan})
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_records_jsonl([bad], tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_records_parquet([bad], tmp_path / "out.parquet")
    assert not (tmp_path / "out.jsonl").exists()  # atomic: nothing half-written is left
    good = Record("b", "Q", "S", "1", {"score": 0.5})
    write_records_jsonl([good], tmp_path / "ok.jsonl")
    json.loads((tmp_path / "ok.jsonl").read_text(), parse_constant=_no_constants)


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} written")


# ------------------------------------------------------------------------------ field names


def test_a_written_field_map_naming_an_absent_field_is_an_error(tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", "{" + GSM.format(n=1) + "}\n{" + GSM.format(n=2) + "}\n")
    typo = FieldMap(question="question", solution="answr")
    with pytest.raises(DataError, match=r"d\.jsonl: the field map names solution field 'answr'"):
        load_records(DatasetSpec(source=str(data), fields=typo))
    # An optional field the user named is still worth an error when no row has it.
    with_id = FieldMap(id="uid", question="question", solution="answer")
    with pytest.raises(DataError, match=r"d\.jsonl: the field map names id field 'uid'"):
        load_records(DatasetSpec(source=str(data), fields=with_id))
    # Present in some rows only: those rows use it, the others fall back (no error).
    mixed = _write(tmp_path / "m.jsonl", '{"uid": "x", ' + GSM.format(n=1) + "}\n")
    _write(mixed, mixed.read_text() + "{" + GSM.format(n=2) + "}\n")
    assert [r.id for r in load_records(DatasetSpec(source=str(mixed), fields=with_id)).records] == [
        "x",
        "m-1",
    ]
    # A preset's optional field (GSM8K's idx) may be absent from every row.
    assert len(load_records(DatasetSpec(source=str(data), fields="gsm8k")).records) == 2


# ------------------------------------------------------------------------------ no guessing


def _college_math(tmp_path: Path) -> Path:
    """Question + LaTeX answer rows, as a college-math set lays them out (no '#### N' line)."""
    rows = [
        {"question": "Divide (4-8i) by (3+... ) and simplify.", "answer": "\\frac{48i-56}{85}"},
        {"question": "Solve x^2 = 2.", "answer": "\\pm\\sqrt{2}"},
    ]
    return _write(tmp_path / "college.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def test_latex_answers_are_not_read_as_gsm8k(tmp_path: Path) -> None:
    path = _college_math(tmp_path)
    with pytest.raises(DataError) as err:
        load_records(DatasetSpec(source=str(path)))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: cannot tell which fields")
    assert "gsm8k: field 'answer' has no '#### <number>' line" in text
    # Named explicitly, the gsm8k preset rejects each row instead of taking "85" as the answer.
    res = load_records(DatasetSpec(source=str(path), fields="gsm8k"))
    assert res.records == []
    assert {r.kind for r in res.rejects} == {"no_answer"}
    assert "has no '#### <number>' line (answer_format: gsm8k)" in res.rejects[0].reason
    # The right map reads it: the LaTeX answer is the answer.
    fm = FieldMap(question="question", answer="answer")
    (first, _) = load_records(DatasetSpec(source=str(path), fields=fm)).records
    assert first.answer == "\\frac{48i-56}{85}"


def test_two_fitting_layouts_are_refused_naming_both(tmp_path: Path) -> None:
    row = {"question": "Q?", "options": "A) 1 B) 2", "Answer": "A", "choices": ["1", "2"]}
    row["answer"] = 0
    assert fitting_layouts(row) == ["sat_math", "mmlu_stem"]
    path = _write(tmp_path / "both.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"both\.jsonl: the first record fits several layouts: "):
        load_records(DatasetSpec(source=str(path)))
    # The more specific layout is no guess: MATH-500 rows also have amc23_qwen's fields.
    math500 = {"problem": "P", "solution": "\\boxed{1}", "answer": "1", "unique_id": "u"}
    assert detect_fields(math500) == "math500"
    assert detect_fields({"question": "Q", "answer": "so\n#### 7"}) == "gsm8k"


def test_presets_keep_their_answer_format() -> None:
    assert PRESETS["gsm8k"].answer_format == "gsm8k"
    assert PRESETS["math"].answer_format == "boxed"
    # MATH writes "\boxed 9" without braces as well.
    assert detect_fields({"problem": "P", "solution": "so $x = \\boxed 9$."}) == "math"


# ------------------------------------------------------------------------------ CLI


def test_data_validate_shows_the_mapping_and_a_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patchgap.cli.data import app

    monkeypatch.chdir(tmp_path)
    data = _write(tmp_path / "d.jsonl", "{" + GSM.format(n=72) + "}\n")
    res = CliRunner().invoke(app, ["validate", str(data)])
    assert res.exit_code == 0, res.output
    assert "mapping: id <- idx, question <- question, solution <- answer" in res.output
    assert "answer <- extracted from 'answer' (gsm8k format)" in res.output
    assert "sample: id: 'd-0' | question: 'Q72?'" in res.output and "answer: '72'" in res.output
    res = CliRunner().invoke(app, ["validate", str(data), "--output-format", "json"])
    out = json.loads(res.stdout)
    assert out["mapping"]["solution"] == "answer" and out["sample"]["answer"] == "72"
    res = CliRunner().invoke(app, ["validate", str(_college_math(tmp_path))])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "college.jsonl: cannot tell which fields" in res.output
