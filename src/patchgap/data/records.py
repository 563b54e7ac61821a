"""The data contract: records, field mapping, dataset sources, validation with rejects, writers.

A dataset is read as a stream of :class:`Record` (id, question, reference solution y*, reference
answer a*, meta). Bad records never stop a run and are never dropped silently: each goes to a
:class:`RejectSink` with its file, line (or row) and reason. A file that cannot be parsed at all
raises one :class:`~patchgap.errors.DataError` naming the file and position.

Sources: a local ``.jsonl``/``.json``/``.parquet`` file or a folder of them (e.g. one JSON file
per problem), an ``s3://`` URI, a named public set (``gsm8k:train``, ``math500``, ...) resolved
through :func:`patchgap.settings.data_dir` and then the hub, or a hub dataset (``hf://owner/name``).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from patchgap.answers import reference_answer
from patchgap.config import StrictModel
from patchgap.errors import DataError
from patchgap.fsutil import AtomicTextFile, atomic_path
from patchgap.settings import DATA_DIR_ENV, cache_dir, data_dir, hub_dir
from patchgap.storage import store
from patchgap.storage.store import sha256_file

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")
# A JSONL file whose first lines all fail to parse is not JSON Lines at all (a binary file, a
# pretty-printed JSON document): one file-level error beats thousands of identical rejects.
_MAX_LEADING_BAD_LINES = 100
#: How long a user's answer_pattern may take on one answer.
ANSWER_PATTERN_SECONDS = 1.0
#: How much of a rejected record the rejects file keeps (characters of its JSON).
REJECT_RAW_LIMIT = 4096
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --------------------------------------------------------------------------------------------
# Records and field mapping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One problem: ``question``, reference solution y* and reference answer a*.

    ``solution`` is ``""`` only for answer-only evaluation sets (FieldMap.solution unset).
    ``meta`` keeps every source field that did not become one of the attributes.
    """

    id: str
    question: str
    solution: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The layout :func:`write_records_jsonl` writes and the ``records`` preset reads."""
        return {
            "id": self.id,
            "question": self.question,
            "solution": self.solution,
            "answer": self.answer,
            "meta": self.meta,
        }


ListRole = Literal["question", "context", "solution", "answer"]
ListRule = Literal["join", "first", "last"]


class FieldMap(StrictModel):
    """Which source fields hold the id, question, solution and answer of a record."""

    id: str | None = Field(
        None, description="Field with the record id; when absent a positional id is used."
    )
    question: str | None = Field(None, description="Field with the question (problem text).")
    solution: str | None = Field(
        None, description="Field with the reference solution y*; unset for answer-only sets."
    )
    answer: str | None = Field(
        None,
        description="Field with the reference answer a*; when absent or empty it is extracted "
        "from the solution.",
    )
    messages: str | None = Field(
        None,
        description="Chat mode: field with a list of {role, content} turns; the first user turn "
        "is the question and the last assistant turn the solution.",
    )
    context: str | None = Field(
        None, description="Field whose text is put before the question (e.g. ASDiv's body)."
    )
    choices: str | None = Field(
        None,
        description="Field with answer options (a list, a {text, label} mapping or a string) "
        "appended to the question.",
    )
    answer_is_index: bool = Field(
        False, description="The answer is a 0-based index into the choices; stored as a letter."
    )
    answer_pattern: str | None = Field(
        None,
        description="Regular expression whose first group is the answer, applied to the answer "
        "field when it matches (e.g. to strip ASDiv's unit in parentheses).",
    )
    meta: str | None = Field(
        None, description="Field with a mapping (or its JSON text) merged into Record.meta."
    )
    lists: dict[ListRole, ListRule] = Field(
        default_factory=dict,
        description="What to do when the field of question, context, solution or answer holds a "
        "list: join (with join_with), first or last element. Unset: a list is rejected.",
    )
    join_with: str = Field("\n\n", description="Separator of list elements under lists: join.")

    @model_validator(mode="after")
    def _check(self) -> FieldMap:
        for role in self.lists:
            if getattr(self, role) is None:
                raise ValueError(f"lists.{role}: no {role} field is set in the field map")
        if self.messages is not None:
            if self.question is not None or self.solution is not None:
                raise ValueError(
                    "messages mode takes the question and solution from the chat turns: "
                    "leave question and solution unset"
                )
        else:
            if self.question is None:
                raise ValueError("set question (the field holding the problem) or messages")
            if self.solution is None and self.answer is None:
                raise ValueError("set solution, answer or both")
        if self.answer_is_index and self.choices is None:
            raise ValueError("answer_is_index needs choices")
        if self.answer_pattern is not None:
            import regex

            try:
                groups = regex.compile(self.answer_pattern).groups
            except regex.error as err:
                raise ValueError(
                    f"answer_pattern is not a valid regular expression: {err}"
                ) from None
            if groups < 1:
                raise ValueError("answer_pattern needs one capturing group (the answer)")
        return self


PRESETS: dict[str, FieldMap] = {
    # GSM8K: the CoT solution lives in "answer" and ends with "#### N".
    "gsm8k": FieldMap(id="idx", question="question", solution="answer"),
    # MATH (and MATH-style sets): answer in \boxed{} unless an "answer" field is given.
    "math": FieldMap(id="idx", question="problem", solution="solution", answer="answer"),
    "math500": FieldMap(id="unique_id", question="problem", solution="solution", answer="answer"),
    # The original work's AMC23 file.
    "amc23": FieldMap(id="ID", question="Problem", solution="Solution", answer="Answer"),
    "messages": FieldMap(id="id", messages="messages"),
    # Qwen2.5-Math evaluation sets; several carry only an answer, no reference solution.
    "aime24": FieldMap(id="id", question="problem", solution="solution", answer="answer"),
    "amc23_qwen": FieldMap(id="id", question="problem", answer="answer"),
    "sat_math": FieldMap(id="id", question="question", choices="options", answer="Answer"),
    "mmlu_stem": FieldMap(
        id="idx", question="question", choices="choices", answer="answer", answer_is_index=True
    ),
    "asdiv": FieldMap(
        id="idx",
        context="body",
        question="question",
        answer="answer",
        answer_pattern=r"(.*?)\s*\([^()]*\)",
    ),
    # The original work's rewritten-SFT examples (a JSON array).
    "authors_rewrites": FieldMap(
        id="idx", question="question", solution="original_solution", answer="gold_answer_num"
    ),
    # What write_records_jsonl / write_records_parquet produce.
    "records": FieldMap(
        id="id", question="question", solution="solution", answer="answer", meta="meta"
    ),
}

# Auto-detection: the first preset whose keys are all in the first parsed row wins.
_SIGNATURES: list[tuple[str, frozenset[str]]] = [
    ("messages", frozenset({"messages"})),
    ("records", frozenset({"id", "question", "solution", "answer", "meta"})),
    ("amc23", frozenset({"Problem", "Solution"})),
    ("math500", frozenset({"problem", "solution", "unique_id"})),
    ("aime24", frozenset({"problem", "solution", "id"})),
    ("math", frozenset({"problem", "solution"})),
    ("amc23_qwen", frozenset({"problem", "answer"})),
    ("sat_math", frozenset({"question", "options", "Answer"})),
    ("mmlu_stem", frozenset({"question", "choices", "answer"})),
    ("asdiv", frozenset({"body", "question", "answer"})),
    ("authors_rewrites", frozenset({"question", "original_solution", "gold_answer_num"})),
    ("gsm8k", frozenset({"question", "answer"})),
]


def detect_fields(row: dict[str, Any]) -> str | None:
    """The preset name whose fields a row has, or None."""
    keys = set(row)
    for name, needed in _SIGNATURES:
        if needed <= keys:
            return name
    return None


class DatasetSpec(StrictModel):
    """Where a dataset comes from and which part of it to use."""

    source: str = Field(
        description="Local .jsonl/.json/.parquet file or folder, s3:// URI, named set "
        "(gsm8k:train, math500, ...; see `patchgap data ls`) or hf://owner/name."
    )
    fields: str | FieldMap = Field(
        "auto", description="Preset name, a FieldMap, or 'auto' (named set's preset / guessed)."
    )
    split: str | None = Field(None, description="Split of a named set or hub dataset.")
    hub_config: str | None = Field(None, description="Config name of an hf:// dataset.")
    limit: int | None = Field(None, ge=1, description="Use at most this many valid records.")
    shuffle: bool | None = Field(
        None,
        description="Seeded shuffle by id. Unset: shuffle exactly when limit is set, which makes "
        "the limit a fixed seeded subset; false with a limit takes the first valid records.",
    )
    seed: int = Field(0, description="Seed of the shuffle / subset.")
    id_prefix: str | None = Field(
        None, description="Prefix of positional ids (default: set name or file stem)."
    )

    @field_validator("fields")
    @classmethod
    def _known_preset(cls, value: str | FieldMap) -> str | FieldMap:
        if isinstance(value, str) and value != "auto" and value not in PRESETS:
            raise ValueError(f"unknown field preset {value!r}; known: auto, {', '.join(PRESETS)}")
        return value


def as_spec(spec: DatasetSpec | str | Path) -> DatasetSpec:
    """Accept a plain source string or path wherever a spec is expected."""
    if isinstance(spec, DatasetSpec):
        return spec
    return DatasetSpec(source=str(spec))


# --------------------------------------------------------------------------------------------
# Named public sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedSet:
    """A public set: where it lies in the data directory and where on the hub."""

    name: str
    paths: dict[str, str]  # split -> path relative to the data directory
    preset: str
    hub: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str] | None = None  # our split -> the hub's split name
    note: str = ""

    @property
    def default_split(self) -> str:
        return next(iter(self.paths))


def _qwen(name: str) -> str:
    return f"qwen25math_eval/{name}/test.jsonl"


NAMED_SETS: dict[str, NamedSet] = {
    s.name: s
    for s in [
        NamedSet(
            "gsm8k",
            {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
            "gsm8k",
            hub="openai/gsm8k",
            hub_config="main",
            note="grade-school math, CoT ending '#### N'",
        ),
        NamedSet(
            "math500",
            {"test": "math500/test.jsonl"},
            "math500",
            hub="HuggingFaceH4/MATH-500",
            note="MATH-500 eval split",
        ),
        NamedSet(
            "math_train",
            {"train": "math_train/train"},
            "math",
            hub="DigitalLearningGmbH/MATH-lighteval",
            note="MATH train, one JSON file per problem",
        ),
        NamedSet(
            "math_test5000",
            {"test": "math_test5000/test.jsonl"},
            "math",
            hub="DigitalLearningGmbH/MATH-lighteval",
            note="MATH full test (contains MATH-500: never train on it)",
        ),
        NamedSet(
            "amc23",
            {"test": "authors_examples/amc23_orca.jsonl"},
            "amc23",
            note="AMC23 (original work's file)",
        ),
        NamedSet(
            "authors_rewrites",
            {"train": "authors_examples/data.json"},
            "authors_rewrites",
            note="original work's rewritten examples",
        ),
        NamedSet(
            "aime24",
            {"test": _qwen("aime24")},
            "aime24",
            hub="HuggingFaceH4/aime_2024",
            hub_splits={"test": "train"},
        ),
        NamedSet("amc23_qwen", {"test": _qwen("amc23")}, "amc23_qwen", note="answers only"),
        NamedSet("minerva_math", {"test": _qwen("minerva_math")}, "math"),
        NamedSet("sat_math", {"test": _qwen("sat_math")}, "sat_math", note="multiple choice"),
        NamedSet("mmlu_stem", {"test": _qwen("mmlu_stem")}, "mmlu_stem", note="multiple choice"),
        NamedSet("asdiv", {"test": _qwen("asdiv")}, "asdiv", note="answers only"),
        NamedSet("gsm8k_qwen", {"test": _qwen("gsm8k")}, "gsm8k", note="GSM8K test with idx"),
    ]
}


def named_set_path(name: str, split: str | None = None) -> Path | None:
    """The local file or folder of a named set in the data directory, or None when absent."""
    entry = NAMED_SETS[name]
    root = data_dir()
    if root is None:
        return None
    path = root / entry.paths[split or entry.default_split]
    return path if path.exists() else None


# --------------------------------------------------------------------------------------------
# Rejects and counts
# --------------------------------------------------------------------------------------------


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
    sha256: str = ""  # of the bytes actually read, when the source is one file
    read: int = 0
    valid: int = 0
    selected: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass
class LoadResult:
    """Records of a dataset with the counts of the read and where the rejects are."""

    records: list[Record]
    counts: Counts
    rejects_path: Path | None
    rejects: list[Reject]  # in memory only when no rejects_path was given


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
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


def _rows_jsonl(path: Path, display: str, prefix: str) -> Iterator[_Row]:
    pending: list[_Row] = []  # leading bad lines, held until some line parses
    parsed_any = False
    first_error: str | None = None
    row = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                item = _Row(display, lineno, row, f"{prefix}-{row}", raw=repr(raw[:200]))
                item.error = ("invalid_json", f"line is not UTF-8 (byte {err.start})")
                first_error = first_error or f"{display}:{lineno}:{err.start + 1}: not UTF-8 text"
            else:
                if lineno == 1:
                    text = text.lstrip("\ufeff")
                if not text.strip():
                    continue
                text = text.rstrip("\r\n")  # else errors at the end point past the line
                item = _Row(display, lineno, row, f"{prefix}-{row}", raw=text)
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    item.error = ("invalid_json", f"invalid JSON at column {err.colno}: {err.msg}")
                    first_error = first_error or f"{display}:{lineno}:{err.colno}: {err.msg}"
                except (RecursionError, ValueError) as err:
                    item.error = ("invalid_json", f"invalid JSON: {_json_limit(err)}")
                    first_error = first_error or f"{display}:{lineno}:1: {_json_limit(err)}"
                else:
                    parsed_any = True
                    if isinstance(obj, dict):
                        item.data, item.raw = obj, obj
                    else:
                        item.error = ("not_object", f"a JSON {type(obj).__name__}, not an object")
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


def _parse_json_array(text: str, start: int, display: str) -> list[tuple[int, Any]]:
    """Elements of a JSON array with the line each starts on; errors name line:column."""
    decoder = json.JSONDecoder()
    out: list[tuple[int, Any]] = []
    i = _skip_ws(text, start + 1)
    if i < len(text) and text[i] == "]":
        i = _skip_ws(text, i + 1)
    else:
        line, last = 1, 0
        while True:
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{display}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}"
                ) from None
            except (RecursionError, ValueError) as err:
                where = _position(text, i)
                raise DataError(f"{display}:{where}: invalid JSON: {_json_limit(err)}") from None
            line += text.count("\n", last, i)
            last = i
            out.append((line, obj))
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


def _read_text(path: Path, display: str) -> str:
    try:
        return path.read_bytes().decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(f"{display}: not UTF-8 text (byte {err.start})") from None


def _rows_json(
    path: Path, display: str, prefix: str, single_id: str | None, text: str | None = None
) -> Iterator[_Row]:
    """A JSON array of records, one JSON object (one record), or JSON Lines named .json."""
    if text is None:
        text = _read_text(path, display)
    start = _skip_ws(text, 0)
    if start >= len(text):
        raise DataError(f"{display}: empty file, no records")
    if text[start] == "[":
        elements = _parse_json_array(text, start, display)
        if not elements:
            raise DataError(f"{display}: empty JSON array, no records")
        for row, (line, obj) in enumerate(elements):
            item = _Row(display, line, row, f"{prefix}-{row}", raw=obj)
            if isinstance(obj, dict):
                item.data = obj
            else:
                item.error = ("not_object", f"a JSON {type(obj).__name__}, not an object")
            yield item
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved as .json, which `datasets` accepts too
            yield from _rows_jsonl(path, display, prefix)
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
    yield _Row(display, line, 0, single_id or prefix, data=obj, raw=obj)


def _rows_parquet(path: Path, display: str, prefix: str) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{display}: not a readable Parquet file: {err}") from None
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
            yield _Row(display, None, row, f"{prefix}-{row}", data=obj, raw=obj)
            row += 1


def _rows_file(
    path: Path, display: str, prefix: str, single_id: str | None = None
) -> Iterator[_Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _rows_jsonl(path, display, prefix)
    elif suffix == ".json":
        yield from _rows_json(path, display, prefix, single_id)
    elif suffix == ".parquet":
        yield from _rows_parquet(path, display, prefix)
    else:
        raise DataError(
            f"{display}: unknown format {path.suffix or '(no suffix)'!r}; "
            "expected .jsonl, .json, .parquet or a folder of them"
        )


def _rows_dir(path: Path, display: str, prefix: str) -> Iterator[_Row]:
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
                yield from _rows_file(file, file_display, f"{prefix}/{rel}")
            except DataError as err:
                # One unreadable file of a folder is one reject, not the end of the read: the
                # other files' records are kept.
                item = _Row(file_display, None, 0, f"{prefix}/{rel}", raw=None)
                item.error = ("unreadable_file", str(err).removeprefix(f"{file_display}:").strip())
                yield item
            continue
        fid = f"{prefix}/{rel}"
        try:
            text = _read_text(file, file_display)
            # One record per file (MATH layout): a corrupt file is one bad record, not a bad set.
            single = (
                list(_rows_json(file, file_display, fid, fid, text))
                if text.lstrip().startswith("{")
                else None
            )
        except DataError as err:
            item = _Row(file_display, None, 0, fid, raw=None)
            item.error = ("invalid_json", str(err).removeprefix(f"{file_display}:").strip())
            yield item
            continue
        if single is not None:
            yield from single
        else:  # an array file: a parse error stays a file-level error
            yield from _rows_json(file, file_display, fid, None, text)


def _is_data_file(rel: Path) -> bool:
    # "_manifest.json" (the store's), "_SUCCESS", ".x.tmp": bookkeeping, not records.
    hidden = any(part.startswith(("_", ".")) for part in rel.parts)
    return not hidden and rel.suffix.lower() in SUFFIXES


def _rows_hub(rows: Iterable[dict[str, Any]], display: str, prefix: str) -> Iterator[_Row]:
    for row, obj in enumerate(rows):
        yield _Row(display, None, row, f"{prefix}-{row}", data=dict(obj), raw=dict(obj))


def _load_hub(hub: str, config: str | None, split: str, display: str) -> Iterable[dict[str, Any]]:
    """A hub dataset split through ``datasets.load_dataset``: from its local copy under
    :func:`~patchgap.settings.hub_dir` when there is one, else from the hub (internet or the HF
    cache). ``config`` names one of the configs of the dataset card."""
    root = hub_dir()
    local = root / hub if root is not None and (root / hub).is_dir() else None
    try:
        import datasets

        return datasets.load_dataset(str(local) if local else hub, config, split=split)
    except Exception as err:  # offline, unknown repo, bad config or split: one message
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = local or "the hub"
        fix = (
            ""
            if local
            else f"; without hub access, put a copy of the dataset repository at "
            f"$PATCHGAP_HUB_DIR/{hub}/ or use a local source"
        )
        raise DataError(f"{display}: cannot load from {where}: {msg}{fix}") from None


# --------------------------------------------------------------------------------------------
# Resolving a source
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    display: str
    prefix: str
    preset: str | None = None
    path: Path | None = None
    hub_rows: Iterable[dict[str, Any]] | None = None  # a loaded hub split

    def rows(self) -> Iterator[_Row]:
        if self.hub_rows is not None:
            return _rows_hub(self.hub_rows, self.display, self.prefix)
        assert self.path is not None
        if self.path.is_dir():
            return _rows_dir(self.path, self.display, self.prefix)
        if not self.path.exists():
            raise DataError(f"{self.display}: no such file or folder")
        return _rows_file(self.path, self.display, self.prefix)


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _resolve(spec: DatasetSpec, external: bool = False) -> _Source:
    source = spec.source.strip()
    if source.startswith("s3://"):
        return _resolve_s3(spec, source, external)
    if source.startswith("hf://"):
        return _hub_source(spec, source.removeprefix("hf://"), None, None)
    if source.startswith("file://"):
        source = source.removeprefix("file://")
    path = Path(source).expanduser()
    if path.exists():
        _no_split(spec, source)
        return _Source(str(path), spec.id_prefix or _stem(path), path=path)
    name, _, split = source.partition(":")
    if name in NAMED_SETS:
        return _resolve_named(spec, NAMED_SETS[name], split or spec.split)
    if path.suffix.lower() in SUFFIXES or source.startswith(("/", ".", "~")):
        raise DataError(f"{source}: no such file or folder")
    if _HUB_NAME.fullmatch(source):
        return _hub_source(spec, source, None, None)
    raise DataError(
        f"{source}: not a file or folder, not a named set (see `patchgap data ls`), "
        "and not an s3:// or hf:// address"
    )


def _no_split(spec: DatasetSpec, source: str) -> None:
    if spec.split is not None:
        raise DataError(
            f"{source}: split={spec.split!r} applies only to named sets and hub datasets"
        )


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _resolve_named(spec: DatasetSpec, entry: NamedSet, split: str | None) -> _Source:
    split = split or entry.default_split
    if split not in entry.paths:
        raise DataError(f"{entry.name}: no split {split!r}; known: {', '.join(entry.paths)}")
    label = entry.name if len(entry.paths) == 1 else f"{entry.name}:{split}"
    prefix = spec.id_prefix or label.replace(":", "-")
    local = named_set_path(entry.name, split)
    if local is not None:
        return _Source(str(local), prefix, preset=entry.preset, path=local)
    root = data_dir()
    where = (
        f"{root / entry.paths[split]} does not exist"
        if root is not None
        else f"no data directory ({DATA_DIR_ENV} is unset and ../shared/data is absent)"
    )
    if entry.hub is None:
        raise DataError(
            f"{label}: {where} and the set has no hub source; set {DATA_DIR_ENV} to a folder "
            "laid out like shared/data"
        )
    hub_split = (entry.hub_splits or {}).get(split, split)
    try:
        src = _hub_source(spec, entry.hub, entry.hub_config, hub_split, prefix=prefix)
    except DataError as err:
        raise DataError(
            f"{label}: {where}, and {err}; set {DATA_DIR_ENV} to a folder laid out like shared/data"
        ) from None
    src.preset = entry.preset
    return src


def _hub_source(
    spec: DatasetSpec, repo: str, config: str | None, split: str | None, prefix: str | None = None
) -> _Source:
    split = split or spec.split or "train"
    config = config or spec.hub_config
    display = f"hf://{repo}" + (f" ({config})" if config else "") + f" [{split}]"
    prefix = prefix or spec.id_prefix or f"{repo.rsplit('/', 1)[-1]}-{split}"
    return _Source(display, prefix, hub_rows=_load_hub(repo, config, split, display))


def _resolve_s3(spec: DatasetSpec, uri: str, external: bool) -> _Source:
    _no_split(spec, uri)
    dest = cache_dir() / "datasets" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = Path(store.fetch_to_local(uri, dest, external=external))
    stem = uri.rstrip("/").rsplit("/", 1)[-1]
    prefix = spec.id_prefix or (Path(stem).stem if local.is_file() else stem)
    return _Source(uri, prefix, path=local)


# --------------------------------------------------------------------------------------------
# Row -> Record
# --------------------------------------------------------------------------------------------


class RecordError(ValueError):
    """A row that cannot become a record; ``kind`` groups the rejects, ``reason`` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _text_field(data: dict[str, Any], key: str, what: str) -> str:
    """A required string field; missing, null, empty or non-string values reject the record."""
    if key not in data or data[key] is None:
        raise RecordError(f"missing_{what}", f"no {what}: field {key!r} is missing")
    value = data[key]
    if not isinstance(value, str):
        raise _wrong_type(key, what, value, "a string")
    if not value.strip():
        raise RecordError(f"empty_{what}", f"empty {what} in field {key!r}")
    return value


def _wrong_type(key: str, what: str, value: Any, want: str) -> RecordError:
    hint = ""
    if isinstance(value, list):
        hint = f"; set lists: {{{what}: join|first|last}} in the field map"
    return RecordError(
        "wrong_type", f"field {key!r} ({what}) is a {type(value).__name__}, not {want}{hint}"
    )


def _apply_lists(data: dict[str, Any], fm: FieldMap) -> dict[str, Any]:
    """``data`` with the list-valued fields named in ``fm.lists`` reduced to one value."""
    if not fm.lists:
        return data
    out = dict(data)
    for role, rule in fm.lists.items():
        key = getattr(fm, role)
        value = data.get(key)
        if not isinstance(value, list):
            continue  # a plain value in a listed field is taken as it is
        items = [v for v in value if v is not None]
        if any(isinstance(v, bool) or not isinstance(v, str | int | float) for v in items):
            raise RecordError("wrong_type", f"field {key!r} ({role}) is a list of non-text items")
        if not items:
            out[key] = None
        elif rule == "join":
            out[key] = fm.join_with.join(str(v) for v in items)
        else:
            out[key] = items[0] if rule == "first" else items[-1]
    return out


def _content(turn: Any, i: int, key: str) -> tuple[str, str]:
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
        raise RecordError("bad_messages", f"{key}[{i}] is not a {{role, content}} turn")
    content = turn.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if any(not isinstance(p, str) for p in parts):
            raise RecordError(
                "bad_messages", f"{key}[{i}].content has a text part that is not a string"
            )
        content = "".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str):
        raise RecordError(
            "bad_messages", f"{key}[{i}].content is a {type(content).__name__}, not text"
        )
    return turn["role"], content


def _from_messages(data: dict[str, Any], key: str, meta: dict[str, Any]) -> tuple[str, str]:
    msgs = data.get(key)
    if msgs is None:
        raise RecordError("bad_messages", f"field {key!r} is missing")
    if not isinstance(msgs, list):
        raise RecordError(
            "bad_messages", f"field {key!r} is a {type(msgs).__name__}, not a list of turns"
        )
    turns = [_content(t, i, key) for i, t in enumerate(msgs)]
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not users:
        raise RecordError("bad_messages", f"{key} has no user turn")
    assistants = [i for i, (role, _) in enumerate(turns) if role == "assistant" and i > users[0]]
    if not assistants:
        raise RecordError("bad_messages", f"{key} has no assistant turn after the first user turn")
    question, solution = turns[users[0]][1], turns[assistants[-1]][1]
    if not question.strip():
        raise RecordError(
            "empty_question", f"empty question: the first user turn of {key!r} is empty"
        )
    if not solution.strip():
        raise RecordError(
            "empty_solution", f"empty solution: the last assistant turn of {key!r} is empty"
        )
    systems = [c for role, c in turns if role == "system"]
    if systems:
        meta["system"] = systems[0]
    if len(turns) > 2 + len(systems):  # more than one exchange: keep the whole conversation
        meta["messages"] = msgs
    return question, solution


def _render_choices(value: Any, key: str) -> tuple[str, int]:
    """Options as text appended to the question, and how many there are."""
    if isinstance(value, str):
        return value, 0
    labels: list[str]
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        texts = value["text"]
        labels = value.get("label") or list(_LETTERS[: len(texts)])
    elif isinstance(value, list):
        texts, labels = value, list(_LETTERS[: len(value)])
    else:
        raise RecordError("wrong_type", f"field {key!r} (choices) is a {type(value).__name__}")
    if not texts or any(not isinstance(t, str) for t in texts) or len(labels) != len(texts):
        raise RecordError(
            "wrong_type", f"field {key!r} (choices) must be a non-empty list of strings"
        )
    return "\n".join(f"{label}) {text}" for label, text in zip(labels, texts, strict=True)), len(
        texts
    )


def choice_count(value: Any) -> int:
    """How many options a choices field holds (0 for free text or anything unreadable)."""
    try:
        return _render_choices(value, "choices")[1]
    except RecordError:
        return 0


def _answer_value(data: dict[str, Any], fm: FieldMap, n_choices: int) -> str | None:
    if fm.answer is None:
        return None
    value = data.get(fm.answer)
    if value is None:
        return None
    if fm.answer_is_index:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(
                "wrong_type", f"field {fm.answer!r} (answer index) is a {type(value).__name__}"
            )
        if not 0 <= value < n_choices:
            raise RecordError(
                "bad_answer", f"answer index {value} is outside the {n_choices} choices"
            )
        return _LETTERS[value]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _wrong_type(fm.answer, "answer", value, "text or a number")
    text = str(value).strip()  # numeric answers (AMC23's 27.0) keep their written form
    if fm.answer_pattern is not None:
        import regex

        try:
            match = regex.fullmatch(
                fm.answer_pattern, text, flags=regex.DOTALL, timeout=ANSWER_PATTERN_SECONDS
            )
        except TimeoutError:
            # Catastrophic backtracking hangs on every such record: stop once, with one line.
            raise DataError(
                f"answer_pattern {fm.answer_pattern!r} took over {ANSWER_PATTERN_SECONDS}s on "
                f"the answer {text[:40]!r}; simplify it (nested repeats like (a+)+ backtrack)"
            ) from None
        if match is not None and match.group(1).strip():
            text = match.group(1).strip()
    return text or None


def _record_id(data: dict[str, Any], fm: FieldMap, default: str) -> str:
    if fm.id is None or data.get(fm.id) is None:
        return default
    value = data[fm.id]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordError("wrong_type", f"field {fm.id!r} (id) is a {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise RecordError("bad_id", f"empty id in field {fm.id!r}")
    return text


def _meta_field(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RecordError("wrong_type", f"field {key!r} (meta) is text but not JSON") from None
    if not isinstance(value, dict):
        raise RecordError(
            "wrong_type", f"field {key!r} (meta) is a {type(value).__name__}, not a mapping"
        )
    return value


def to_record(data: dict[str, Any], fields: FieldMap, default_id: str) -> Record:
    """Map one source row to a :class:`Record`; raises :class:`RecordError` on a bad row.

    Public for stages that build records from in-memory rows; readers use it through
    :func:`iter_records`, which turns failures into rejects.
    """
    fm = fields
    rid = _record_id(data, fm, default_id)
    used = {k for k in (fm.id, fm.question, fm.solution, fm.answer, fm.messages, fm.meta) if k}
    meta = _meta_field(data, fm.meta) if fm.meta else {}
    meta.update({k: v for k, v in data.items() if k not in used})
    data = _apply_lists(data, fm)
    if fm.messages is not None:
        question, solution = _from_messages(data, fm.messages, meta)
    else:
        assert fm.question is not None
        question = _text_field(data, fm.question, "question")
        solution = _text_field(data, fm.solution, "solution") if fm.solution else ""
    n_choices = 0
    if (
        fm.context is not None
        and isinstance(data.get(fm.context), str)
        and data[fm.context].strip()
    ):
        question = f"{data[fm.context].strip()} {question}"
    if fm.choices is not None and data.get(fm.choices) is not None:
        rendered, n_choices = _render_choices(data[fm.choices], fm.choices)
        question = f"{question}\n{rendered}"
    elif fm.answer_is_index:
        raise RecordError("missing_choices", f"field {fm.choices!r} (choices) is missing")
    answer = _answer_value(data, fm, n_choices)
    if answer is None and solution:
        answer = reference_answer(solution)
    if answer is None or not str(answer).strip():
        where = f"field {fm.answer!r} is missing or empty and " if fm.answer else ""
        raise RecordError(
            "no_answer", f"no reference answer: {where}none can be extracted from the solution"
        )
    return Record(
        id=rid, question=question, solution=solution, answer=str(answer).strip(), meta=meta
    )


# --------------------------------------------------------------------------------------------
# The streaming API
# --------------------------------------------------------------------------------------------


def _field_map(spec: DatasetSpec, src: _Source) -> tuple[FieldMap | None, str]:
    if isinstance(spec.fields, FieldMap):
        return spec.fields, "custom"
    if spec.fields != "auto":
        return PRESETS[spec.fields], spec.fields
    if src.preset is not None:
        return PRESETS[src.preset], src.preset
    return None, "auto"


def _iter_valid(
    spec: DatasetSpec, src: _Source, sink: RejectSink, counts: Counts
) -> Iterator[Record]:
    fm, counts.fields = _field_map(spec, src)
    first_seen: dict[str, str] = {}
    # With fields=auto the layout is guessed per file: a folder may mix layouts.
    auto, unknown = fm is None, ""
    guessed_for: str | None = None
    guessed: list[str] = []
    for row in src.rows():
        counts.read += 1
        if auto and row.error is None and row.data is not None and row.source != guessed_for:
            guessed_for, name = row.source, detect_fields(row.data)
            keys = ", ".join(sorted(str(k)[:40] for k in row.data)[:12])
            unknown = (
                f"cannot tell which fields hold the question and solution (keys: {keys}); "
                f"pass fields as one of {', '.join(PRESETS)} or a FieldMap"
            )
            if name is None and not guessed:  # nothing read yet: the whole set is unusable
                raise DataError(f"{row.source}: {unknown}")
            fm = PRESETS[name] if name is not None else None
            if name is not None and name not in guessed:
                guessed.append(name)
                counts.fields = f"auto: {', '.join(guessed)}"
        rid: str | None = None
        try:
            if row.error is not None:
                raise RecordError(*row.error)
            if fm is None:
                raise RecordError("unknown_fields", unknown)
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
    src = _resolve(spec, external)
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


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def write_records_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSONL (the ``records`` preset reads it back); atomic; returns the count."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_dict(), ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def write_records_parquet(
    records: Iterable[Record], path: str | Path, batch_size: int = 1000
) -> int:
    """Write records as Parquet, streaming in row groups; ``meta`` is stored as JSON text so
    records with different meta keys share one schema. Atomic; returns the count."""
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
                    "meta": [json.dumps(r.meta, ensure_ascii=False, default=str) for r in batch],
                }
                writer.write_table(pa.table(columns, schema=schema))
                n += len(batch)
                batch = []
    return n


__all__ = [
    "NAMED_SETS",
    "PRESETS",
    "Counts",
    "DatasetSpec",
    "FieldMap",
    "LoadResult",
    "NamedSet",
    "Record",
    "RecordError",
    "Reject",
    "RejectSink",
    "as_spec",
    "detect_fields",
    "iter_records",
    "load_records",
    "named_set_path",
    "to_record",
    "write_records_jsonl",
    "write_records_parquet",
]
