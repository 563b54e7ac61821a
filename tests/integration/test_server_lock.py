"""`store up|down|status` at the same time: one lock over the server's PID file and credentials,
so two starts make one server, one PID file and one key pair (docs/failure.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchgap.errors import StoreError
from patchgap.storage.credentials import alive, read_env_file, read_pid
from patchgap.storage.server import EmbeddedS3, find_weed, free_s3_port

pytestmark = pytest.mark.integration

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    try:
        find_weed()
    except StoreError as err:
        pytest.skip(str(err))
    yield tmp_path / "home"
    EmbeddedS3(tmp_path / "home", bucket=None).stop(timeout=5)  # never leak a server


def _store(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PATCHGAP_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "patchgap.cli.main", "store", *args, "--home", str(home)],
        env={**env, "PYTHONPATH": str(SRC)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _weeds_of(home: Path) -> list[int]:
    """Live `weed` processes whose data folder is under ``home``."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name == "weed":
            if any(a.decode(errors="replace").startswith(f"-dir={home}") for a in argv):
                out.append(int(proc.name))
    return out


def _one_key_pair(home: Path) -> str:
    """The env file's access key, checked to be the server's only identity."""
    env = read_env_file(home / "s3.env")
    ids = json.loads((home / "seaweedfs" / "identities.json").read_text())["identities"]
    assert [c["accessKey"] for i in ids for c in i["credentials"]] == [env["AWS_ACCESS_KEY_ID"]]
    return env["AWS_ACCESS_KEY_ID"]


def test_two_store_up_at_once_start_one_server(home: Path) -> None:
    port = str(free_s3_port())
    procs = [_store(home, "up", "--port", port, "--bucket", "patchgap") for _ in range(2)]
    outputs = [(p.wait(180), p.communicate()[0]) for p in procs]
    assert [code for code, _ in outputs] == [0, 0], outputs

    weeds = _weeds_of(home)
    assert len(weeds) == 1, weeds
    assert read_pid(home / "seaweedfs" / "weed.pid") == weeds[0]
    _one_key_pair(home)
    started = [out for _, out in outputs if "SeaweedFS started in" in out]
    assert len(started) == 1, outputs
    other = next(out for _, out in outputs if out is not started[0])
    # Waited for the winner: one line; came after it had finished: the usual block.
    assert (
        "started meanwhile by another" in other
        and other.count("\n") == 1
        or ("SeaweedFS already running" in other)
    ), other


def test_store_up_waits_for_the_lock_holder_and_says_so_in_one_line(home: Path) -> None:
    port = free_s3_port()
    server = EmbeddedS3(home, port, bucket=None)
    with server.locked():
        loser = _store(home, "up", "--port", str(port), "--bucket", "patchgap")
        time.sleep(2.0)  # it has imported and now waits on the lock
        assert loser.poll() is None
        server.start(wait=True)  # re-entrant: the start this process holds the lock for
        key = _one_key_pair(home)
    code, out = loser.wait(120), loser.communicate()[0]
    assert code == 0, out
    assert out.count("\n") == 1 and f"another `patchgap store up` (pid {os.getpid()})" in out
    assert _weeds_of(home) == [read_pid(server.pid_file)]
    assert _one_key_pair(home) == key  # the waiting one did not make its own credentials


def test_status_and_down_respect_a_start_in_progress(home: Path) -> None:
    server = EmbeddedS3(home, free_s3_port(), bucket=None)
    with server.locked():
        status = _store(home, "status")
        code, out = status.wait(60), status.communicate()[0]
        # Busy for more than 5 s: one line naming the lock and its holder, exit 2.
        assert code == 2, out
        assert out.count("\n") == 1 and str(server.lock_file) in out and str(os.getpid()) in out
        down = _store(home, "down")
        server.start(wait=True)
        pid = read_pid(server.pid_file)
    # `down` waited for the start, then stopped what it started; nothing is left running.
    code, out = down.wait(120), down.communicate()[0]
    assert code == 0 and f"stopped SeaweedFS (pid {pid})" in out, out
    assert pid is not None and not alive(pid) and _weeds_of(home) == []
