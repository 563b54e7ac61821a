"""The data contract on small synthetic fixtures: presets, rejects, unreadable files, sources."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.config import validate
from patchgap.data import sources as R
from patchgap.data.fields import FieldMap, Record
from patchgap.data.registry import SOURCE_ROLES, named_sets
from patchgap.data.rejects import Counts, RejectSink
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import iter_records, load_records
from patchgap.data.writers import write_records_jsonl, write_records_parquet
from patchgap.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "records"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------ presets


def test_gsm8k_preset_gives_question_solution_and_hash_answer() -> None:
    res = load_records(DatasetSpec(source=str(ASSETS / "gsm8k_mini.jsonl"), fields="gsm8k"))
    assert [r.id for r in res.records] == ["gsm8k_mini-0", "gsm8k_mini-1", "gsm8k_mini-2"]
    first = res.records[0]
    assert first.question.startswith("Ada buys 3 pens")
    assert first.solution.endswith("#### 6")
    assert [r.answer for r in res.records] == ["6", "48", "1000"]
    assert first.meta == {}
    assert (res.counts.read, res.counts.valid, res.counts.rejected_total) == (3, 3, 0)


def test_math_json_array_uses_answer_field_else_boxed_and_rejects_non_objects() -> None:
    res = load_records(DatasetSpec(source=str(ASSETS / "math_mini.json"), fields="math"))
    assert [r.answer for r in res.records] == ["1", "2\\sqrt{2}", "2"]
    assert [r.id for r in res.records] == ["math_mini-0", "math_mini-1", "math_mini-3"]
    assert res.records[0].meta == {"level": "Level 1"}
    (rej,) = res.rejects
    assert (rej.kind, rej.line, rej.row) == ("not_object", 13, 2)
    assert rej.raw == "a stray string"


def test_messages_mode_takes_first_user_and_last_assistant_turn() -> None:
    res = load_records(DatasetSpec(source=str(ASSETS / "chat.jsonl"), fields="messages"))
    by_id = {r.id: r for r in res.records}
    assert set(by_id) == {"c1", "c2", "c3"}
    assert by_id["c1"].question == "What is 6 * 7?"
    assert by_id["c1"].answer == "42"
    assert by_id["c2"].meta == {"system": "You are a careful tutor.", "source": "synthetic"}
    # Several exchanges: first question, last answer, and the whole conversation kept.
    assert by_id["c3"].question == "What is 9 / 3?"
    assert by_id["c3"].solution == "9 / 3 = \\boxed{3}"
    assert len(by_id["c3"].meta["messages"]) == 4
    reasons = {r.line: r.reason for r in res.rejects}
    assert "no assistant turn" in reasons[4]
    assert "not a list" in reasons[5]


def test_qwen_style_sets_choices_index_units_and_numeric_answers(tmp_path: Path) -> None:
    mmlu = _jsonl(
        tmp_path / "mmlu.jsonl",
        [{"question": "Pick two.", "choices": ["1", "2", "3"], "answer": 1}],
    )
    (rec,) = load_records(DatasetSpec(source=str(mmlu), fields="mmlu_stem")).records
    assert rec.question == "Pick two.\nA) 1\nB) 2\nC) 3"
    assert (rec.answer, rec.solution) == ("B", "")

    asdiv = _jsonl(
        tmp_path / "asdiv.jsonl",
        [
            {
                "idx": 0,
                "body": "Ann has 2 cats.",
                "question": "How many cats?",
                "answer": "2 (cats)",
            },
            {
                "idx": 1,
                "body": "It is late.",
                "question": "What time is it?",
                "answer": "3:30 p.m.",
            },
        ],
    )
    recs = load_records(DatasetSpec(source=str(asdiv), fields="asdiv")).records
    assert recs[0].question == "Ann has 2 cats. How many cats?"
    assert [r.answer for r in recs] == ["2", "3:30 p.m."]
    assert [r.id for r in recs] == ["0", "1"]

    amc = _jsonl(tmp_path / "amc.jsonl", [{"id": 7, "problem": "How far?", "answer": 27.0}])
    (rec,) = load_records(DatasetSpec(source=str(amc), fields="amc23_qwen")).records
    assert (rec.id, rec.answer, rec.solution) == ("7", "27.0", "")


def test_list_valued_fields_join_first_or_last(tmp_path: Path) -> None:
    # An olympiad-style set: solutions and final answers stored as lists.
    rows = [
        {
            "id": 1,
            "question": "Find x.",
            "solution": ["Step one.", "So x = 2, i.e. $\\boxed{2}$."],
            "final_answer": ["$2$", "2"],
        },
        {"id": 2, "question": "Find y.", "solution": "y = 3.", "final_answer": "3"},
        {"id": 3, "question": "Find z.", "solution": ["z = 4."], "final_answer": []},
    ]
    path = _jsonl(tmp_path / "olympiad.jsonl", rows)
    plain = {"id": "id", "question": "question", "solution": "solution", "answer": "final_answer"}
    bad = load_records(DatasetSpec(source=str(path), fields=FieldMap(**plain)))
    assert bad.counts.rejected == {"wrong_type": 2}
    assert "set lists: {solution: join|first|last}" in bad.rejects[0].reason

    fields = FieldMap(**plain, lists={"solution": "join", "answer": "last"})
    recs = {r.id: r for r in load_records(DatasetSpec(source=str(path), fields=fields)).records}
    assert recs["1"].solution == "Step one.\n\nSo x = 2, i.e. $\\boxed{2}$."
    assert (recs["1"].answer, recs["2"].answer) == ("2", "3")  # a plain value is kept
    assert recs["3"].answer == "4"  # an empty answer list: extracted from the solution
    assert recs["1"].meta == {}  # the mapped fields are not copied into meta

    first = FieldMap(**plain, lists={"solution": "first", "answer": "first"}, join_with=" ")
    rec = load_records(DatasetSpec(source=str(path), fields=first)).records[0]
    assert (rec.solution, rec.answer) == ("Step one.", "$2$")
    with pytest.raises(ConfigError, match="lists.context: no context field"):
        validate(FieldMap, {**plain, "lists": {"context": "join"}}, "fields")
    with pytest.raises(ConfigError, match="lists.solution"):
        validate(FieldMap, {**plain, "lists": {"solution": "concat"}}, "fields")


def test_auto_detects_the_preset_and_names_it() -> None:
    res = load_records(str(ASSETS / "gsm8k_mini.jsonl"))
    assert res.counts.fields == "auto: gsm8k"
    assert res.records[2].answer == "1000"


def test_unknown_layout_is_one_clear_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"odd\.jsonl: cannot tell which fields.*prompt"):
        load_records(path)


def test_fieldmap_and_spec_validation_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="messages mode"):
        validate(FieldMap, {"messages": "messages", "question": "q"}, "fields")
    with pytest.raises(ConfigError, match="set solution, answer or both"):
        validate(FieldMap, {"question": "q"}, "fields")
    with pytest.raises(ConfigError, match="unknown field preset 'gsm9k'"):
        validate(DatasetSpec, {"source": "x.jsonl", "fields": "gsm9k"}, "data")
    with pytest.raises(ConfigError, match="limit"):
        validate(DatasetSpec, {"source": "x.jsonl", "limit": 0}, "data")
    custom = validate(
        DatasetSpec, {"source": "x.jsonl", "fields": {"question": "q", "solution": "s"}}, "data"
    )
    assert isinstance(custom.fields, FieldMap) and custom.fields.question == "q"


# ------------------------------------------------------------------------------ rejects


def test_bad_lines_go_to_rejects_with_line_and_reason(tmp_path: Path) -> None:
    rejects = tmp_path / "out" / "bad.rejects.jsonl"
    res = load_records(DatasetSpec(source=str(ASSETS / "bad_lines.jsonl")), rejects)
    assert [r.id for r in res.records] == ["a", "g"]
    assert res.rejects_path == rejects
    rows = _read_rejects(rejects)
    got = {(r["line"], r["kind"]) for r in rows}
    assert got == {
        (3, "invalid_json"),
        (4, "not_object"),
        (5, "missing_question"),
        (6, "empty_solution"),
        (7, "wrong_type"),
        (8, "no_answer"),
        (9, "duplicate_id"),
    }
    by_line = {r["line"]: r for r in rows}
    assert "column 73" in by_line[3]["reason"]
    assert by_line[3]["raw"].startswith('{"idx": "b"')
    assert "first at" in by_line[9]["reason"] and ":1" in by_line[9]["reason"]
    assert by_line[9]["id"] == "a"
    assert by_line[7]["reason"] == "field 'question' (question) is a int, not a string"
    assert all(r["source"].endswith("bad_lines.jsonl") for r in rows)
    # Nothing dropped silently: every non-blank line is either a record or a reject.
    c = res.counts
    assert (c.read, c.valid, c.rejected_total) == (9, 2, 7)
    assert c.rejected["invalid_json"] == 1


def test_reject_sink_replaces_a_stale_file_and_writes_nothing_when_clean(tmp_path: Path) -> None:
    rejects = tmp_path / "r.jsonl"
    rejects.write_text('{"stale": true}\n')
    res = load_records(ASSETS / "gsm8k_mini.jsonl", rejects)
    assert res.rejects_path is None
    assert not rejects.exists()


def test_iter_records_without_sink_logs_each_reject(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="patchgap.data.rejects"):
        ids = [r.id for r in iter_records(ASSETS / "bad_lines.jsonl")]
    assert ids == ["a", "g"]
    assert "bad_lines.jsonl:3" in caplog.text and "bad_lines.jsonl:9" in caplog.text


def test_id_types(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "ids.jsonl",
        [
            {"id": 3, "question": "q1", "solution": "s", "answer": "1"},
            {"id": 1.5, "question": "q2", "solution": "s", "answer": "1"},
            {"id": "", "question": "q3", "solution": "s", "answer": "1"},
            {"question": "q4", "solution": "s", "answer": "1"},
        ],
    )
    fm = FieldMap(id="id", question="question", solution="solution", answer="answer")
    res = load_records(DatasetSpec(source=str(path), fields=fm))
    assert [r.id for r in res.records] == ["3", "ids-3"]
    assert [(r.line, r.kind) for r in res.rejects] == [(2, "wrong_type"), (3, "bad_id")]


# ------------------------------------------------------------------------------ unreadable files


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing.jsonl", None, r"missing\.jsonl: no such file or folder"),
        ("data.csv", b"a,b\n1,2\n", r"data\.csv: unknown format '\.csv'"),
        ("empty.jsonl", b"\n\n", r"empty\.jsonl: empty file"),
        ("empty.json", b"  ", r"empty\.json: empty file"),
        ("none.json", b"[]", r"none\.json: empty JSON array"),
        (
            "garbage.jsonl",
            b"hello\nworld\n",
            r"garbage\.jsonl:1:1: Expecting value: not JSON Lines",
        ),
        ("binary.jsonl", b"\xff\xfe\x00\x01\n", r"binary\.jsonl:1:1: not UTF-8 text"),
        ("scalar.json", b"42", r"scalar\.json: top level is a JSON int"),
        ("broken.json", b'{"a": 1,\n "b": }', r"broken\.json:2:7: invalid JSON: Expecting value"),
        (
            "trunc.json",
            b'[{"a": 1},\n {"b": 2}',
            r"trunc\.json:2:10: invalid JSON: expected ',' or",
        ),
        ("bad.parquet", b"PAR1 this is not parquet", r"bad\.parquet: not a readable Parquet file"),
    ],
)
def test_unreadable_file_is_one_error_line(
    tmp_path: Path, name: str, content: bytes | None, pattern: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    sink = RejectSink(tmp_path / "rejects.jsonl")
    with pytest.raises(DataError, match=pattern) as info:
        list(iter_records(path, sink))
    sink.close()
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)
    assert not (tmp_path / "rejects.jsonl").exists()


def test_corrupt_json_array_names_line_and_column() -> None:
    with pytest.raises(DataError) as info:
        load_records(ASSETS / "corrupt_array.json")
    assert str(info.value).endswith(
        "corrupt_array.json:3:32: invalid JSON: Expecting ',' delimiter"
    )


def test_many_leading_bad_lines_fail_early(tmp_path: Path) -> None:
    path = tmp_path / "pretty.jsonl"
    path.write_text("[\n" + "".join('  {"question": "q"},\n' for _ in range(300)) + "]\n")
    with pytest.raises(DataError, match=r"pretty\.jsonl:1:2: .*none of the first 100 lines"):
        load_records(path)


def test_json_lines_saved_as_json_is_read_line_by_line(tmp_path: Path) -> None:
    src = (ASSETS / "gsm8k_mini.jsonl").read_text(encoding="utf-8")
    path = tmp_path / "lines.json"
    path.write_text(src + "{broken\n", encoding="utf-8")
    res = load_records(path)
    assert len(res.records) == 3
    assert [(r.line, r.kind) for r in res.rejects] == [(4, "invalid_json")]


# ------------------------------------------------------------------------------ folders, parquet


def test_folder_of_json_files_in_natural_order_with_path_ids() -> None:
    res = load_records(DatasetSpec(source=str(ASSETS / "mathdir"), fields="math"))
    assert [r.id for r in res.records] == [
        "mathdir/algebra/1",
        "mathdir/algebra/2",
        "mathdir/algebra/10",
    ]
    assert [r.answer for r in res.records] == ["2", "6", "9"]
    assert res.records[0].meta == {"level": "Level 1", "type": "Algebra"}
    # The corrupt file is one bad record; _manifest.json and README.txt are not records.
    (rej,) = res.rejects
    assert rej.kind == "invalid_json"
    assert rej.source.endswith("mathdir/geometry/0.json")
    assert rej.reason.startswith("2:")
    assert res.counts.read == 4


def test_parquet_source_and_records_roundtrip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "gsm.parquet"
    pq.write_table(
        pa.table(
            {
                "question": ["What is 1 + 2?", "What is 2 + 5?", None],
                "answer": ["1 + 2 = 3\n#### 3", "#### 7", "#### 0"],
                "split": ["train"] * 3,
            }
        ),
        src,
    )
    res = load_records(DatasetSpec(source=str(src), fields="gsm8k"))
    assert [(r.id, r.answer, r.meta) for r in res.records] == [
        ("gsm-0", "3", {"split": "train"}),
        ("gsm-1", "7", {"split": "train"}),
    ]
    (rej,) = res.rejects
    assert (rej.row, rej.line, rej.kind) == (2, None, "missing_question")

    recs = [
        Record("x1", "Q1", "S1 \\boxed{1}", "1", {"trials": 2, "accepted": True}),
        Record("x2", "Q2", "S2", "2", {"gate": ["r_task"], "nll": 1.25}),
    ]
    out = tmp_path / "d_r.parquet"
    assert write_records_parquet(recs, out, batch_size=1) == 2
    back = load_records(out)
    assert back.counts.fields == "auto: records"
    assert back.records == recs
    assert pq.ParquetFile(out).metadata.num_row_groups == 2


def test_jsonl_writer_roundtrip_is_atomic(tmp_path: Path) -> None:
    recs = load_records(ASSETS / "chat.jsonl").records
    out = tmp_path / "sub" / "records.jsonl"
    assert write_records_jsonl(recs, out) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["records.jsonl"]
    assert load_records(out).records == recs


# ------------------------------------------------------------------------------ limit and shuffle


def _numbered(tmp_path: Path, n: int, reverse: bool = False) -> Path:
    rows = [
        {"idx": i, "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(n)
    ]
    return _jsonl(tmp_path / f"n{n}{'r' if reverse else ''}.jsonl", rows[::-1] if reverse else rows)


def test_limit_is_a_fixed_seeded_subset(tmp_path: Path) -> None:
    path = _numbered(tmp_path, 60)

    def ids(**kw: object) -> list[str]:
        return [r.id for r in load_records(DatasetSpec(source=str(path), **kw)).records]

    first = ids(limit=10)
    assert len(first) == 10 and len(set(first)) == 10
    assert ids(limit=10) == first
    assert ids(limit=10, seed=1) != first
    assert first != [str(i) for i in range(10)]
    # Membership depends on the ids, not on where the records sit in the file.
    rev = _numbered(tmp_path, 60, reverse=True)
    assert [r.id for r in load_records(DatasetSpec(source=str(rev), limit=10)).records] == first
    # A larger subset contains the smaller one, so growing a demo slice keeps its records.
    assert set(first) <= set(ids(limit=20))
    assert ids(limit=10, shuffle=False) == [str(i) for i in range(10)]
    everything = ids(shuffle=True)
    assert sorted(everything, key=int) == [str(i) for i in range(60)]
    assert everything[:10] == first


def test_first_n_stops_reading_early(tmp_path: Path) -> None:
    path = _numbered(tmp_path, 50)
    counts = Counts()
    got = list(iter_records(DatasetSpec(source=str(path), limit=5, shuffle=False), None, counts))
    assert len(got) == 5
    assert (counts.read, counts.valid, counts.selected) == (5, 5, 5)


# ------------------------------------------------------------------------------ sources


@pytest.fixture
def fake_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    shutil.copy(ASSETS / "gsm8k_mini.jsonl", root / "gsm8k" / "train.jsonl")
    (root / "math_train").mkdir()
    shutil.copytree(ASSETS / "mathdir", root / "math_train" / "train")
    monkeypatch.setenv("PATCHGAP_DATA_DIR", str(root))
    return root


def test_named_sets_resolve_through_the_data_dir(fake_data_dir: Path) -> None:
    res = load_records("gsm8k:train")
    assert res.counts.fields == "gsm8k"
    assert [r.id for r in res.records] == ["gsm8k-train-0", "gsm8k-train-1", "gsm8k-train-2"]
    assert load_records(DatasetSpec(source="gsm8k", split="train")).counts.valid == 3
    math = load_records("math_train")
    assert math.records[0].id == "math_train/algebra/1"
    with pytest.raises(DataError, match="gsm8k: no split 'dev'; known: train, test"):
        load_records("gsm8k:dev")


def test_named_set_falls_back_to_the_hub(
    fake_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple] = []

    def fake_hub(repo: str, config: str | None, split: str, display: str) -> list[dict]:
        calls.append((repo, config, split))
        return [{"question": "What is 4 + 4?", "answer": "#### 8"}]

    monkeypatch.setattr(R, "_load_hub", fake_hub)
    (rec,) = load_records("gsm8k:test").records
    assert calls == [("openai/gsm8k", "main", "test")]
    assert (rec.id, rec.answer) == ("gsm8k-test-0", "8")
    load_records("aime24")  # our "test" split is the hub's "train" split
    assert calls[-1] == ("HuggingFaceH4/aime_2024", None, "train")


def test_named_set_missing_everywhere_says_set_the_data_dir(
    fake_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(repo: str, config: str | None, split: str, display: str) -> list[dict]:
        raise DataError(f"{display}: cannot load from the hub: offline")

    monkeypatch.setattr(R, "_load_hub", offline)
    with pytest.raises(
        DataError, match=r"gsm8k:test: .*does not exist, and .*offline.*PATCHGAP_DATA_DIR"
    ):
        load_records("gsm8k:test")
    with pytest.raises(DataError, match=r"amc23: .*no hub source; set PATCHGAP_DATA_DIR"):
        load_records("amc23")


_CARD = """---
configs:
- config_name: en
  data_files:
  - split: test
    path: en/test-*.jsonl
- config_name: fr
  data_files:
  - split: test
    path: fr/test-*.jsonl
---
# Olympiad-style problems (a local copy of a hub dataset repository)
"""


def test_hf_source_with_config_and_split_loads_a_local_hub_copy_through_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    repo = tmp_path / "hub" / "someone" / "olympiad"
    for lang, question in (("en", "Find x."), ("fr", "Trouver x.")):
        (repo / lang).mkdir(parents=True)
        row = {"id": 1, "question": question, "solution": ["a", "x = \\boxed{2}"], "final": [2]}
        _jsonl(repo / lang / "test-00000.jsonl", [row])
    (repo / "README.md").write_text(_CARD)
    monkeypatch.setenv("PATCHGAP_HUB_DIR", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    fields = FieldMap(
        id="id",
        question="question",
        solution="solution",
        answer="final",
        lists={"solution": "join", "answer": "last"},
    )
    spec = DatasetSpec(source="hf://someone/olympiad", hub_config="fr", split="test", fields=fields)
    res = load_records(spec)
    (rec,) = res.records
    assert (rec.question, rec.solution, rec.answer) == ("Trouver x.", "a\n\nx = \\boxed{2}", "2")
    assert res.counts.source == "hf://someone/olympiad (fr) [test]"
    from patchgap.cli.data import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fields.json").write_text(fields.model_dump_json())
    args = ["validate", "hf://someone/olympiad", "--hub-config", "en", "--split", "test"]
    cli = CliRunner().invoke(app, [*args, "--fields", "fields.json", "-o", "json"])
    assert cli.exit_code == 0, cli.output
    got = json.loads(cli.stdout)
    assert (got["source"], got["valid"]) == ("hf://someone/olympiad (en) [test]", 1)
    table = CliRunner().invoke(app, [*args, "--fields", "fields.json"])
    assert "hf://someone/olympiad (en) [test]  fields: custom" in table.stdout
    with pytest.raises(DataError, match=r"olympiad \(de\) \[test\]: cannot load from .*olympiad"):
        load_records(spec.model_copy(update={"hub_config": "de"}))


def test_hub_source_and_unknown_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        R,
        "_load_hub",
        lambda repo, config, split, display: [{"problem": "P", "solution": "\\boxed{5}"}],
    )
    (rec,) = load_records(DatasetSpec(source="hf://someone/mathy", split="test")).records
    assert (rec.id, rec.answer) == ("mathy-test-0", "5")
    with pytest.raises(DataError, match="not a named set"):
        load_records("no_such_set")
    with pytest.raises(DataError, match="split='test' applies only to named sets"):
        load_records(DatasetSpec(source=str(ASSETS / "gsm8k_mini.jsonl"), split="test"))


def test_s3_source_goes_through_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import patchgap.storage.store

    seen: list[tuple[str, Path, bool]] = []

    def fetch(uri: str, dest_dir: Path, external: bool) -> Path:
        seen.append((uri, Path(dest_dir), external))
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(ASSETS / "bad_lines.jsonl", Path(dest_dir) / "bad_lines.jsonl"))

    monkeypatch.setenv("PATCHGAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(patchgap.storage.store, "fetch_to_local", fetch)
    res = load_records("s3://bucket/sets/bad_lines.jsonl")
    assert [r.id for r in res.records] == ["a", "g"]
    assert seen[0][0] == "s3://bucket/sets/bad_lines.jsonl"
    assert (tmp_path / "cache") in seen[0][1].parents
    assert seen[0][2] is False  # a stage's input must carry a manifest
    load_records("s3://bucket/sets/bad_lines.jsonl", external=True)
    assert seen[1][2] is True  # the staging step reads external data
    # Rejects and counts name the URI the user gave, not the cache path.
    assert res.counts.source == "s3://bucket/sets/bad_lines.jsonl"
    assert res.rejects[0].where == "s3://bucket/sets/bad_lines.jsonl:3"


# ------------------------------------------------------------------------------ CLI


def test_cli_validate_reports_counts_and_rejects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patchgap.cli.data import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(ASSETS / "bad_lines.jsonl"), "--fields", "gsm8k"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "rejected" in result.output
    assert "duplicate_id" in result.output
    assert "7 written to bad_lines.rejects.jsonl" in result.output
    assert len(_read_rejects(tmp_path / "bad_lines.rejects.jsonl")) == 7

    clean = runner.invoke(app, ["validate", str(ASSETS / "gsm8k_mini.jsonl"), "--limit", "2"])
    assert clean.exit_code == 0, clean.output
    assert "rejects: none" in clean.output
    assert "selected" in clean.output


def test_cli_validate_unreadable_file_exits_2_with_one_line() -> None:
    from patchgap.cli.data import app

    result = CliRunner().invoke(app, ["validate", str(ASSETS / "corrupt_array.json")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "corrupt_array.json:3:32: invalid JSON" in lines[0]


def test_cli_validate_fields_from_yaml(tmp_path: Path) -> None:
    from patchgap.cli.data import app

    fields = tmp_path / "fields.yaml"
    fields.write_text("question: question\nsolution: answer\nid: idx\n")
    result = CliRunner().invoke(
        app,
        [
            "validate",
            str(ASSETS / "bad_lines.jsonl"),
            "--fields",
            str(fields),
            "--rejects",
            str(tmp_path / "r.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fields: custom" in result.output
    fields.write_text("question: question\n")
    bad = CliRunner().invoke(
        app, ["validate", str(ASSETS / "bad_lines.jsonl"), "--fields", str(fields)]
    )
    assert bad.exit_code == 2
    assert "set solution, answer or both" in bad.output


def test_cli_ls_lists_named_sets_and_local_state(fake_data_dir: Path) -> None:
    from patchgap.cli.data import app

    result = CliRunner().invoke(app, ["ls"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert str(fake_data_dir) in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "yes" in rows["gsm8k:train"] and "no" in rows["gsm8k:test"]
    assert "openai/gsm8k" in rows["gsm8k:test"]
    assert set(named_sets(*SOURCE_ROLES)) <= {name.split(":")[0] for name in rows}
