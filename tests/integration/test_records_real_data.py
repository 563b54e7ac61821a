"""The data contract on the real public sets, read in place from the data directory."""

from __future__ import annotations

from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from patchgap.data.registry import SOURCE_ROLES, named_sets
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import LoadResult, load_records

pytestmark = pytest.mark.integration

# Row counts as stated in each folder's PROVENANCE.md (asdiv's is not stated there: its file has
# 2215 lines, checked below against the file itself).
EXPECTED = {
    "gsm8k:train": 7473,
    "gsm8k:test": 1319,
    "math500": 500,
    "math_train": 7500,
    "math_test5000": 5000,
    "amc23": 40,
    "authors_rewrites": 4,
    "aime24": 30,
    "amc23_qwen": 40,
    "minerva_math": 272,
    "sat_math": 32,
    "mmlu_stem": 3018,
    "asdiv": 2215,
    "gsm8k_qwen": 1319,
}


@cache
def _load(name: str) -> LoadResult:
    # Each set is read once per session (math_train is 7500 files); rejects stay in memory.
    return load_records(name)


def _lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_set_loads_clean_with_provenance_count(data_dir: Path, name: str) -> None:
    set_name, _, split = name.partition(":")
    entry = named_sets(*SOURCE_ROLES)[set_name]
    rel = entry.paths[split or entry.default_split]
    res = _load(name)
    assert res.counts.source == str(data_dir / rel)
    assert res.counts.rejected_total == 0, res.rejects[:3]
    assert res.rejects == []
    assert len(res.records) == res.counts.read == EXPECTED[name]
    if rel.endswith(".jsonl"):
        assert _lines(data_dir / rel) == EXPECTED[name]
    assert len({r.id for r in res.records}) == len(res.records)
    assert all(r.question.strip() and r.answer.strip() for r in res.records)


def test_gsm8k_records_carry_the_hash_answer(data_dir: Path) -> None:
    recs = _load("gsm8k:train").records
    assert (recs[0].id, recs[0].answer) == ("gsm8k-train-0", "72")
    tails = [r.solution.rsplit("####", 1)[1].strip().replace(",", "") for r in recs]
    assert [r.answer for r in recs] == tails


def test_math_train_folder_ids_and_subject_counts(data_dir: Path) -> None:
    recs = _load("math_train").records
    subjects = Counter(r.id.split("/")[1] for r in recs)
    # Per-subject file counts from math_train/PROVENANCE.md.
    assert subjects == {
        "algebra": 1744,
        "counting_and_probability": 771,
        "geometry": 870,
        "intermediate_algebra": 1295,
        "number_theory": 869,
        "prealgebra": 1205,
        "precalculus": 746,
    }
    assert recs[0].id == "math_train/algebra/0"
    assert set(recs[0].meta) == {"level", "type"}


def test_math500_keeps_unique_ids_and_given_answers(data_dir: Path) -> None:
    recs = _load("math500").records
    assert recs[0].id == "test/precalculus/807.json"
    assert recs[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {"subject", "level"} <= set(recs[0].meta)


def test_demo_slice_is_a_stable_seeded_subset(data_dir: Path) -> None:
    spec = DatasetSpec(source="gsm8k:train", limit=200, seed=0)
    first = [r.id for r in load_records(spec).records]
    again = [r.id for r in load_records(spec).records]
    assert first == again and len(set(first)) == 200
    # Not just the head of the file.
    assert max(int(i.rsplit("-", 1)[1]) for i in first) > 1000


def test_cli_validate_on_a_real_set(data_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from patchgap.cli.data import app

    result = CliRunner().invoke(
        app, ["validate", "math500", "--rejects", str(tmp_path / "r.jsonl")]
    )
    assert result.exit_code == 0, result.output
    assert "500" in result.output and "rejects: none" in result.output
