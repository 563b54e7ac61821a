"""Rejects and counts: a record that was not used is never dropped silently; each goes to a
:class:`RejectSink` with its file, line (or row), kind and reason, and :class:`Counts` says what
a read saw."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchgap.data.fields import FieldMap
from patchgap.fsutil import AtomicTextFile

log = logging.getLogger(__name__)

#: How much of a rejected record the rejects file keeps (characters of its JSON).
REJECT_RAW_LIMIT = 4096


@dataclass(frozen=True)
class Reject:
    """A record that was not used, where it was and why."""

    source: str
    line: int | None
    row: int | None
    id: str | None
    kind: str
    reason: str
    raw: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "line": self.line,
            "row": self.row,
            "id": self.id,
            "kind": self.kind,
            "reason": self.reason,
            "raw": self.raw,
        }

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return f"{self.source} row {self.row}"


class RejectSink:
    """Collects rejected records: into a JSONL file when given a path, else into memory.

    The file is written beside its path and moved there when the read finishes, so a read that
    fails half-way leaves no partial rejects (and an older complete file stays); a finished read
    without rejects removes an old file, so a rerun never leaves stale rejects behind. Each
    reject keeps at most :data:`REJECT_RAW_LIMIT` characters of its record.
    """

    def __init__(self, path: str | Path | None = None, *, warn: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.warn = warn
        self.counts: Counter[str] = Counter()
        self.items: list[Reject] = []
        self._fh: AtomicTextFile | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reject: Reject) -> None:
        self.counts[reject.kind] += 1
        reject = _capped(reject)
        if self.warn:
            log.warning("rejected %s: %s", reject.where, reject.reason)
        if self.path is None:
            self.items.append(reject)
            return
        if self._fh is None:
            self._fh = AtomicTextFile(self.path)
        self._fh.write(json.dumps(reject.to_dict(), ensure_ascii=False, allow_nan=False) + "\n")

    def close(self, complete: bool = True) -> None:
        """Publish the file (``complete``) or drop it (the read failed)."""
        if self.path is None:
            return
        if self._fh is not None:
            fh, self._fh = self._fh, None
            if complete:
                fh.publish()
            else:
                fh.discard()
        elif complete:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RejectSink:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(complete=exc_type is None)


def _capped(reject: Reject) -> Reject:
    """A reject whose record fits in :data:`REJECT_RAW_LIMIT` characters of strict JSON (no
    bare NaN): a 50 MB record must not be copied whole into the rejects file."""
    try:
        text = json.dumps(reject.raw, ensure_ascii=False, default=str, allow_nan=False)
        raw = reject.raw
    except ValueError:  # NaN or Infinity: not JSON, so keep the record as readable text
        raw = text = repr(reject.raw)
    reason = reject.reason[:REJECT_RAW_LIMIT]
    if len(text) > REJECT_RAW_LIMIT:
        raw = {"truncated": text[:REJECT_RAW_LIMIT], "chars": len(text)}
    if raw is reject.raw and reason == reject.reason:
        return reject
    return Reject(reject.source, reject.line, reject.row, reject.id, reject.kind, reason, raw)


@dataclass
class Counts:
    """What a read saw: rows read, valid records, rejects by kind, records handed out."""

    source: str = ""
    fields: str = ""
    field_map: FieldMap | None = None  # the map of the first record read (auto: its guess)
    sha256: str = ""  # of the bytes actually read, when the source is one file
    read: int = 0
    valid: int = 0
    selected: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())
