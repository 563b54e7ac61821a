"""The streaming API: :func:`iter_records` streams the valid records of a dataset (bad ones to a
:class:`~patchgap.data.rejects.RejectSink`), :func:`load_records` holds them in memory with the
counts of the read."""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchgap.data.convert import RecordError, to_record
from patchgap.data.fields import (
    PRESETS,
    AmbiguousLayout,
    FieldMap,
    Record,
    detect_fields,
    near_layouts,
)
from patchgap.data.rejects import Counts, Reject, RejectSink
from patchgap.data.sources import DatasetSpec, Source, as_spec, resolve
from patchgap.errors import DataError
from patchgap.storage.store import sha256_file


@dataclass
class LoadResult:
    """Records of a dataset with the counts of the read and where the rejects are."""

    records: list[Record]
    counts: Counts
    rejects_path: Path | None
    rejects: list[Reject]  # in memory only when no rejects_path was given


def _field_map(spec: DatasetSpec, src: Source) -> tuple[FieldMap | None, str]:
    if isinstance(spec.fields, FieldMap):
        return spec.fields, "custom"
    if spec.fields != "auto":
        return PRESETS[spec.fields], spec.fields
    if src.preset is not None:
        return PRESETS[src.preset], src.preset
    return None, "auto"


# The roles of a field map, in the order an error names them.
_ROLES = ("id", "question", "solution", "answer", "messages", "context", "choices", "meta")


def _must_appear(spec: DatasetSpec) -> dict[str, str]:
    """field -> role of every field of a map the user wrote: some row of the source must have
    each, optional ones included (naming it says the data has it). A preset's optional fields,
    such as GSM8K's ``idx``, are often absent; rows without its required ones are rejected."""
    if not isinstance(spec.fields, FieldMap):
        return {}
    named: dict[str, str] = {}
    for role in _ROLES:
        key = getattr(spec.fields, role)
        if key is not None:
            named.setdefault(key, role)
    return named


class _Guess:
    """fields=auto: the layout of each file, from its first record (a folder may mix layouts)."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.file: str | None = None
        self.fm: FieldMap | None = None
        self.unknown = ""
        self.guessed: list[str] = []

    def see(self, source: str, data: dict[str, Any]) -> FieldMap | None:
        """The field map of ``source``, guessed from its first record ``data``."""
        if source == self.file:
            return self.fm
        self.file = source
        # A key with a line break or other control character is shown escaped: one line.
        shown = (str(k)[:40] for k in data)
        keys = ", ".join(sorted(k if k.isprintable() else repr(k) for k in shown)[:12])
        try:
            name = detect_fields(data)
        except AmbiguousLayout as err:
            name, why = None, f"{err} (keys: {keys}); pass fields as one of them or a FieldMap"
        else:
            near = near_layouts(data)
            why = (
                f"cannot tell which fields hold the question and solution (keys: {keys}"
                + (f"; {near}" if near else "")
                + f"); pass fields as one of {', '.join(PRESETS)} or a FieldMap"
            )
        if name is None and not self.guessed:  # nothing read yet: the whole set is unusable
            raise DataError(f"{source}: {why}")
        self.unknown = why
        self.fm = PRESETS[name] if name is not None else None
        if name is not None and name not in self.guessed:
            self.guessed.append(name)
            self.counts.fields = f"auto: {', '.join(self.guessed)}"
        return self.fm


def _iter_valid(
    spec: DatasetSpec, src: Source, sink: RejectSink, counts: Counts
) -> Iterator[Record]:
    fm, counts.fields = _field_map(spec, src)
    first_seen: dict[str, str] = {}
    guess = _Guess(counts) if fm is None else None
    missing = _must_appear(spec)
    for row in src.rows():
        counts.read += 1
        if row.data is not None:
            if guess is not None and row.error is None:
                fm = guess.see(row.source, row.data)
            counts.field_map = counts.field_map or fm
            if missing:
                missing = {k: r for k, r in missing.items() if k not in row.data}
        rid: str | None = None
        try:
            if row.error is not None:
                raise RecordError(*row.error)
            if fm is None:
                raise RecordError("unknown_fields", guess.unknown if guess else "")
            assert row.data is not None
            rec = to_record(row.data, fm, row.default_id)
            rid = rec.id
            if rec.id in first_seen:
                raise RecordError(
                    "duplicate_id", f"duplicate id {rec.id!r} (first at {first_seen[rec.id]})"
                )
        except RecordError as rej:
            sink.add(Reject(row.source, row.line, row.row, rid, rej.kind, rej.reason, row.raw))
            counts.rejected[rej.kind] += 1
            continue
        first_seen[rec.id] = (
            f"{row.source}:{row.line}" if row.line is not None else f"{row.source} row {row.row}"
        )
        counts.valid += 1
        yield rec
    _check_named_fields(src.display, missing, counts)


def _check_named_fields(display: str, missing: dict[str, str], counts: Counts) -> None:
    """A field map that names a field no row has is a mistake (a typo, the wrong file), not
    something to skip in silence."""
    if not missing or counts.read == counts.rejected.get("invalid_json", 0):
        return
    key, role = next(iter(missing.items()))
    raise DataError(
        f"{display}: the field map names {role} field {key!r}, which no row of the source has"
    )


def _shuffle_key(seed: int, rid: str) -> int:
    # sha256 of (seed, id): the same subset on every machine and Python version, and a record's
    # membership does not depend on where it sits in the file.
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{rid}".encode()).digest()[:8], "big")


def iter_records(
    spec: DatasetSpec | str | Path,
    rejects: RejectSink | None = None,
    counts: Counts | None = None,
    *,
    external: bool = False,
) -> Iterator[Record]:
    """Stream the valid records of a dataset; bad ones go to ``rejects``.

    Without shuffling, memory stays flat whatever the size (only the ids seen are kept, to catch
    duplicates); a seeded subset keeps ``limit`` records; a full shuffle keeps all of them.
    With ``rejects=None`` each reject is logged as a warning. ``counts``, when given, is filled
    in as the stream is consumed. Raises :class:`DataError` when the source cannot be read.
    An ``s3://`` source must carry a manifest unless ``external`` (the dataset staging step).
    """
    spec = as_spec(spec)
    counts = counts if counts is not None else Counts()
    sink = rejects if rejects is not None else RejectSink(None, warn=True)
    src = resolve(spec, external)
    counts.source = src.display
    if src.path is not None and src.path.is_file():
        counts.sha256 = sha256_file(src.path)
    valid = _iter_valid(spec, src, sink, counts)
    shuffle = spec.shuffle if spec.shuffle is not None else spec.limit is not None
    if not shuffle:
        for rec in itertools.islice(valid, spec.limit):
            counts.selected += 1
            yield rec
        return
    if spec.limit is None:
        chosen = sorted(valid, key=lambda r: _shuffle_key(spec.seed, r.id))
    else:
        heap: list[tuple[int, int, Record]] = []  # max-heap on key via negation
        for n, rec in enumerate(valid):
            item = (-_shuffle_key(spec.seed, rec.id), n, rec)
            if len(heap) < spec.limit:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
        chosen = [rec for _, _, rec in sorted(heap, reverse=True)]
    for rec in chosen:
        counts.selected += 1
        yield rec


def load_records(
    spec: DatasetSpec | str | Path,
    rejects_path: str | Path | None = None,
    *,
    external: bool = False,
) -> LoadResult:
    """All selected records in memory, with counts; rejects to ``rejects_path`` or in memory.
    ``external`` as in :func:`iter_records`."""
    counts = Counts()
    with RejectSink(rejects_path) as sink:
        records = list(iter_records(spec, sink, counts, external=external))
    written = sink.path if sink.path is not None and sink.total else None
    return LoadResult(records, counts, written, sink.items)
