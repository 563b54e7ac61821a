"""Object storage: one API over ``s3://`` URIs, ``file://`` URIs and local paths, with sha256
manifests written last so a reader trusts an output only when it is complete and intact.

Publishing an output to S3 is one atomic switch (:meth:`Store.upload_dir`): each attempt uploads
its objects under ``<prefix>/_attempts/<attempt>/``, then writes ``<prefix>/_manifest.json`` with
a conditional PutObject (If-None-Match / If-Match on the manifest it read first). The manifest
names the attempt, so readers see the old complete output or the new one, never a mix; of two
writers that started from the same manifest the first to switch wins and the other gets
:class:`PublishConflict`. Readers take only what the current manifest lists."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from patchgap import __version__
from patchgap.errors import ChecksumError, StoreError
from patchgap.fsutil import atomic_path, write_text_atomic
from patchgap.storage.credentials import embedded_env, env_file_path

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = 1
# Format 2: the objects live under ATTEMPTS_DIR/<attempt>/ beside the manifest that names them.
MANIFEST_FORMAT_ATTEMPTS = 2
ATTEMPTS_DIR = "_attempts"
_ATTEMPT_RE = re.compile(r"^(\d{1,12})-[0-9a-f]{1,32}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
log = logging.getLogger(__name__)
_MiB = 1024 * 1024
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# -- settings ----------------------------------------------------------------------------------


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StoreError(f"environment variable {name}={raw!r} must be an integer") from None
    if value < 1:
        raise StoreError(f"environment variable {name}={raw!r} must be at least 1")
    return value


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. Built from the environment (:meth:`from_env`), never from code or YAML.

    ``source`` says where the values came from, for error messages.
    """

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    # Out of the repr: one traceback or debug log line must not leak them.
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    addressing_style: str = "auto"
    retry_mode: str = "standard"
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    multipart_threshold: int = 16 * _MiB
    multipart_chunksize: int = 16 * _MiB
    max_concurrency: int = 4
    source: str = "environment"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> S3Settings:
        """Read the standard ``AWS_*`` variables plus ``PATCHGAP_S3_*`` tuning.

        Endpoint: ``PATCHGAP_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL_S3``, else
        ``AWS_ENDPOINT_URL``. With no credentials and no profile in the environment, the
        embedded server's env file is used while that server runs (``patchgap store up``).
        Tuning: ``PATCHGAP_S3_ADDRESSING_STYLE`` (path|virtual|auto), ``AWS_RETRY_MODE``
        (standard|adaptive), ``AWS_MAX_ATTEMPTS``, ``PATCHGAP_S3_MULTIPART_THRESHOLD_MB``,
        ``PATCHGAP_S3_MULTIPART_CHUNK_MB``, ``PATCHGAP_S3_MAX_CONCURRENCY``.
        """
        env = dict(os.environ if environ is None else environ)
        source = "environment"
        endpoint = (
            env.get("PATCHGAP_S3_ENDPOINT")
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or None
        )
        if not env.get("AWS_ACCESS_KEY_ID") and not env.get("AWS_PROFILE"):
            embedded = embedded_env()
            local = embedded.get("AWS_ENDPOINT_URL_S3") if embedded else None
            # Only borrow the local keys for the local endpoint, never for a remote one.
            if embedded and (endpoint is None or endpoint.rstrip("/") == (local or "")):
                env = {**embedded, **env}  # what the environment does set still wins
                endpoint = endpoint or local
                source = f"embedded server env file ({env_file_path()})"
        style = env.get("PATCHGAP_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
        if style not in ("path", "virtual", "auto"):
            raise StoreError(f"PATCHGAP_S3_ADDRESSING_STYLE={style!r}: use path, virtual or auto")
        mode = env.get("AWS_RETRY_MODE") or "standard"
        if mode not in ("standard", "adaptive", "legacy"):
            raise StoreError(f"AWS_RETRY_MODE={mode!r}: use standard or adaptive")
        return cls(
            endpoint_url=endpoint,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            addressing_style=style,
            retry_mode=mode,
            max_attempts=_env_int(env, "AWS_MAX_ATTEMPTS", 5),
            multipart_threshold=_env_int(env, "PATCHGAP_S3_MULTIPART_THRESHOLD_MB", 16) * _MiB,
            multipart_chunksize=_env_int(env, "PATCHGAP_S3_MULTIPART_CHUNK_MB", 16) * _MiB,
            max_concurrency=_env_int(env, "PATCHGAP_S3_MAX_CONCURRENCY", 4),
            source=source,
        )


# -- URIs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Url:
    """A parsed ``s3://bucket/key`` (key may be empty or a prefix)."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, rel: str) -> S3Url:
        base = self.key.rstrip("/")
        return S3Url(self.bucket, f"{base}/{rel}" if base else rel)

    def as_prefix(self) -> str:
        """The key as a folder prefix: '' or ending in '/'."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"


def parse_uri(uri: str | os.PathLike[str]) -> S3Url | Path:
    """``s3://bucket/key`` to :class:`S3Url`; ``file://`` URIs and plain paths to :class:`Path`."""
    if isinstance(uri, os.PathLike):
        return Path(uri)
    text = str(uri)
    match = _SCHEME.match(text)
    if match is None:
        return Path(text).expanduser()
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StoreError(f"{text}: an s3:// URI needs a bucket, e.g. s3://patchgap/runs/")
        return S3Url(bucket, key)
    if scheme == "file":
        rest = rest.removeprefix("localhost")
        if not rest.startswith("/"):
            raise StoreError(f"{text}: a file:// URI needs an absolute path, e.g. file:///data/x")
        return Path(unquote(rest))
    raise StoreError(f"{text}: unsupported URI scheme {scheme!r}; use s3://, file:// or a path")


def join_uri(prefix_uri: str | os.PathLike[str], *parts: str) -> str:
    """Append '/'-separated parts to a URI or path, keeping its kind."""
    loc = parse_uri(prefix_uri)
    rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if isinstance(loc, S3Url):
        return loc.child(rel).uri if rel else loc.uri
    return str(loc / rel) if rel else str(loc)


def safe_target(local_dir: Path, key: str) -> Path:
    """Where ``key`` lands under ``local_dir``; a key that would escape it is refused."""
    pure = PurePosixPath(key)
    bad = (
        not key
        or "\0" in key
        or "\\" in key
        or pure.is_absolute()
        or any(part in ("..", ".", "") for part in key.split("/"))
    )
    root = local_dir.resolve()
    target = (root / pure).resolve() if not bad else root
    if bad or not target.is_relative_to(root) or target == root:
        raise StoreError(f"refusing key {key!r}: it would escape the target folder {local_dir}")
    return target


# -- manifests ---------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], chunk: int = _MiB) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """sha256 and size of every object of one output, plus its metadata (config, versions,
    input hashes). Written last: its presence means the output is complete.

    ``attempt`` (format 2) names the upload whose objects it lists: they live under
    ``_attempts/<attempt>/`` beside it (:meth:`location`). Format 1 manifests (no attempt) list
    objects stored directly under the prefix; local folders are still published that way.
    ``generation`` counts the switches of this prefix (1 for its first format-2 publish).
    """

    files: dict[str, ManifestEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    patchgap_version: str = ""
    format: int = MANIFEST_FORMAT
    attempt: str = ""
    generation: int = 0

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())

    def location(self, key: str) -> str:
        """Where the object of ``key`` lies, relative to the output's prefix."""
        return f"{ATTEMPTS_DIR}/{self.attempt}/{key}" if self.attempt else key

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format": self.format,
            "created_at": self.created_at,
            "patchgap_version": self.patchgap_version,
            "files": {k: {"sha256": e.sha256, "size": e.size} for k, e in self.files.items()},
            "metadata": self.metadata,
        }
        if self.attempt:
            data.update(attempt=self.attempt, generation=self.generation)
        return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        """Parse and check a manifest; anything else is one :class:`StoreError` line."""
        try:
            data = json.loads(text)
            return _manifest_from_data(data)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            # One line whatever the parser said (JSON errors can quote the bad bytes).
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise StoreError(f"{source}: not a valid manifest ({reason})") from None


def _manifest_from_data(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError(f"a JSON object expected, got {type(data).__name__}")
    if not isinstance(data.get("files"), dict):
        raise ValueError("no 'files' object")
    files = {}
    for key, value in data["files"].items():
        sha, size = value["sha256"], value["size"]
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise ValueError(f"file {key!r}: sha256 is not 64 hex digits")
        files[str(key)] = ManifestEntry(sha, _count(size, f"file {key!r}: size"))
    fmt = data.get("format", MANIFEST_FORMAT)
    if fmt not in (MANIFEST_FORMAT, MANIFEST_FORMAT_ATTEMPTS):
        raise ValueError(f"format {fmt!r} is not one this version reads (1 or 2)")
    attempt = data.get("attempt", "")
    if fmt == MANIFEST_FORMAT_ATTEMPTS and not (
        isinstance(attempt, str) and _ATTEMPT_RE.match(attempt)
    ):
        raise ValueError(f"attempt {attempt!r} is not <generation>-<hex>")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' is not an object")
    generation = int(attempt.split("-", 1)[0]) if fmt == MANIFEST_FORMAT_ATTEMPTS else 0
    return Manifest(
        files=files,
        metadata=metadata,
        created_at=str(data.get("created_at", "")),
        patchgap_version=str(data.get("patchgap_version", "")),
        format=fmt,
        attempt=attempt if fmt == MANIFEST_FORMAT_ATTEMPTS else "",
        generation=generation,
    )


def _count(value: Any, what: str) -> int:
    """A manifest's size or format: a whole number, not negative (``1e999`` and ``-1`` are
    corruption, and ``3.5`` would silently verify against ``3``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}: {value!r} is not a whole number >= 0")
    return value


def _json_default(obj: Any) -> Any:
    # Configs are pydantic models and paths are common in metadata; store them readably.
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _local_files(local_dir: Path, skip_manifest: bool = True) -> list[tuple[str, Path]]:
    """(key, path) for every file under local_dir, sorted; the top-level manifest is left out
    by default because upload_dir writes its own."""
    out = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            key = path.relative_to(local_dir).as_posix()
            if not (skip_manifest and key == MANIFEST_NAME):
                out.append((key, path))
    return out


#: Which files of a folder a publish leaves out, by key (None: none).
Exclude = Callable[[str], bool] | None


def build_manifest(
    local_dir: Path,
    metadata: dict[str, Any] | None = None,
    attempt: str = "",
    exclude: Exclude = None,
) -> Manifest:
    """The manifest of every file under ``local_dir`` (its own manifest left out, and any key
    ``exclude`` picks); with an ``attempt`` (``<generation>-<hex>``), a format-2 manifest whose
    objects live under it."""
    return Manifest(
        files={
            key: ManifestEntry(sha256_file(p), p.stat().st_size)
            for key, p in _local_files(local_dir)
            if exclude is None or not exclude(key)
        },
        metadata=dict(metadata or {}),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        patchgap_version=__version__,
        format=MANIFEST_FORMAT_ATTEMPTS if attempt else MANIFEST_FORMAT,
        attempt=attempt,
        generation=int(attempt.split("-", 1)[0]) if attempt else 0,
    )


def write_manifest(local_dir: Path, metadata: dict[str, Any] | None = None) -> Manifest:
    """Write ``local_dir``'s manifest into it, last: what a staging step does for its output."""
    manifest = build_manifest(local_dir, metadata)
    _atomic_local_write(
        local_dir / MANIFEST_NAME, lambda tmp: tmp.write_text(manifest.to_json(), "utf-8")
    )
    return manifest


# -- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: ``key`` is relative to the listed prefix ('/'-separated)."""

    uri: str
    key: str
    size: int
    etag: str = ""  # S3's ETag, or mtime and size for a local file: changes when the bytes do


_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_AUTH_CODES = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
}


class Store:
    """Reads and writes objects by URI. The boto3 client is created on first S3 use, so a
    store used only with local paths needs no S3 configuration."""

    def __init__(self, settings: S3Settings | None = None) -> None:
        self._settings = settings
        self._client: Any = None

    @classmethod
    def from_env(cls) -> Store:
        return cls(S3Settings.from_env())

    @property
    def settings(self) -> S3Settings:
        if self._settings is None:
            self._settings = S3Settings.from_env()
        return self._settings

    @property
    def client(self) -> Any:
        if self._client is not None:
            return self._client
        import boto3
        from botocore.config import Config

        s = self.settings
        # Sessions are not thread-safe and workers of _parallel may get here together.
        with _SESSION_LOCK:
            if self._client is not None:
                return self._client
            self._client = _session(boto3).client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                aws_session_token=s.session_token,
                config=Config(
                    s3={"addressing_style": s.addressing_style},
                    retries={"mode": s.retry_mode, "total_max_attempts": s.max_attempts},
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.read_timeout,
                    # _parallel runs max_concurrency transfers, each with max_concurrency part
                    # threads on this one client; a smaller pool makes urllib3 drop connections
                    # with "Connection pool is full" warnings.
                    max_pool_connections=max(10, s.max_concurrency * (s.max_concurrency + 1)),
                ),
            )
        return self._client

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
            use_threads=s.max_concurrency > 1,
        )

    # -- error translation ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, url: S3Url, action: str) -> Iterator[None]:
        """Turn botocore failures into one StoreError line naming the URI and what to do."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreError(
                f"{url.uri}: no S3 credentials ({self.settings.source}); set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, or start the embedded server: patchgap store up"
            ) from None
        except (EndpointConnectionError, ConnectionError) as err:
            endpoint = self.settings.endpoint_url or "the AWS S3 endpoint"
            raise StoreError(
                f"{url.uri}: cannot reach S3 at {endpoint} ({type(err).__name__}); is the server "
                "running (patchgap store status) and AWS_ENDPOINT_URL_S3 right?"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            raise self._client_error(url, action, code, str(err)) from None
        except S3UploadFailedError as err:
            text = str(err)
            code = next((c for c in _MISSING_CODES | _AUTH_CODES if f"({c})" in text), "")
            raise self._client_error(url, action, code, text) from None

    def _client_error(self, url: S3Url, action: str, code: str, text: str) -> StoreError:
        if code in _AUTH_CODES:
            return StoreError(
                f"{url.uri}: access denied ({code}) with credentials from {self.settings.source};"
                " check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        if code in _MISSING_CODES:
            if code == "NoSuchBucket" or not self._bucket_exists(url.bucket):
                return StoreError(
                    f"{url.uri}: bucket {url.bucket!r} does not exist at "
                    f"{self.settings.endpoint_url or 'AWS'}; create it or pick another bucket"
                )
            return StoreError(f"{url.uri}: no such object")
        return StoreError(f"{url.uri}: S3 {action} failed: {text}")

    def _bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError:
            return False
        except BotoCoreError:
            return True  # unknown: do not claim it is missing
        return True

    # -- single objects ------------------------------------------------------------------------

    def put_file(self, local: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
        """Upload (or copy) one file; large files go up in parallel multipart chunks."""
        src = Path(local)
        if not src.is_file():
            raise StoreError(f"{src}: no such local file to upload")
        loc = parse_uri(uri)
        if isinstance(loc, S3Url):
            _require_key(loc)
            with self._errors(loc, "upload"):
                self.client.upload_file(str(src), loc.bucket, loc.key, Config=self._transfer())
        else:
            _atomic_local_write(loc, lambda tmp: shutil.copyfile(src, tmp))

    def get_file(self, uri: str | os.PathLike[str], local: str | os.PathLike[str]) -> Path:
        """Download (or copy) one object to ``local``; parents are created."""
        dest = Path(local)
        loc = parse_uri(uri)
        if isinstance(loc, S3Url):
            _require_key(loc)
            dest.parent.mkdir(parents=True, exist_ok=True)

            def fetch(tmp: Path) -> None:
                with self._errors(loc, "download"):
                    self.client.download_file(
                        loc.bucket, loc.key, str(tmp), Config=self._transfer()
                    )

            _atomic_local_write(dest, fetch)
        else:
            if not loc.is_file():
                raise StoreError(f"{loc}: no such file")
            _atomic_local_write(dest, lambda tmp: shutil.copyfile(loc, tmp))
        return dest

    def put_bytes(self, data: bytes, uri: str | os.PathLike[str]) -> None:
        loc = parse_uri(uri)
        if isinstance(loc, S3Url):
            _require_key(loc)
            with self._errors(loc, "upload"):
                self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        else:
            _atomic_local_write(loc, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, uri: str | os.PathLike[str]) -> bytes:
        data = self._get_bytes_or_none(uri)
        if data is None:
            raise StoreError(f"{uri}: no such object")
        return data

    def _get_bytes_or_none(self, uri: str | os.PathLike[str]) -> bytes | None:
        loc = parse_uri(uri)
        if isinstance(loc, S3Url):
            _require_key(loc)
            from botocore.exceptions import ClientError

            with self._errors(loc, "download"):
                try:
                    return self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
                except ClientError as err:
                    if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                        return None
                    raise
        return loc.read_bytes() if loc.is_file() else None

    def get_bytes_and_etag(self, uri: str | os.PathLike[str]) -> tuple[bytes, str] | None:
        """An object's bytes and its version tag for :meth:`put_bytes_if`; None when absent."""
        loc = parse_uri(uri)
        if not isinstance(loc, S3Url):
            data = loc.read_bytes() if loc.is_file() else None
            return None if data is None else (data, hashlib.sha256(data).hexdigest())
        _require_key(loc)
        from botocore.exceptions import ClientError

        with self._errors(loc, "download"):
            try:
                got = self.client.get_object(Bucket=loc.bucket, Key=loc.key)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return got["Body"].read(), str(got["ETag"])

    def put_bytes_if(self, data: bytes, uri: str | os.PathLike[str], etag: str | None) -> bool:
        """Write only if the object is absent (``etag=None``) or still has ``etag``; False when
        another writer got there first. S3 does it with If-None-Match / If-Match; a local
        folder under an exclusive lock."""
        loc = parse_uri(uri)
        if not isinstance(loc, S3Url):
            with _folder_lock(loc.parent):
                now = self.get_bytes_and_etag(loc)
                if (now[1] if now else None) != etag:
                    return False
                self.put_bytes(data, loc)
                return True
        _require_key(loc)
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        with self._errors(loc, "upload"):
            try:
                self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **cond)
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                if etag is not None and code in ("NoSuchKey", "404"):
                    return False  # If-Match on an object deleted meanwhile: it changed too
                raise
        return True

    def exists(self, uri: str | os.PathLike[str]) -> bool:
        """Whether an object (or local file) is there; a missing bucket is an error."""
        loc = parse_uri(uri)
        if isinstance(loc, S3Url):
            _require_key(loc)
            from botocore.exceptions import ClientError

            with self._errors(loc, "head"):
                try:
                    self.client.head_object(Bucket=loc.bucket, Key=loc.key)
                except ClientError as err:
                    if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                        raise
                    if not self._bucket_exists(loc.bucket):
                        raise
                    return False
            return True
        return loc.is_file()

    def list(self, prefix_uri: str | os.PathLike[str]) -> list[ObjectInfo]:
        """Every object under a folder-like prefix, sorted by key (recursive)."""
        loc = parse_uri(prefix_uri)
        if isinstance(loc, S3Url):
            prefix = loc.as_prefix()
            out = []
            with self._errors(loc, "list"):
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=loc.bucket, Prefix=prefix
                )
                for page in pages:
                    for obj in page.get("Contents", []):
                        key = obj["Key"]
                        if key.endswith("/"):
                            continue  # folder markers made by some tools
                        out.append(
                            ObjectInfo(
                                uri=f"s3://{loc.bucket}/{key}",
                                key=key[len(prefix) :],
                                size=int(obj["Size"]),
                                etag=str(obj.get("ETag", "")).strip('"'),
                            )
                        )
            return sorted(out, key=lambda o: o.key)
        if not loc.is_dir():
            return []
        out = []
        for key, path in _local_files(loc, skip_manifest=False):
            st = path.stat()
            out.append(ObjectInfo(str(path), key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size}"))
        return out

    def delete(self, uri: str | os.PathLike[str]) -> None:
        """Delete one object; deleting a missing one is not an error."""
        loc = parse_uri(uri)
        if isinstance(loc, S3Url):
            _require_key(loc)
            with self._errors(loc, "delete"):
                self.client.delete_object(Bucket=loc.bucket, Key=loc.key)
        else:
            loc.unlink(missing_ok=True)

    def delete_prefix(self, prefix_uri: str | os.PathLike[str]) -> int:
        """Delete every object under a prefix; returns how many."""
        objects = self.list(prefix_uri)
        for obj in objects:
            self.delete(obj.uri)
        return len(objects)

    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket unless it exists (and is ours)."""
        url = S3Url(bucket, "")
        from botocore.exceptions import ClientError

        with self._errors(url, "create bucket"):
            try:
                self.client.head_bucket(Bucket=bucket)
                return
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                    raise
            kwargs: dict[str, Any] = {"Bucket": bucket}
            if self.settings.endpoint_url is None and self.settings.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
            try:
                self.client.create_bucket(**kwargs)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    # -- folders with manifests ----------------------------------------------------------------

    def read_manifest(self, prefix_uri: str | os.PathLike[str]) -> Manifest | None:
        """The manifest of the output at ``prefix_uri``; None means the output is not complete."""
        uri = join_uri(prefix_uri, MANIFEST_NAME)
        data = self._get_bytes_or_none(uri)
        return None if data is None else Manifest.from_json(data, uri)

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix_uri: str | os.PathLike[str],
        metadata: dict[str, Any] | None = None,
        exclude: Exclude = None,
    ) -> Manifest:
        """Publish every file of ``local_dir`` (but those whose key ``exclude`` picks) as the
        output at ``prefix_uri``; the manifest goes LAST and is the one switch from the old
        output to the new one.

        S3: the objects go under ``_attempts/<attempt>/``, then the manifest is written only if
        the one read at the start is still there (If-Match / If-None-Match). A writer that loses
        that race removes its objects and raises :class:`PublishConflict`; the winner removes
        the objects of the outputs it replaced. Readers meanwhile see the old complete output.
        A local folder is published in place under a lock (see :func:`_publish_local`).
        """
        src = Path(local_dir)
        if not src.is_dir():
            raise StoreError(f"{src}: no such local folder to upload")
        loc = parse_uri(prefix_uri)
        if not isinstance(loc, S3Url):
            return _publish_local(self, src, loc, metadata, exclude)
        current = self.get_bytes_and_etag(join_uri(prefix_uri, MANIFEST_NAME))
        old = _manifest_or_none(current[0], prefix_uri) if current else None
        generation = (old.generation if old else 0) + 1
        manifest = build_manifest(src, metadata, f"{generation}-{uuid.uuid4().hex[:16]}", exclude)
        try:
            body = manifest.to_json().encode()
        except TypeError as err:
            raise StoreError(f"{prefix_uri}: manifest metadata is not JSON ({err})") from None
        mine = manifest.attempt
        try:
            self._parallel(
                [(src / k, join_uri(prefix_uri, manifest.location(k))) for k in manifest.files],
                lambda item: self.put_file(item[0], item[1]),
            )
            won = self.put_bytes_if(
                body, join_uri(prefix_uri, MANIFEST_NAME), current[1] if current else None
            )
        except BaseException:
            # A switch whose answer was lost may still have happened: never remove a current
            # output's objects.
            if not _is_current(self, prefix_uri, mine):
                self._remove_attempts(loc, lambda name: name == mine)
            raise
        if not won and not _is_current(self, prefix_uri, mine):
            self._remove_attempts(loc, lambda name: name == mine)
            raise PublishConflict(
                f"{join_uri(prefix_uri, MANIFEST_NAME)}: another writer published this output "
                f"while this upload ran; its output is kept and this one ({mine}) "
                "was removed; run one writer per prefix, or rerun to replace it"
            )
        self._remove_replaced(loc, manifest, old)
        return manifest

    def _remove_replaced(self, loc: S3Url, manifest: Manifest, old: Manifest | None) -> None:
        """After a successful switch: remove every attempt that can no longer become current
        (generation up to ours: each started from a manifest that is gone now, so its switch
        must fail) and the objects of a replaced format-1 output. Best effort."""

        def doomed(name: str) -> bool:
            match = _ATTEMPT_RE.match(name)
            return name != manifest.attempt and (
                match is None or int(match.group(1)) <= manifest.generation
            )

        self._remove_attempts(loc, doomed)
        if old is not None and not old.attempt:
            # Only keys that stay inside the prefix: a server may normalise "a/../b" to "b".
            for key in (
                k for k in old.files if "" not in k.split("/") and ".." not in k.split("/")
            ):
                with contextlib.suppress(StoreError):
                    self.delete(loc.child(key).uri)

    def _remove_attempts(self, loc: S3Url, which: Callable[[str], bool]) -> None:
        """Delete the objects of the attempts under ``loc`` that ``which`` picks; failures are
        logged, never raised (a leftover attempt is garbage no reader takes)."""
        try:
            for obj in self.list(loc.child(ATTEMPTS_DIR).uri):
                if which(obj.key.split("/", 1)[0]):
                    self.delete(obj.uri)
        except StoreError as err:
            log.warning("left old upload attempts under %s: %s", loc.uri, err)

    def list_published(self, prefix_uri: str | os.PathLike[str]) -> list[ObjectInfo]:
        """Every object under a prefix as readers see it: where a folder has a manifest, only
        the objects it lists, under the keys it gives them (``uri`` stays where the bytes lie,
        under the current attempt); leftovers of older uploads there are left out. Manifests
        themselves and objects of folders without one are listed as :meth:`list` has them."""
        objects = self.list(prefix_uri)
        manifests: dict[str, Manifest] = {}
        for obj in objects:
            path = PurePosixPath(obj.key)
            if path.name == MANIFEST_NAME:
                folder = "" if str(path.parent) == "." else str(path.parent)
                try:
                    manifest = self.read_manifest(join_uri(prefix_uri, folder))
                except StoreError as err:
                    # Claims nothing: its folder is listed as it is (a reader still refuses it).
                    log.warning("%s", err)
                    continue
                if manifest is not None:
                    manifests[folder] = manifest
        listed = {}  # where the bytes lie -> the key readers know them by
        for folder, manifest in manifests.items():
            for key in manifest.files:
                listed[_join_key(folder, manifest.location(key))] = _join_key(folder, key)
        out = []
        for obj in objects:
            if obj.key in listed:
                out.append(ObjectInfo(obj.uri, listed[obj.key], obj.size, obj.etag))
            elif PurePosixPath(obj.key).name == MANIFEST_NAME or not _under_any(obj.key, manifests):
                out.append(obj)
        return sorted(out, key=lambda o: o.key)

    def get_published(self, uri: str | os.PathLike[str]) -> bytes:
        """The bytes of one object of a published output, named ``<output prefix>/<key>`` as
        its manifest lists it (wherever its attempt put them), checked against its sha256."""
        head, rest = str(uri).rstrip("/"), ""
        while "/" in head:
            head, _, part = head.rpartition("/")
            rest = f"{part}/{rest}" if rest else part
            if not head or head.endswith(":/"):
                break
            manifest = self.read_manifest(head)
            entry = manifest.files.get(rest) if manifest is not None else None
            if manifest is None or entry is None:
                continue
            where = join_uri(head, manifest.location(rest))
            data = self.get_bytes(where)
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ChecksumError(f"{uri}: checksum mismatch of {where} with its manifest")
            return data
        raise StoreError(f"{uri}: no manifest above it lists it, so it is no published object")

    def download_dir(
        self, prefix_uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]
    ) -> Manifest:
        """Download the output at ``prefix_uri`` into ``local_dir`` and verify every sha256.

        Only what the current manifest lists is taken. Refuses (before downloading anything)
        keys that would escape ``local_dir``; raises :class:`ChecksumError` naming the object
        on a mismatch. Files already present with the right checksum are kept, so an
        interrupted download resumes; files an earlier download there took that this manifest
        no longer lists are removed. When the output is replaced during the download (its
        objects then go away), the new one is downloaded instead.
        """
        for _ in range(3):
            manifest = self.read_manifest(prefix_uri)
            if manifest is None:
                raise StoreError(
                    f"{join_uri(prefix_uri, MANIFEST_NAME)}: no manifest, so the output at "
                    f"{prefix_uri} is not complete (or was never written)"
                )
            try:
                self._download_listed(prefix_uri, manifest, Path(local_dir))
            except StoreError as err:
                if isinstance(err, ChecksumError) or not _replaced(self, prefix_uri, manifest):
                    raise
                log.info("%s was replaced during the download; reading the new one", prefix_uri)
                continue
            return manifest
        raise StoreError(f"{prefix_uri}: the output kept changing during the download; retry")

    def _download_listed(
        self, prefix_uri: str | os.PathLike[str], manifest: Manifest, dest: Path, sub: str = ""
    ) -> None:
        """Fetch and verify what ``manifest`` lists (only its keys under the folder ``sub``,
        which then is ``dest``, when given) into ``dest``."""
        _refuse_nested_keys(join_uri(prefix_uri, MANIFEST_NAME), manifest.files)
        strip = f"{sub}/" if sub else ""
        targets = [
            (key, entry, safe_target(dest, key[len(strip) :]))
            for key, entry in manifest.files.items()
            if key.startswith(strip)
        ]
        dest.mkdir(parents=True, exist_ok=True)

        def fetch(item: tuple[str, ManifestEntry, Path]) -> None:
            key, entry, target = item
            if _matches(target, entry):
                return
            uri = join_uri(prefix_uri, manifest.location(key))
            with atomic_path(target) as tmp:
                self.get_file(uri, tmp)
                size, digest = tmp.stat().st_size, sha256_file(tmp)
                if size != entry.size or digest != entry.sha256:
                    target.unlink(missing_ok=True)  # a stale copy must not pass for this one
                    raise ChecksumError(
                        f"{join_uri(prefix_uri, key)}: checksum mismatch of {uri}: manifest "
                        f"says sha256 {entry.sha256[:16]}... "
                        f"({entry.size} bytes), downloaded {digest[:16]}... ({size} bytes); "
                        "the object was changed or corrupted after its manifest was written"
                    )

        before = _local_manifest(dest)
        self._parallel(targets, fetch)
        if not sub:
            _remove_unlisted(dest, before, manifest)
            write_text_atomic(dest / MANIFEST_NAME, manifest.to_json())

    def download_subfolder(
        self, uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]
    ) -> Manifest | None:
        """Download a folder inside a published output (say an adapter inside a run's
        artifacts), verified against the nearest manifest above it; None when no manifest above
        ``uri`` lists anything under it."""
        loc = parse_uri(uri)
        if not isinstance(loc, S3Url):
            return None
        parts = loc.key.strip("/").split("/")
        for depth in range(len(parts) - 1, -1, -1):
            top = S3Url(loc.bucket, "/".join(parts[:depth])).uri
            manifest = self.read_manifest(top)
            if manifest is None:
                continue
            sub = "/".join(parts[depth:])
            if not any(key.startswith(sub + "/") for key in manifest.files):
                return None
            self._download_listed(top, manifest, Path(local_dir), sub)
            return manifest
        return None

    def _parallel(self, items: list[Any], fn: Callable[[Any], None]) -> None:
        workers = min(self.settings.max_concurrency, len(items))
        if workers <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # list() re-raises the first failure in submission order.
            list(pool.map(fn, items))


def _join_key(folder: str, key: str) -> str:
    return f"{folder}/{key}" if folder else key


def _under_any(key: str, folders: dict[str, Any]) -> bool:
    """Whether ``key`` lies in (or below) one of ``folders`` ('' is the listed prefix itself)."""
    parts = key.split("/")[:-1]
    return any("/".join(parts[:i]) in folders for i in range(len(parts) + 1))


class PublishConflict(StoreError):
    """Another writer switched the output while this one uploaded; its output stands."""


def _manifest_or_none(data: bytes, prefix_uri: str | os.PathLike[str]) -> Manifest | None:
    """The manifest being replaced; an unreadable one is replaced like a missing one."""
    try:
        return Manifest.from_json(data, join_uri(prefix_uri, MANIFEST_NAME))
    except StoreError as err:
        log.warning("replacing an unreadable manifest: %s", err)
        return None


def _is_current(store: Store, prefix_uri: str | os.PathLike[str], attempt: str) -> bool:
    try:
        now = store.read_manifest(prefix_uri)
    except StoreError:
        return False
    return now is not None and now.attempt == attempt


def _replaced(store: Store, prefix_uri: str | os.PathLike[str], manifest: Manifest) -> bool:
    """Whether the output's manifest now names another attempt than ``manifest``."""
    try:
        now = store.read_manifest(prefix_uri)
    except StoreError:
        return False
    return now is not None and (now.attempt, now.files) != (manifest.attempt, manifest.files)


def published_folder(path: Path) -> Path:
    """Where the files of a local copy of a published output lie: a copy taken as it is (a KFP
    launcher downloads an imported prefix that way) holds them under its manifest's attempt."""
    manifest = _local_manifest(path) if path.is_dir() else None
    if manifest is not None and manifest.attempt:
        folder = path / ATTEMPTS_DIR / manifest.attempt
        if folder.is_dir():
            return folder
    return path


def _local_manifest(folder: Path) -> Manifest | None:
    """The manifest an earlier download or publish left in a local folder, if readable."""
    try:
        return Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), str(folder))
    except (OSError, StoreError):
        return None


def _remove_unlisted(dest: Path, before: Manifest | None, manifest: Manifest) -> None:
    """Remove from ``dest`` the files that ``before`` (the manifest of an earlier download or
    publish there) listed and ``manifest`` does not, so no reader of the folder takes a stale
    one for data. Files no manifest listed are someone else's and stay."""
    for key in set(before.files if before else ()) - set(manifest.files):
        with contextlib.suppress(StoreError, OSError):
            safe_target(dest, key).unlink(missing_ok=True)


def _publish_local(
    store: Store, src: Path, dest: Path, metadata: dict[str, Any] | None, exclude: Exclude = None
) -> Manifest:
    """Publish to a local folder in place (its readers open the files directly): under an
    exclusive lock beside it, so two writers take turns and the last one's output stands
    whole. The old manifest goes first, the new one last; files only the old one listed are
    removed."""
    manifest = build_manifest(src, metadata, exclude=exclude)
    try:
        body = manifest.to_json()
    except TypeError as err:
        raise StoreError(f"{dest}: manifest metadata is not JSON ({err})") from None
    with _lock_file(dest.parent / f".{dest.name}.publish.lock"):
        before = _local_manifest(dest)
        (dest / MANIFEST_NAME).unlink(missing_ok=True)
        store._parallel(
            [(src / key, dest / key) for key in manifest.files],
            lambda item: store.put_file(item[0], item[1]),
        )
        _remove_unlisted(dest, before, manifest)
        store.put_bytes(body.encode(), dest / MANIFEST_NAME)
    return manifest


_SESSION: Any = None
_SESSION_LOCK = threading.Lock()


def _session(boto3: Any) -> Any:
    """One shared boto3 session (call with _SESSION_LOCK held): loading the S3 service model is
    the slow part of making a client, and a session caches it for every later client."""
    global _SESSION
    if _SESSION is None:
        _SESSION = boto3.session.Session()
    return _SESSION


def _require_key(loc: S3Url) -> None:
    if not loc.key or loc.key.endswith("/"):
        raise StoreError(f"{loc.uri}: needs an object key, not a bucket or folder")


def _refuse_nested_keys(source: str, files: dict[str, ManifestEntry]) -> None:
    """A key that is also another key's folder (``a`` and ``a/b``) cannot be downloaded."""
    folders = {key.rsplit("/", i)[0] for key in files for i in range(1, key.count("/") + 1)}
    clash = sorted(folders & set(files))
    if clash:
        raise StoreError(
            f"{source}: {clash[0]!r} is listed both as a file and as the folder of "
            f"{next(k for k in sorted(files) if k.startswith(clash[0] + '/'))!r}; "
            "rewrite the output so each key is a file only"
        )


def _matches(path: Path, entry: ManifestEntry) -> bool:
    return (
        path.is_file() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256
    )


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on a local folder, held by every conditional write into it."""
    with _lock_file(folder / ".patchgap.lock"):
        yield


@contextlib.contextmanager
def _lock_file(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created, never removed: removing a lock file lets two
    holders lock two different files)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_local_write(dest: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temp file beside ``dest`` so readers never see a partial file."""
    # 0600 as the store's files have always had (they were made with tempfile.mkstemp).
    with atomic_path(dest, mode=0o600) as tmp:
        write(tmp)


def fetch_to_local(
    uri: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    store: Store | None = None,
    *,
    external: bool = False,
) -> Path:
    """Make ``uri`` available locally: local paths are returned as they are; an S3 prefix becomes
    ``dest_dir/<last part>/`` and an S3 object ``dest_dir/<name>``, both verified against the
    manifest of the output they belong to.

    An S3 location without a complete manifest is refused: it may be an output whose upload was
    killed before its manifest was written. ``external=True`` is the one explicit way to read a
    user's dataset written by another tool (the dataset staging step, which writes a manifest
    for what it produces); it copies without verification.
    """
    loc = parse_uri(uri)
    if not isinstance(loc, S3Url):
        if not loc.exists():
            raise StoreError(f"{loc}: no such file or folder")
        return loc
    store = store or Store.from_env()
    dest = Path(dest_dir)
    if loc.key and not loc.key.endswith("/"):
        got = _fetch_listed_object(store, loc, dest, external)
        if got is not None:
            return got
    name = PurePosixPath(loc.key.rstrip("/")).name or loc.bucket
    target = safe_target(dest, name)
    if store.read_manifest(uri) is not None:
        store.download_dir(uri, target)
        return target
    if store.download_subfolder(uri, target) is not None:
        return target
    objects = store.list(uri)
    if not objects:
        raise StoreError(f"{loc.uri}: no such object or prefix")
    if not external:
        raise StoreError(
            f"{loc.uri}: no {MANIFEST_NAME}, so this output is incomplete (an upload stopped "
            "before its manifest) or was written by another tool; rerun the stage that makes "
            "it, or stage external data with: patchgap data stage"
        )
    for obj in objects:
        store.get_file(obj.uri, safe_target(target, obj.key))
    return target


def _fetch_listed_object(store: Store, loc: S3Url, dest: Path, external: bool) -> Path | None:
    """One object of an output, found and verified through its folder's manifest (its bytes
    lie under the manifest's attempt); None when ``loc`` names no object (it may be a prefix)."""
    parent, _, name = loc.key.rpartition("/")
    parent_uri = S3Url(loc.bucket, parent).uri
    target = safe_target(dest, name)
    manifest = store.read_manifest(parent_uri)
    entry = manifest.files.get(name) if manifest is not None else None
    if manifest is not None and entry is not None:
        store.get_file(join_uri(parent_uri, manifest.location(name)), target)
        if not _matches(target, entry):
            target.unlink(missing_ok=True)
            raise ChecksumError(
                f"{loc.uri}: checksum mismatch with its manifest; the object was changed or "
                "corrupted after its manifest was written"
            )
        return target
    if not store.exists(loc.uri):
        return None
    if external:
        return store.get_file(loc.uri, target)
    raise StoreError(
        f"{loc.uri}: not listed in a manifest at {join_uri(parent_uri, MANIFEST_NAME)}, "
        "so it may be half-written; stage external data with: patchgap data stage"
    )
