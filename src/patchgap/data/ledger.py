"""The ledger of processed datasets for the scheduled ``watch`` pipeline.

One small JSON object per processed dataset, keyed by the sha256 of its content, under a ledger
prefix (``s3://bucket/ledger/<name>/<sha256>.json``). One object per entry means two runs never
race on a read-modify-write of a shared file, and a dataset is recorded only by the step that runs
after its rewrite succeeded, so a failed run leaves no entry and is retried next time.

Two overlapping runs must not both process a new dataset: each run first *claims* it with a
conditional write (``claims/<sha256>.json``, created only if absent), and a claim carries a lease
so that a run that died holding one does not block the dataset for ever. Content hashes are cached
by (URI, ETag, size) in ``hashes.json``, so a run downloads only objects that are new or changed.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from patchgap.errors import PatchgapError
from patchgap.storage.store import sha256_file

DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DatasetObject:
    """A dataset object found under the watched prefix, with its content hash."""

    uri: str
    sha256: str
    size: int


class Ledger:
    """Processed-dataset entries under ``prefix_uri``; works on any store URI (s3:// or local)."""

    def __init__(self, store: Any, prefix_uri: str) -> None:
        self.store = store
        self.prefix = prefix_uri.rstrip("/") + "/"

    def _entry_uri(self, sha256: str, folder: str = "") -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise PatchgapError(f"ledger: {sha256!r} is not a sha256 hex digest")
        return f"{self.prefix}{folder}{sha256}.json"

    def is_processed(self, sha256: str) -> bool:
        return self.store.exists(self._entry_uri(sha256))

    def entry(self, sha256: str) -> dict[str, Any] | None:
        uri = self._entry_uri(sha256)
        if not self.store.exists(uri):
            return None
        return json.loads(self.store.get_bytes(uri))

    def record(self, obj: DatasetObject, **info: Any) -> str:
        """Record ``obj`` as processed (call only after its run succeeded). Idempotent."""
        uri = self._entry_uri(obj.sha256)
        body = {**asdict(obj), **info, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.store.put_bytes(json.dumps(body, sort_keys=True).encode(), uri)
        return uri

    def pending(self, objects: Iterable[DatasetObject]) -> list[DatasetObject]:
        """Objects not yet processed, each content hash once (copies of one file run once)."""
        seen: set[str] = set()
        out = []
        for obj in objects:
            if obj.sha256 in seen or self.is_processed(obj.sha256):
                continue
            seen.add(obj.sha256)
            out.append(obj)
        return out

    def claim(self, obj: DatasetObject, lease_seconds: float, owner: str | None = None) -> bool:
        """Take ``obj`` for this run; False when another run holds a live claim on it or it was
        processed meanwhile. An expired claim is taken over, conditionally on its version, so
        two runs cannot take over the same one."""
        uri = self._entry_uri(obj.sha256, "claims/")
        body = {
            **asdict(obj),
            "owner": owner or uuid.uuid4().hex,
            "expires": time.time() + lease_seconds,
        }
        blob = json.dumps(body, sort_keys=True).encode()
        current = self.store.get_bytes_and_etag(uri)
        if current is not None:
            try:
                expires = float(json.loads(current[0])["expires"])
            except (ValueError, KeyError, TypeError):
                expires = 0.0  # an unreadable claim protects nothing
            if expires > time.time():
                return False
        if not self.store.put_bytes_if(blob, uri, current[1] if current else None):
            return False
        # Recorded between our listing and our claim: it is done, let the claim go.
        if self.is_processed(obj.sha256):
            self.release(obj.sha256)
            return False
        return True

    def release(self, sha256: str) -> None:
        self.store.delete(self._entry_uri(sha256, "claims/"))

    def claim_pending(
        self, objects: Iterable[DatasetObject], lease_seconds: float, limit: int = 0
    ) -> list[DatasetObject]:
        """The pending objects this run claimed, at most ``limit`` (0: no limit)."""
        out = []
        for obj in self.pending(objects):
            if limit > 0 and len(out) >= limit:
                break
            if self.claim(obj, lease_seconds):
                out.append(obj)
        return out

    def hash_cache_uri(self) -> str:
        return f"{self.prefix}hashes.json"


def content_sha256(store: Any, uri: str) -> str:
    """sha256 of an object's bytes (S3 ETags are not content hashes for multipart uploads).

    Streams through a temporary file so a large dataset is never held in memory.
    """
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="patchgap-ledger-") as tmp:
        return sha256_file(store.get_file(uri, Path(tmp) / "object"))


def find_datasets(
    store: Any,
    prefix_uri: str,
    suffixes: tuple[str, ...] = DATASET_SUFFIXES,
    cache_uri: str | None = None,
) -> list[DatasetObject]:
    """Dataset objects under ``prefix_uri`` (by suffix), in key order, with content hashes.

    With ``cache_uri``, hashes are kept there by (URI, ETag, size): an object is downloaded to
    be hashed only when it is new or changed. Two runs updating the cache at once may drop each
    other's additions, which costs only a re-hash later.
    """
    cache: dict[str, str] = {}
    if cache_uri is not None:
        try:
            raw = json.loads(store.get_bytes(cache_uri))
            cache = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (PatchgapError, ValueError):
            cache = {}  # absent or damaged: rebuild it
    out, seen = [], {}
    for info in store.list_published(prefix_uri):  # a staged output: its manifest's files
        uri = info.uri
        name = uri.rsplit("/", 1)[-1]
        # Names starting with "_" or "." are our own manifests and markers, never datasets.
        if name.startswith(("_", ".")) or not name.endswith(suffixes):
            continue
        key = hashlib.sha256(f"{uri}\n{info.etag}\n{info.size}".encode()).hexdigest()
        sha = cache.get(key) if info.etag else None
        if sha is None:
            sha = content_sha256(store, uri)
        seen[key] = sha
        out.append(DatasetObject(uri=uri, sha256=sha, size=info.size))
    if cache_uri is not None and seen != cache:
        store.put_bytes(json.dumps(seen, sort_keys=True).encode(), cache_uri)
    return sorted(out, key=lambda o: o.uri)
