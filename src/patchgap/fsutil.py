"""Atomic writes on the local disk: a file or folder appears whole under its name or not at all.

Every writer of a local file that a reader (a later stage, a resumed run, the store) may pick up
goes through here, so that a crash or an error never leaves a half-written file under the final
name: the content goes to a temporary name beside the destination (same folder, so the final
``os.replace`` is a rename on one file system) and is renamed into place only once complete; on
failure the temporary is removed.

Standard library only (ground floor).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temp_beside(dest: Path, mode: int) -> Path:
    """Create an empty, new temporary file next to ``dest``; the name is unique per process and
    per call, so threads writing the same destination do not share one."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` to write; on a clean exit it replaces ``dest``, on
    an exception it is removed and ``dest`` is left as it was.

    The parent folder is created. ``mode`` sets the file's permission bits exactly (``0o600``
    for secrets: the file is created with them, so it is never readable by others even briefly);
    without it the file gets the usual ``0o666`` less the umask, as ``open(..., "w")`` would.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.chmod(tmp, mode)  # the umask may have taken bits away at creation
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicTextFile:
    """A text file open for writing under a temporary name beside ``dest``, for writers that
    decide only at the end whether the result stands: :meth:`publish` moves it to ``dest``,
    :meth:`discard` removes it."""

    def __init__(self, dest: str | os.PathLike[str], encoding: str = "utf-8") -> None:
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temp_beside(self.dest, 0o666)
        self.fh = self.tmp.open("w", encoding=encoding)

    def write(self, text: str) -> None:
        self.fh.write(text)

    def publish(self) -> None:
        self.fh.close()
        try:
            os.replace(self.tmp, self.dest)
        finally:
            self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def write_text_atomic(
    dest: str | os.PathLike[str], text: str, *, mode: int | None = None, encoding: str = "utf-8"
) -> None:
    """Write ``text`` to ``dest`` atomically (see :func:`atomic_path`)."""
    with atomic_path(dest, mode=mode) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_bytes_atomic(
    dest: str | os.PathLike[str], data: bytes, *, mode: int | None = None
) -> None:
    """Write ``data`` to ``dest`` atomically (see :func:`atomic_path`)."""
    with atomic_path(dest, mode=mode) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a work folder's path beside ``dest`` (not yet created) to build; on a clean exit it
    takes the place of ``dest`` (an existing ``dest`` is removed first), on an exception it is
    removed.

    A folder that is complete only once its last file is written (a converted model) is thus
    never seen half-built under its final name.
    """
    dest = Path(dest)
    work = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)  # left by an earlier crash of a process with the same id
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield work
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
