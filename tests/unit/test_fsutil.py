"""Atomic local writes: a destination holds the old content or the whole new one, never a part,
and no temporary file is left behind either way."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from patchgap.fsutil import AtomicTextFile, atomic_folder, atomic_path, write_text_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "out.jsonl"
    write_text_atomic(dest, "old\n")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert dest.read_text() == "old\n"
    assert _leftovers(dest.parent) == []


def test_private_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_text_atomic(tmp_path / "s3.env", "KEY=1\n", mode=0o600)
        write_text_atomic(tmp_path / "plain.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s3.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666


def test_text_file_published_or_discarded(tmp_path: Path) -> None:
    kept, dropped = AtomicTextFile(tmp_path / "a.jsonl"), AtomicTextFile(tmp_path / "b.jsonl")
    kept.write("1\n")
    dropped.write("2\n")
    kept.publish()
    dropped.discard()
    assert (tmp_path / "a.jsonl").read_text() == "1\n"
    assert not (tmp_path / "b.jsonl").exists()
    assert _leftovers(tmp_path) == []


def test_folder_replaces_the_old_one_only_when_complete(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(dest) as work:
        work.mkdir()
        (work / "new.bin").write_text("half")
        raise RuntimeError("conversion failed")
    assert sorted(p.name for p in dest.iterdir()) == ["old.bin"]
    with atomic_folder(dest) as work:
        work.mkdir()
        (work / "new.bin").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.bin"]
    assert _leftovers(tmp_path) == []
