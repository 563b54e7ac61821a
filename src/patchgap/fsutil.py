"""Local files a user names: outputs never destroy inputs, and every write is atomic.

Two guarantees live here and nowhere else:

* :func:`refuse_output_over_input`: an output path that is, or resolves to (symlinks, ``..``,
  hard links), one of the command's inputs is refused before anything is opened, so a mistyped
  ``--rejects v.jsonl`` never truncates ``v.jsonl``.
* :func:`atomic_path` and the helpers built on it: a file or folder appears whole under its name
  or not at all. The content goes to a temporary name beside the destination (same folder, so
  the final ``os.replace`` is a rename on one file system), is flushed to disk and renamed into
  place only once complete; on failure the temporary is removed. A destination that is a
  symbolic link leading out of its folder is refused: the write never lands outside the folder
  the user named. This module holds the project's only ``os.replace``.

Standard library only (ground floor).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote

from patchgap.errors import ConfigError


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _local(item: str | os.PathLike[str] | None) -> Path | None:
    """The local path ``item`` names (``file://`` URIs included), or ``None`` for a remote URI
    (``s3://``), a named set or nothing."""
    if item is None:
        return None
    text = os.fspath(item)
    if text.startswith("file://"):
        return Path(unquote(text.removeprefix("file://").removeprefix("localhost")))
    if "://" in text or not text:
        return None
    return Path(text).expanduser()


def refuse_output_over_input(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None],
    flag: str = "output",
) -> None:
    """Raise :class:`ConfigError` when ``output`` is one of ``inputs`` or holds one.

    Compared three ways, so that no spelling slips through: the resolved paths (symlinks and
    ``..`` followed), the device and inode of files that exist (hard links, bind mounts), and,
    for an output folder, whether an input lies inside it (a command writing a folder may
    replace any file in it). Inputs that are not local paths (``s3://...``, named sets) are
    skipped by the caller passing ``None`` or by not existing as a path.
    """
    out = _local(output) or Path(output)
    out_resolved = out.expanduser().resolve(strict=False)
    if _local(output) is None:
        return
    for item in inputs:
        src = _local(item)
        if src is None:
            continue
        src_resolved = src.resolve(strict=False)
        same = src_resolved == out_resolved or _same_file(src, out)
        inside = out.is_dir() and src_resolved.is_relative_to(out_resolved)
        if same or inside:
            how = "is" if same else "holds"
            raise ConfigError(
                f"{flag} {out}: {how} the input {src}; writing it would destroy the input, "
                "choose another path"
            )


def _refuse_link_out_of_folder(dest: Path) -> None:
    # os.replace on a symlink replaces the link, not its target; still, a link planted where an
    # output goes is a sign of a hostile or confused folder, and a link leading elsewhere is
    # refused outright so that no later reader follows it to a file we never wrote.
    if not dest.is_symlink():
        return
    folder = dest.parent.resolve()
    target = dest.resolve(strict=False)
    if not target.is_relative_to(folder):
        raise ConfigError(
            f"{dest}: is a symbolic link to {target}, outside {folder}; refusing to write "
            "through it (remove the link)"
        )


def _temp_beside(dest: Path, mode: int) -> Path:
    """Create an empty, new temporary file next to ``dest``; the name is unique per process and
    per call, so threads writing the same destination do not share one."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    os.close(fd)
    return tmp


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk; a file system that
    # cannot fsync a folder (some network ones) still got an atomic rename, so that is not fatal.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace(tmp: Path, dest: Path) -> None:
    """The one rename into place: flush the content, refuse a link out of the folder, rename."""
    if tmp.is_file():
        _fsync_file(tmp)
    _refuse_link_out_of_folder(dest)
    os.replace(tmp, dest)
    _fsync_folder(dest.parent)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` to write; on a clean exit it replaces ``dest``, on
    an exception it is removed and ``dest`` is left as it was.

    The parent folder is created. ``mode`` sets the file's permission bits exactly (``0o600``
    for secrets: the file is created with them, so it is never readable by others even briefly);
    without it the file gets the usual ``0o666`` less the umask, as ``open(..., "w")`` would.
    A ``dest`` that is a symbolic link out of its folder is refused before anything is written.
    """
    dest = Path(dest)
    _refuse_link_out_of_folder(dest)
    if dest.is_dir() and not dest.is_symlink():
        raise ConfigError(f"{dest}: is a folder; give a file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.chmod(tmp, mode)  # the umask may have taken bits away at creation
        yield tmp
        _replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicTextFile:
    """A text file open for writing under a temporary name beside ``dest``, for writers that
    decide only at the end whether the result stands: :meth:`publish` moves it to ``dest``,
    :meth:`discard` removes it."""

    def __init__(self, dest: str | os.PathLike[str], encoding: str = "utf-8") -> None:
        self.dest = Path(dest)
        _refuse_link_out_of_folder(self.dest)
        if self.dest.is_dir() and not self.dest.is_symlink():
            raise ConfigError(f"{self.dest}: is a folder; give a file name")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temp_beside(self.dest, 0o666)
        self.fh = self.tmp.open("w", encoding=encoding)

    def write(self, text: str) -> None:
        self.fh.write(text)

    def publish(self) -> None:
        self.fh.close()
        try:
            _replace(self.tmp, self.dest)
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
        if dest.is_symlink():
            dest.unlink()  # the link goes, never the folder it points to
        elif dest.exists():
            shutil.rmtree(dest)
        _replace(work, dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
