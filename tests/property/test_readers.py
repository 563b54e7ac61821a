"""Property tests of the readers and the field mapper: whatever bytes, JSON values or JSONL
lines they are fed, they answer with records or the project's own errors and rejects (never a
traceback), write nothing outside the folder they are given, and leave the input as it was."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchgap.data.convert import RecordError, to_record
from patchgap.data.evalsets import load_math_set
from patchgap.data.fields import PRESETS, AmbiguousLayout, FieldMap, detect_fields
from patchgap.data.registry import NamedSet
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import LoadResult, load_records
from patchgap.data.writers import write_records_jsonl
from patchgap.errors import PatchgapError

pytestmark = pytest.mark.property

# A fixed, small budget: the file runs in well under a minute on a loaded machine.
BUDGET = settings(
    max_examples=75,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Keys the presets name, so random objects often look like real layouts.
_KEYS = sorted(
    {k for fm in PRESETS.values() for k in fm.model_dump().values() if isinstance(k, str)}
)
KEYS = st.sampled_from([*_KEYS, "x", "meta", "messages"]) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["#### 42", "so \\boxed{7}", "\\frac{48i-56}{85}", "(B)", ""])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
OBJECTS = st.dictionaries(KEYS, JSON, max_size=7)
FIELDS = st.sampled_from(["auto", *PRESETS]) | st.builds(
    lambda q, s, a, c: FieldMap(question=q, solution=s, answer=a, choices=c),
    st.sampled_from(["question", "problem", "Problem"]),
    st.sampled_from([None, "solution", "answer"]),
    st.sampled_from(["answer", "Answer"]),
    st.sampled_from([None, "choices", "options"]),
)
SUFFIXES = st.sampled_from([".jsonl", ".json", ".parquet", ".txt", ".jsonl.bz2"])


@contextmanager
def _folders() -> Iterator[tuple[Path, Path]]:
    """An input folder and an output folder, with the working directory in a third, empty one
    (so a stray relative write would show)."""
    with tempfile.TemporaryDirectory() as root:
        base = Path(root)
        src, out, cwd = base / "in", base / "out", base / "cwd"
        for d in (src, out, cwd):
            d.mkdir()
        old = Path.cwd()
        os.chdir(cwd)
        try:
            yield src, out
        finally:
            os.chdir(old)
            assert list(cwd.iterdir()) == [], "wrote into the working directory"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _read(path: Path, out: Path, fields: Any) -> LoadResult | None:
    """load_records, accepting only the project's own errors."""
    try:
        return load_records(DatasetSpec(source=str(path), fields=fields), out / "rejects.jsonl")
    except PatchgapError as err:
        assert "\n" not in str(err).strip(), "an error is one line"
        return None


def _check_read(path: Path, out: Path, fields: Any) -> None:
    before = _snapshot(path.parent)
    result = _read(path, out, fields)
    assert _snapshot(path.parent) == before, "the input was modified"
    assert {p.name for p in out.iterdir()} <= {"rejects.jsonl", "records.jsonl"}
    if (out / "rejects.jsonl").exists():  # valid JSON, no bare NaN
        _strict_jsonl(out / "rejects.jsonl")
    if result is not None and result.records:
        # What was read writes back as valid JSON and reads back the same.
        write_records_jsonl(result.records, out / "records.jsonl")
        _strict_jsonl(out / "records.jsonl")
        again = load_records(DatasetSpec(source=str(out / "records.jsonl"), fields="records"))
        assert [r.id for r in again.records] == [r.id for r in result.records]
        assert [r.answer for r in again.records] == [r.answer for r in result.records]


def _strict_jsonl(path: Path) -> None:
    # split on "\n" only: str.splitlines also breaks at U+0085 and U+2028 inside strings
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            json.loads(line, parse_constant=_refuse)


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} written")


@BUDGET
@given(data=st.binary(max_size=400), suffix=SUFFIXES, fields=FIELDS)
def test_random_bytes(data: bytes, suffix: str, fields: Any) -> None:
    with _folders() as (src, out):
        path = src / f"data{suffix}"
        path.write_bytes(data)
        _check_read(path, out, fields)
        try:
            load_math_set(
                NamedSet("m", "math", {"test": str(path)}, FieldMap(question="q", answer="a"))
            )
        except PatchgapError:
            pass
        assert path.read_bytes() == data


@BUDGET
@given(value=JSON | OBJECTS, fields=FIELDS)
def test_random_json_document(value: Any, fields: Any) -> None:
    with _folders() as (src, out):
        path = src / "doc.json"
        path.write_text(json.dumps(value), encoding="utf-8")
        _check_read(path, out, fields)


@BUDGET
@given(rows=st.lists(OBJECTS | JSON, min_size=1, max_size=6), fields=FIELDS)
def test_random_jsonl_values(rows: list[Any], fields: Any) -> None:
    with _folders() as (src, out):
        path = src / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        _check_read(path, out, fields)
        # The math-set path reads the same file through the same reader.
        try:
            load_math_set(
                NamedSet(
                    "m", "math", {"test": str(path)}, FieldMap(question="question", answer="answer")
                )
            )
        except PatchgapError:
            pass


@BUDGET
@given(
    lines=st.lists(
        st.text(max_size=60) | st.sampled_from(['{"a": 1, "a": 2}', "NaN", "[1,", '{"q": NaN}']),
        min_size=1,
        max_size=8,
    ),
    fields=FIELDS,
)
def test_random_jsonl_lines(lines: list[str], fields: Any) -> None:
    text = "\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines)
    with _folders() as (src, out):
        path = src / "lines.jsonl"
        path.write_text(text, encoding="utf-8")
        _check_read(path, out, fields)


@BUDGET
@given(row=OBJECTS, fields=FIELDS)
def test_field_mapper_answers_with_a_record_or_a_reject(row: dict[str, Any], fields: Any) -> None:
    fm = fields if isinstance(fields, FieldMap) else PRESETS.get(fields, PRESETS["gsm8k"])
    try:
        rec = to_record(row, fm, "row-0")
    except RecordError as err:
        assert err.kind and err.reason
    else:
        assert rec.question.strip() and rec.answer.strip()
        json.dumps(rec.to_dict(), default=str, allow_nan=False)  # writable as strict JSON
    try:
        name = detect_fields(row)
    except AmbiguousLayout as err:
        assert len(err.names) > 1
    else:
        assert name is None or name in PRESETS
