"""Readers: one per format (JSON Lines, JSON, Parquet, a folder of them, a loaded hub split),
each turning a file into a stream of :class:`Row` (a JSON object with the file, line or row it
came from, or the reason it is not one). Every dataset the project reads, training data and
evaluation sets alike, goes through these readers.

A file that cannot be parsed at all raises one :class:`~patchgap.errors.DataError` naming the
file and position; a bad line of an otherwise readable file is a row with an ``error``.
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchgap.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet")
# A JSONL file whose first lines all fail to parse is not JSON Lines at all (a binary file, a
# pretty-printed JSON document): one file-level error beats thousands of identical rejects.
_MAX_LEADING_BAD_LINES = 100


@dataclass
class Row:
    """One row of a source: its object (``data``), or the (kind, reason) it is not one."""

    source: str
    line: int | None
    row: int
    default_id: str
    data: dict[str, Any] | None = None
    raw: Any = None
    error: tuple[str, str] | None = None  # (kind, reason)


def _natural_key(text: str) -> list[Any]:
    # algebra/2.json before algebra/10.json
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def rows_jsonl(path: Path, display: str, prefix: str) -> Iterator[Row]:
    """JSON Lines (``.bz2``-compressed too): one row per non-blank line."""
    pending: list[Row] = []  # leading bad lines, held until some line parses
    parsed_any = False
    first_error: str | None = None
    row = 0
    for lineno, raw in _raw_lines(path, display):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            item = Row(display, lineno, row, f"{prefix}-{row}", raw=repr(raw[:200]))
            item.error = ("invalid_json", f"line is not UTF-8 (byte {err.start})")
            first_error = first_error or f"{display}:{lineno}:{err.start + 1}: not UTF-8 text"
        else:
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            text = text.rstrip("\r\n")  # else errors at the end point past the line
            item = Row(display, lineno, row, f"{prefix}-{row}", raw=text)
            error = _decode_line(item, text)
            if error is None:
                parsed_any = True
            else:
                first_error = first_error or f"{display}:{lineno}:{error}"
        row += 1
        if parsed_any:
            yield from pending
            pending.clear()
            yield item
        else:
            pending.append(item)
            if len(pending) >= _MAX_LEADING_BAD_LINES:
                raise DataError(
                    f"{first_error}: not JSON Lines (none of the first "
                    f"{_MAX_LEADING_BAD_LINES} lines is valid JSON)"
                )
    if row == 0:
        raise DataError(f"{display}: empty file, no records")
    if not parsed_any:
        raise DataError(f"{first_error}: not JSON Lines (no line is valid JSON)")


def _raw_lines(path: Path, display: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file, ``.bz2`` decompressed; a broken stream is a DataError."""
    opener = bz2.open if path.suffix.lower() == ".bz2" else open
    try:
        with opener(path, "rb") as fh:
            yield from enumerate(fh, 1)
    except (OSError, EOFError) as err:
        raise DataError(f"{display}: cannot read the file: {err}") from None


def _decode_line(item: Row, text: str) -> str | None:
    """Fill ``item`` from one JSON Lines line; the column and message of a syntax error, or None
    when the line is JSON (an object, or a row error saying why it is not a record)."""
    try:
        obj = _STRICT.decode(text)
    except DuplicateKey as err:
        item.error = ("duplicate_key", str(err))
        return None
    except json.JSONDecodeError as err:
        item.error = ("invalid_json", f"invalid JSON at column {err.colno}: {err.msg}")
        return f"{err.colno}: {err.msg}"
    except (RecursionError, ValueError) as err:
        item.error = ("invalid_json", f"invalid JSON: {_json_limit(err)}")
        return f"1: {_json_limit(err)}"
    if isinstance(obj, dict):
        item.data, item.raw = obj, obj
    else:
        item.error = ("not_object", f"a JSON {type(obj).__name__}, not an object")
    return None


class DuplicateKey(ValueError):
    """A JSON object that names one key twice: which value was meant cannot be known."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r} in a JSON object")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


# Python's json keeps the last of duplicate keys silently; these readers refuse such an object.
_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys)
_LOOSE = json.JSONDecoder()


def _json_limit(err: Exception) -> str:
    """What a parse that hit one of Python's limits (not a syntax error) ran into."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    text = str(err)
    return "a number with too many digits" if "digits" in text else text.splitlines()[0][:200]


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _position(text: str, i: int) -> str:
    line = text.count("\n", 0, i) + 1
    col = i - (text.rfind("\n", 0, i) + 1) + 1
    return f"{line}:{col}"


def _parse_json_array(
    text: str, start: int, display: str
) -> list[tuple[int, Any, DuplicateKey | None]]:
    """Elements of a JSON array with the line each starts on (and the duplicate key of an
    element that names one twice); syntax errors name line:column."""
    out: list[tuple[int, Any, DuplicateKey | None]] = []
    i = _skip_ws(text, start + 1)
    if i < len(text) and text[i] == "]":
        i = _skip_ws(text, i + 1)
    else:
        line, last = 1, 0
        while True:
            dup = None
            try:
                try:
                    obj, end = _STRICT.raw_decode(text, i)
                except DuplicateKey as err:  # one bad element: parse it again to find its end
                    dup = err
                    obj, end = _LOOSE.raw_decode(text, i)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{display}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}"
                ) from None
            except (RecursionError, ValueError) as err:
                where = _position(text, i)
                raise DataError(f"{display}:{where}: invalid JSON: {_json_limit(err)}") from None
            line += text.count("\n", last, i)
            last = i
            out.append((line, obj, dup))
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i = _skip_ws(text, i + 1)
                break
            what = "end of file" if i >= len(text) else repr(text[i])
            raise DataError(
                f"{display}:{_position(text, i)}: invalid JSON: expected ',' or ']', got {what}"
            )
    if i < len(text):
        raise DataError(f"{display}:{_position(text, i)}: invalid JSON: extra data after the array")
    return out


def read_text(path: Path, display: str) -> str:
    """The whole file as text (a BOM dropped); not UTF-8 is a DataError."""
    try:
        return path.read_bytes().decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(f"{display}: not UTF-8 text (byte {err.start})") from None


def rows_json(
    path: Path, display: str, prefix: str, single_id: str | None, text: str | None = None
) -> Iterator[Row]:
    """A JSON array of records, one JSON object (one record), or JSON Lines named .json."""
    if text is None:
        text = read_text(path, display)
    start = _skip_ws(text, 0)
    if start >= len(text):
        raise DataError(f"{display}: empty file, no records")
    if text[start] == "[":
        elements = _parse_json_array(text, start, display)
        if not elements:
            raise DataError(f"{display}: empty JSON array, no records")
        for row, (line, obj, dup) in enumerate(elements):
            item = Row(display, line, row, f"{prefix}-{row}", raw=obj)
            if dup is not None:
                item.error = ("duplicate_key", str(dup))
            elif isinstance(obj, dict):
                item.data = obj
            else:
                item.error = ("not_object", f"a JSON {type(obj).__name__}, not an object")
            yield item
        return
    dup = None
    try:
        try:
            obj = _STRICT.decode(text)
        except DuplicateKey as err:
            dup, obj = err, _LOOSE.decode(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved as .json, which `datasets` accepts too
            yield from rows_jsonl(path, display, prefix)
            return
        raise DataError(f"{display}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except (RecursionError, ValueError) as err:
        where = _position(text, start)
        raise DataError(f"{display}:{where}: invalid JSON: {_json_limit(err)}") from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{display}: top level is a JSON {type(obj).__name__}, expected an array or object"
        )
    line = text.count("\n", 0, start) + 1
    item = Row(display, line, 0, single_id or prefix, data=obj, raw=obj)
    if dup is not None:
        item.data, item.error = None, ("duplicate_key", str(dup))
    yield item


def rows_parquet(path: Path, display: str, prefix: str) -> Iterator[Row]:
    """Parquet, read in record batches: one row per table row."""
    # pyarrow is heavy and only Parquet needs it: imported here.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{display}: not a readable Parquet file: {err}") from None
    names = pf.schema_arrow.names
    twice = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    if twice:
        raise DataError(
            f"{display}: duplicate column {twice[0]!r}: a record cannot hold two fields of one name"
        )
    if pf.metadata.num_rows == 0:
        raise DataError(f"{display}: empty Parquet file, no records")
    row = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{display}: unreadable Parquet data after row {row}: {err}") from None
        for obj in batch.to_pylist():
            yield Row(display, None, row, f"{prefix}-{row}", data=obj, raw=obj)
            row += 1


def rows_file(path: Path, display: str, prefix: str, single_id: str | None = None) -> Iterator[Row]:
    """The reader of ``path``'s format, chosen by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from rows_jsonl(path, display, prefix)
    elif suffix == ".json":
        yield from rows_json(path, display, prefix, single_id)
    elif suffix == ".parquet":
        yield from rows_parquet(path, display, prefix)
    else:
        raise DataError(
            f"{display}: unknown format {path.suffix or '(no suffix)'!r}; "
            "expected .jsonl, .json, .parquet or a folder of them"
        )


def rows_dir(path: Path, display: str, prefix: str) -> Iterator[Row]:
    """A folder of data files, in natural order; one unreadable file is one bad row."""
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and _is_data_file(p.relative_to(path))),
        key=lambda p: _natural_key(p.relative_to(path).as_posix()),
    )
    if not files:
        raise DataError(f"{display}: folder has no .jsonl, .json or .parquet files")
    for file in files:
        rel = file.relative_to(path).with_suffix("").as_posix()
        file_display = f"{display.rstrip('/')}/{file.relative_to(path).as_posix()}"
        if file.suffix.lower() != ".json":
            try:
                yield from rows_file(file, file_display, f"{prefix}/{rel}")
            except DataError as err:
                # One unreadable file of a folder is one reject, not the end of the read: the
                # other files' records are kept.
                item = Row(file_display, None, 0, f"{prefix}/{rel}", raw=None)
                item.error = ("unreadable_file", str(err).removeprefix(f"{file_display}:").strip())
                yield item
            continue
        fid = f"{prefix}/{rel}"
        try:
            text = read_text(file, file_display)
            # One record per file (MATH layout): a corrupt file is one bad record, not a bad set.
            single = (
                list(rows_json(file, file_display, fid, fid, text))
                if text.lstrip().startswith("{")
                else None
            )
        except DataError as err:
            item = Row(file_display, None, 0, fid, raw=None)
            item.error = ("invalid_json", str(err).removeprefix(f"{file_display}:").strip())
            yield item
            continue
        if single is not None:
            yield from single
        else:  # an array file: a parse error stays a file-level error
            yield from rows_json(file, file_display, fid, None, text)


def _is_data_file(rel: Path) -> bool:
    # "_manifest.json" (the store's), "_SUCCESS", ".x.tmp": bookkeeping, not records.
    hidden = any(part.startswith(("_", ".")) for part in rel.parts)
    return not hidden and rel.suffix.lower() in SUFFIXES


def rows_hub(rows: Iterable[dict[str, Any]], display: str, prefix: str) -> Iterator[Row]:
    """The rows of a loaded hub split."""
    for row, obj in enumerate(rows):
        yield Row(display, None, row, f"{prefix}-{row}", data=dict(obj), raw=dict(obj))


def json_objects(path: Path, display: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) of a JSON Lines file that must be complete (an evaluation set): the first
    line that is not a JSON object is a DataError naming the file and line."""
    display = display or str(path)
    if not path.is_file():
        raise DataError(f"{display}: benchmark file not found")
    for row in rows_jsonl(path, display, path.stem):
        if row.error is not None or row.data is None:
            reason = row.error[1] if row.error is not None else "expected a JSON object"
            raise DataError(f"{display}:{row.line}: {reason}")
        assert row.line is not None
        yield row.line, row.data
