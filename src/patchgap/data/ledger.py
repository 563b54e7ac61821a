"""The ledger of processed datasets for the scheduled ``watch`` pipeline.

One small JSON object per processed dataset, keyed by the sha256 of its content, under a ledger
prefix (``s3://bucket/ledger/<name>/<sha256>.json``). One object per entry means two runs never
race on a read-modify-write of a shared file, and a dataset is recorded only by the step that runs
after its rewrite succeeded, so a failed run leaves no entry and is retried next time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from patchgap.errors import PatchgapError

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

    def _entry_uri(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise PatchgapError(f"ledger: {sha256!r} is not a sha256 hex digest")
        return f"{self.prefix}{sha256}.json"

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


def content_sha256(store: Any, uri: str) -> str:
    """sha256 of an object's bytes (S3 ETags are not content hashes for multipart uploads).

    Streams through a temporary file so a large dataset is never held in memory.
    """
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="patchgap-ledger-") as tmp:
        local = Path(tmp) / "object"
        store.get_file(uri, local)
        h = hashlib.sha256()
        with local.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def find_datasets(
    store: Any, prefix_uri: str, suffixes: tuple[str, ...] = DATASET_SUFFIXES
) -> list[DatasetObject]:
    """Dataset objects under ``prefix_uri`` (by suffix), in key order, with content hashes."""
    out = []
    for info in store.list(prefix_uri):
        uri = info.uri
        name = uri.rsplit("/", 1)[-1]
        # Names starting with "_" are our own manifests and markers, never datasets.
        if name.startswith("_") or not name.endswith(suffixes):
            continue
        out.append(DatasetObject(uri=uri, sha256=content_sha256(store, uri), size=info.size))
    return sorted(out, key=lambda o: o.uri)
