"""The rewrite stage's cheap size estimate, which sizes the generator and picks the backend."""

from __future__ import annotations

import json
from pathlib import Path

from patchgap.stages.rewrite import expected_records


def _lines(n: int, final_newline: bool) -> str:
    text = "\n".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) for i in range(n))
    return text + ("\n" if final_newline else "")


def test_the_last_line_counts_with_or_without_a_final_newline(tmp_path: Path) -> None:
    for final in (True, False):
        path = tmp_path / f"d{final}.jsonl"
        path.write_text(_lines(4, final))
        assert expected_records(path, None, 1) == 4
        assert expected_records(path, None, 2) == 2
        assert expected_records(path, 3, 1) == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert expected_records(empty, None, 1) == 0


def test_bookkeeping_files_of_a_folder_are_not_records(tmp_path: Path) -> None:
    (tmp_path / "records.jsonl").write_text(_lines(5, True))
    (tmp_path / "_rejects.jsonl").write_text(_lines(7, True))
    (tmp_path / "_manifest.json").write_text(json.dumps({"files": {}}, indent=2) + "\n")
    assert expected_records(tmp_path, None, 1) == 5
    (tmp_path / "notes.txt").write_text("not a dataset file\n")
    assert expected_records(tmp_path, None, 1) is None  # nothing cheap to say
