"""Writers: records as JSONL (the ``records`` preset reads it back) or Parquet, atomically."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

from patchgap.data.fields import Record
from patchgap.fsutil import atomic_path


def write_records_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSONL (the ``records`` preset reads it back); atomic; returns the count."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(
                json.dumps(rec.to_dict(), ensure_ascii=False, default=str, allow_nan=False) + "\n"
            )
            n += 1
    return n


def write_records_parquet(
    records: Iterable[Record], path: str | Path, batch_size: int = 1000
) -> int:
    """Write records as Parquet, streaming in row groups; ``meta`` is stored as JSON text so
    records with different meta keys share one schema. Atomic; returns the count."""
    # pyarrow is heavy and only Parquet needs it: imported here.
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [(name, pa.string()) for name in ("id", "question", "solution", "answer", "meta")]
    )
    n = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        batch: list[Record] = []
        for rec in itertools.chain(records, [None]):
            if rec is not None:
                batch.append(rec)
            if batch and (rec is None or len(batch) >= batch_size):
                columns = {
                    "id": [r.id for r in batch],
                    "question": [r.question for r in batch],
                    "solution": [r.solution for r in batch],
                    "answer": [r.answer for r in batch],
                    "meta": [
                        json.dumps(r.meta, ensure_ascii=False, default=str, allow_nan=False)
                        for r in batch
                    ],
                }
                writer.write_table(pa.table(columns, schema=schema))
                n += len(batch)
                batch = []
    return n
