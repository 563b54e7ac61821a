"""Records and field maps: :class:`Record` (what every dataset is read as), :class:`FieldMap`
(which source fields hold its parts), the preset field maps of known layouts, and the automatic
detection of a file's layout."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from patchgap.config import StrictModel

#: Letters of answer options, in order.
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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


AnswerFormat = Literal["any", "gsm8k", "boxed"]
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
    answer_format: AnswerFormat = Field(
        "any",
        description="How the solution writes its final answer, where the answer is taken from "
        "it: gsm8k (a '#### N' line), boxed (\\boxed{...}), any (\\boxed{}, then '####', then "
        "the last number).",
    )

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
            import regex  # third-party, needed only when a pattern is set: imported here

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
    "gsm8k": FieldMap(id="idx", question="question", solution="answer", answer_format="gsm8k"),
    # MATH (and MATH-style sets): answer in \boxed{} unless an "answer" field is given.
    "math": FieldMap(
        id="idx", question="problem", solution="solution", answer="answer", answer_format="boxed"
    ),
    "math500": FieldMap(
        id="unique_id",
        question="problem",
        solution="solution",
        answer="answer",
        answer_format="boxed",
    ),
    # The original work's AMC23 file.
    "amc23": FieldMap(
        id="ID", question="Problem", solution="Solution", answer="Answer", answer_format="boxed"
    ),
    "messages": FieldMap(id="id", messages="messages"),
    # Qwen2.5-Math evaluation sets; several carry only an answer, no reference solution.
    "aime24": FieldMap(
        id="id", question="problem", solution="solution", answer="answer", answer_format="boxed"
    ),
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

# Auto-detection: a preset fits a row when the row has its signature fields and the answer in the
# preset's own answer format; among fitting presets, one whose named fields present in the row
# include another's (strictly) is the more specific layout and wins. Two left: no guess.
_SIGNATURES: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    # meta is optional in patchgap's own layout (a record without it has none).
    "records": frozenset({"id", "question", "solution", "answer"}),
    "amc23": frozenset({"Problem", "Solution"}),
    "math500": frozenset({"problem", "solution", "unique_id"}),
    "aime24": frozenset({"problem", "solution", "id"}),
    "math": frozenset({"problem", "solution"}),
    "amc23_qwen": frozenset({"problem", "answer"}),
    "sat_math": frozenset({"question", "options", "Answer"}),
    "mmlu_stem": frozenset({"question", "choices", "answer"}),
    "asdiv": frozenset({"body", "question", "answer"}),
    "authors_rewrites": frozenset({"question", "original_solution", "gold_answer_num"}),
    "gsm8k": frozenset({"question", "answer"}),
}
_FORMAT_TEXT = {"gsm8k": "'#### <number>' line", "boxed": "\\boxed{...} answer"}
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")  # "\boxed 9" too, as MATH writes it
_HASH_LINE = re.compile(r"^\s*####\s*[-+$]?\s*[\d.,]*\d", re.M)


def in_answer_format(solution: str, fmt: AnswerFormat) -> bool:
    """Whether ``solution`` writes its final answer the way ``fmt`` says."""
    if fmt == "gsm8k":
        return _HASH_LINE.search(solution) is not None
    if fmt == "boxed":
        return _BOXED.search(solution) is not None
    return True


def format_mismatch(fm: FieldMap, row: dict[str, Any]) -> str | None:
    """Why ``row``'s answer is not in ``fm``'s answer format: None when it is, when the answer
    field gives the answer (nothing is extracted from the solution), or when there is no
    solution text to judge (such a row is rejected for what it lacks)."""
    if fm.answer_format == "any" or fm.solution is None:
        return None
    if fm.answer is not None and row.get(fm.answer) not in (None, ""):
        return None
    text = row.get(fm.solution)
    if not isinstance(text, str) or not text.strip() or in_answer_format(text, fm.answer_format):
        return None
    return f"field {fm.solution!r} has no {_FORMAT_TEXT[fm.answer_format]}"


def fitting_layouts(row: dict[str, Any]) -> list[str]:
    """The presets whose layout ``row`` has, most specific only (see the rules above)."""
    keys = set(row)
    fits: dict[str, set[str]] = {}
    for name, needed in _SIGNATURES.items():
        fm = PRESETS[name]
        if needed <= keys and format_mismatch(fm, row) is None:
            named = {fm.id, fm.question, fm.solution, fm.answer, fm.messages, fm.context}
            fits[name] = {k for k in named | {fm.choices, fm.meta} if k is not None} & keys
    return [a for a in fits if not any(fits[a] < fits[b] for b in fits)]


def detect_fields(row: dict[str, Any]) -> str | None:
    """The preset whose layout ``row`` has, or None when none fits; :class:`AmbiguousLayout`
    when several fit (auto-detection never guesses between layouts)."""
    names = fitting_layouts(row)
    if len(names) > 1:
        raise AmbiguousLayout(names)
    return names[0] if names else None


def near_layouts(row: dict[str, Any]) -> str:
    """Why presets whose fields the row has do not fit it (for the error of a failed guess)."""
    keys = set(row)
    notes = []
    for name, needed in _SIGNATURES.items():
        why = format_mismatch(PRESETS[name], row) if needed <= keys else None
        if why is not None:
            notes.append(f"{name}: {why}")
    return "; ".join(notes)


class AmbiguousLayout(ValueError):
    """A row that fits several preset layouts."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"the first record fits several layouts: {', '.join(names)}")
        self.names = names


def describe_mapping(fm: FieldMap) -> dict[str, str]:
    """Where each part of a record comes from under ``fm`` (role -> source), for a person to
    check a mapping at a glance."""
    out = {"id": fm.id or "(position in the file)"}
    if fm.messages is not None:
        out["question"] = f"{fm.messages}: first user turn"
        out["solution"] = f"{fm.messages}: last assistant turn"
    for role in ("context", "question", "choices", "solution"):
        key = getattr(fm, role)
        if key is not None:
            out[role] = key
    solution = fm.messages or fm.solution
    extracted = f"extracted from {solution!r} ({fm.answer_format} format)"
    if fm.answer is not None:
        out["answer"] = fm.answer + (f", else {extracted}" if solution else "")
    else:
        out["answer"] = extracted
    if fm.meta is not None:
        out["meta"] = fm.meta
    return out
