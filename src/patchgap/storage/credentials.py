"""The embedded server's state on disk that clients need too: the generated key pair, the
0600 env file that carries it with the endpoint, and whether the server behind the PID file lives.

Both the store (to borrow the local keys while the embedded server runs) and the server (to write
them) use this module, so neither has to import the other for it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path

from patchgap import settings
from patchgap.fsutil import write_text_atomic

ENV_FILE_NAME = "s3.env"
SERVER_DIR_NAME = "seaweedfs"
PID_FILE_NAME = "weed.pid"


@dataclass(frozen=True)
class Credentials:
    """The access key pair of the embedded server's only identity."""

    access_key_id: str
    # Out of the repr: one traceback or debug log line must not leak it.
    secret_access_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> Credentials:
        upper = string.ascii_uppercase + string.digits
        alnum = string.ascii_letters + string.digits
        return cls(
            access_key_id="PG" + "".join(secrets.choice(upper) for _ in range(18)),
            secret_access_key="".join(secrets.choice(alnum) for _ in range(40)),
        )


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``export`` prefixes, quotes and comments allowed)."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def write_private(path: Path, text: str) -> None:
    """Write a secret-bearing file atomically with mode 0600 (never briefly world-readable)."""
    write_text_atomic(path, text, mode=0o600)


def _reap(pid: int) -> None:
    # A server started by this very process (CLI runner, test fixture) becomes a zombie once
    # it exits; reap it so liveness checks see it gone.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def is_weed(pid: int) -> bool:
    """Whether pid is a ``weed`` process (guards against a recycled PID); True where unknowable."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():
        return True
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and Path(argv[0].decode(errors="replace")).name == "weed" and b"mini" in argv


def env_file_path(home: Path | None = None) -> Path:
    return (Path(home) if home is not None else settings.home_dir()) / ENV_FILE_NAME


def read_pid(pid_file: Path) -> int | None:
    """The PID in ``pid_file``; None when there is none, -1 when it holds garbage."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else -1


def embedded_env(home: Path | None = None) -> dict[str, str] | None:
    """The env file's variables when the embedded server in ``home`` is running, else None."""
    home = Path(home) if home is not None else settings.home_dir()
    env_file = env_file_path(home)
    if not env_file.is_file():
        return None
    pid = read_pid(home / SERVER_DIR_NAME / PID_FILE_NAME)
    if pid is None or pid <= 0 or not (alive(pid) and is_weed(pid)):
        return None
    values = read_env_file(env_file)
    return values if values.get("AWS_ACCESS_KEY_ID") else None
