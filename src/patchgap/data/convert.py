"""Row to record: :func:`to_record` maps one source row to a :class:`Record` through a
:class:`FieldMap`, or raises :class:`RecordError` (kind and reason) for a row that cannot become
one."""

from __future__ import annotations

import json
import math
from typing import Any

from patchgap.answers import reference_answer
from patchgap.data.fields import LETTERS, FieldMap, Record, format_mismatch, in_answer_format
from patchgap.errors import DataError

#: How long a user's answer_pattern may take on one answer.
ANSWER_PATTERN_SECONDS = 1.0


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
        labels = value.get("label") or list(LETTERS[: len(texts)])
    elif isinstance(value, list):
        texts, labels = value, list(LETTERS[: len(value)])
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
        return LETTERS[value]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _wrong_type(fm.answer, "answer", value, "text or a number")
    text = str(value).strip()  # numeric answers (AMC23's 27.0) keep their written form
    if fm.answer_pattern is not None:
        import regex  # third-party, needed only when a pattern is set: imported here

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


def _check_finite(data: dict[str, Any]) -> None:
    """Reject NaN and infinities anywhere in the row: JSON cannot hold them, so the record could
    not be written back, and a NaN answer is no answer."""
    for key, value in data.items():
        bad = _non_finite(value)
        if bad is not None:
            raise RecordError("not_finite", f"field {key!r} holds {bad}, which is not a number")


def _non_finite(value: Any) -> str | None:
    stack = [value]  # a loop, not recursion: rows may nest as deep as the JSON reader allows
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return repr(item)
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


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
    _check_finite(data)
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
    where = f"field {fm.answer!r} is missing or empty and " if fm.answer else ""
    if answer is None and solution:
        if not in_answer_format(solution, fm.answer_format):
            # Never read a number out of text that is not in the layout's answer format: the
            # last number of "\frac{48i-56}{85}" is not its answer.
            why = format_mismatch(fm, data) or f"field {fm.solution!r} is not in its format"
            raise RecordError(
                "no_answer",
                f"no reference answer: {where}{why} (answer_format: {fm.answer_format})",
            )
        answer = reference_answer(solution)
    if answer is None or not str(answer).strip():
        raise RecordError(
            "no_answer", f"no reference answer: {where}none can be extracted from the solution"
        )
    return Record(
        id=rid, question=question, solution=solution, answer=str(answer).strip(), meta=meta
    )
