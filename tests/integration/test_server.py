"""The embedded SeaweedFS lifecycle: `store up|status|env|down`, port clashes, stale PIDs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.errors import StoreError
from patchgap.storage.server import EmbeddedS3, Ports, find_weed, free_s3_port, read_env_file

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _needs_weed() -> None:
    try:
        find_weed()
    except StoreError as err:
        pytest.skip(str(err))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PATCHGAP_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"
    EmbeddedS3(tmp_path / "home", bucket=None).stop(timeout=5)  # never leak a server


def _grpc_refuses_a_client_without_certificate(port: int) -> bool:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                tls.recv(1)  # TLS 1.3 reports the missing certificate on the first read
        except ssl.SSLError as err:  # a plaintext server would fail the handshake otherwise
            return "CERTIFICATE_REQUIRED" in str(err)
    return False


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_store_up_status_env_down(home: Path) -> None:
    from patchgap.cli.store import app

    port = free_s3_port()
    server = EmbeddedS3(home, port, bucket=None)
    server.pid_file.parent.mkdir(parents=True)
    server.pid_file.write_text(f"{_dead_pid()}\n")  # left by a crashed server
    runner = CliRunner()

    up = runner.invoke(app, ["up", "--port", str(port)])
    assert up.exit_code == 0, up.output
    assert "removed a stale PID file" in up.output and f"127.0.0.1:{port}" in up.output
    print(up.output)

    env_file = home / "s3.env"
    assert oct(os.stat(env_file).st_mode & 0o777) == "0o600"
    assert oct(os.stat(server.identities_file).st_mode & 0o777) == "0o600"
    creds = read_env_file(env_file)
    assert creds["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{port}"

    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0 and "ready" in status.output

    exported = runner.invoke(app, ["env"])
    assert f"export AWS_SECRET_ACCESS_KEY={creds['AWS_SECRET_ACCESS_KEY']}" in exported.output

    # The default bucket exists and the exported credentials work.
    from patchgap.storage.store import S3Settings, Store

    store = Store(
        S3Settings(
            endpoint_url=creds["AWS_ENDPOINT_URL_S3"],
            access_key_id=creds["AWS_ACCESS_KEY_ID"],
            secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
            addressing_style="path",
        )
    )
    store.put_bytes(b"kept", "s3://patchgap/persist.txt")

    # Only the S3 port is a door: the filer and volume ports refuse anyone without a token
    # signed by the gateway, and no other local user can read the files on disk.
    ports = dict(Ports(port).all())
    for url in (
        f"http://127.0.0.1:{ports['filer']}/buckets/patchgap/persist.txt",
        f"http://127.0.0.1:{ports['filer']}/buckets/patchgap/",
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
    put = urllib.request.Request(
        f"http://127.0.0.1:{ports['filer']}/buckets/patchgap/evil.txt", data=b"x", method="PUT"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(put, timeout=5)
    assert refused.value.code == 401 and not store.exists("s3://patchgap/evil.txt")
    # Every gRPC port demands a client certificate from the server's private CA.
    for role in ("master gRPC", "volume gRPC", "filer gRPC"):
        assert _grpc_refuses_a_client_without_certificate(ports[role]), role
    for folder in (home, server.server_dir, server.data_dir):
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder
    # The object files themselves are the owner's alone too, and so are the log and PID file.
    written = [p for p in server.data_dir.rglob("*") if p.suffix in (".dat", ".idx")]
    assert written and all(p.stat().st_mode & 0o077 == 0 for p in written)
    for path in (server.log_file, server.pid_file):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    # Its Unix sockets (fixed paths in /tmp) take the umask: no other user may connect.
    sockets = [s for _, n in Ports(port).all() for s in Path("/tmp").glob(f"seaweedfs-*-{n}.sock")]
    assert sockets and all(p.lstat().st_mode & 0o077 == 0 for p in sockets)

    again = runner.invoke(app, ["up"])
    assert again.exit_code == 0 and "already running" in again.output

    down = runner.invoke(app, ["down"])
    assert down.exit_code == 0 and "stopped" in down.output
    assert not server.pid_file.exists()
    assert not (Path(tempfile.gettempdir()) / f"seaweedfs-s3-{port}.sock").exists()
    # Stopped, nothing of its state is open to others: SeaweedFS writes its volume descriptors
    # (.vif) 0644 whatever the umask, and `down` (like `up`) clears those bits too.
    state = [home, *home.rglob("*")]
    assert any(p.suffix == ".vif" for p in state)
    assert [p for p in state if p.lstat().st_mode & 0o077] == []
    stopped = runner.invoke(app, ["status"])
    assert stopped.exit_code == 1 and "stopped" in stopped.output

    # Restart: same credentials, same data.
    assert runner.invoke(app, ["up"]).exit_code == 0
    assert read_env_file(env_file)["AWS_ACCESS_KEY_ID"] == creds["AWS_ACCESS_KEY_ID"]
    assert store.get_bytes("s3://patchgap/persist.txt") == b"kept"
    assert runner.invoke(app, ["down"]).exit_code == 0


def test_port_in_use_is_named(home: Path) -> None:
    port = free_s3_port()
    volume_port = dict(Ports(port).all())["volume"]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", volume_port))
        blocker.listen()
        with pytest.raises(StoreError, match=rf"port {volume_port} on 127.0.0.1 is already in use"):
            EmbeddedS3(home, port, bucket=None).start()
    assert not EmbeddedS3(home, bucket=None).status(probe=False).running


def test_stale_pid_is_detected_and_cleared(home: Path) -> None:
    from patchgap.cli.store import app

    server = EmbeddedS3(home, free_s3_port(), bucket=None)
    server.pid_file.parent.mkdir(parents=True)
    dead = _dead_pid()
    server.pid_file.write_text(f"{dead}\n")
    st = server.status()
    assert not st.running and st.stale_pid == dead

    # A live PID that is not SeaweedFS (PID reuse) is stale too.
    server.pid_file.write_text(f"{os.getpid()}\n")
    assert server.status(probe=False).stale_pid == os.getpid()

    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 1 and "stale PID file" in result.output
    result = CliRunner().invoke(app, ["down"])
    assert "removed a stale PID file" in result.output and not server.pid_file.exists()


def test_env_before_first_start_is_a_clear_error(home: Path) -> None:
    from patchgap.cli.store import app

    result = CliRunner().invoke(app, ["env"])
    assert isinstance(result.exception, StoreError)
    assert "patchgap store up" in str(result.exception)
