"""Evaluation sets: the downstream math benchmarks and the general multiple-choice benchmarks,
read from the data directory (or any path / s3:// URI), plus the fixed seeded subsets used for
size-limited runs."""

from __future__ import annotations

import bz2
import csv
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchgap.answers import reference_answer
from patchgap.data.records import PRESETS, DatasetSpec, FieldMap, choice_count, load_records
from patchgap.errors import ConfigError, DataError
from patchgap.settings import cache_dir
from patchgap.settings import data_dir as default_data_dir
from patchgap.storage.store import fetch_to_local

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MathItem:
    """One downstream problem: ``gold`` is the reference final answer (a letter when
    ``choice_labels`` is set, i.e. the problem is multiple choice written into the question)."""

    id: str
    question: str
    gold: str
    choice_labels: str | None = None


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: options in order, ``gold`` the index of the correct one."""

    id: str
    question: str
    options: list[str]
    gold: int
    passage: str | None = None
    subject: str | None = None

    @property
    def gold_letter(self) -> str:
        return LETTERS[self.gold]

    def to_doc(self) -> dict[str, Any]:
        """The flat record lm-eval task YAMLs read (every field a string, list or int)."""
        return {
            "id": self.id,
            "question": self.question,
            "options": list(self.options),
            "gold": self.gold,
            "passage": self.passage or "",
            "subject": self.subject or "",
        }


@dataclass(frozen=True)
class MathSetSpec:
    """Where a math set lives (relative to the data dir, or absolute / s3://) and its fields."""

    path: str
    question_field: str = "question"
    answer_field: str | None = "answer"
    solution_field: str | None = None
    id_field: str | None = None
    options_field: str | None = None
    extra_question_fields: tuple[str, ...] = field(default=())


#: Named downstream sets, laid out as in the project's data directory (arXiv 2602.11220).
MATH_SETS: dict[str, MathSetSpec] = {
    "gsm8k": MathSetSpec("gsm8k/test.jsonl", "question", None, solution_field="answer"),
    "math500": MathSetSpec("math500/test.jsonl", "problem", "answer", id_field="unique_id"),
    "amc23": MathSetSpec("qwen25math_eval/amc23/test.jsonl", "problem", "answer", id_field="id"),
    "aime24": MathSetSpec("qwen25math_eval/aime24/test.jsonl", "problem", "answer", id_field="id"),
    "minerva_math": MathSetSpec(
        "qwen25math_eval/minerva_math/test.jsonl", "problem", None, solution_field="solution"
    ),
    "sat_math": MathSetSpec(
        "qwen25math_eval/sat_math/test.jsonl",
        "question",
        "Answer",
        id_field="id",
        options_field="options",
    ),
    "agieval_math": MathSetSpec("agieval_v1/math.jsonl", "question", "answer"),
}

#: General (forgetting) multiple-choice sets: name -> (format, path relative to the data dir).
MC_SETS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc", "arc/ARC-Easy-test.jsonl"),
    "arc_challenge": ("arc", "arc/ARC-Challenge-test.jsonl"),
    "piqa": ("piqa", "piqa"),
    "hellaswag": ("hellaswag", "hellaswag_text/hellaswag_val_full.txt.bz2"),
    "mmlu": ("mmlu", "mmlu/test"),
    "agieval": ("agieval", "agieval_v1"),
}

#: AGIEval's English single-answer multiple-choice files (the cloze sets are math sets).
AGIEVAL_EN = (
    "aqua-rat",
    "logiqa-en",
    "lsat-ar",
    "lsat-lr",
    "lsat-rc",
    "sat-en",
    "sat-en-without-passage",
    "sat-math",
)


# ----------------------------------------------------------------------------- locations


def resolve_path(path: str | Path, data_dir: Path | None = None) -> Path:
    """A local path for ``path``: ``s3://`` URIs are fetched into the cache; relative paths are
    looked up beside the working directory first, then in the data directory."""
    text = str(path)
    if text.startswith("s3://"):
        dest = cache_dir() / "benchmarks" / text.removeprefix("s3://").replace("/", "_")
        return Path(fetch_to_local(text, dest, external=True))
    p = Path(text.removeprefix("file://")).expanduser()
    if p.is_absolute() or p.exists():
        return p
    if data_dir is None:
        data_dir = default_data_dir()
    if data_dir is None:
        raise ConfigError(
            f"benchmark path {text!r} is relative and no data directory is set "
            "(set PATCHGAP_DATA_DIR to a folder laid out like shared/data)"
        )
    return Path(data_dir) / p


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: benchmark file not found")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, row


def _answer_text(value: Any) -> str:
    # AMC23 stores answers as floats (27.0); keep integers integral so they read naturally.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _reference_from_solution(solution: str) -> str | None:
    return reference_answer(solution)


# ----------------------------------------------------------------------------- math sets


def load_math_set(name_or_spec: str | MathSetSpec, data_dir: Path | None = None) -> list[MathItem]:
    """Load a downstream math set by name (:data:`MATH_SETS`) or from a :class:`MathSetSpec`.

    The gold answer is the answer field when the spec names one, else the final answer extracted
    from the solution (``\\boxed{}`` or GSM8K's ``#### N``). A row without a question or an answer
    is a :class:`DataError` naming the file and line: an evaluation set must be complete.
    """
    if isinstance(name_or_spec, str):
        try:
            spec = MATH_SETS[name_or_spec]
        except KeyError:
            raise ConfigError(
                f"unknown math benchmark {name_or_spec!r}; known: {sorted(MATH_SETS)} "
                "(or give a path with field names)"
            ) from None
    else:
        spec = name_or_spec
    path = resolve_path(spec.path, data_dir)
    items: list[MathItem] = []
    for lineno, row in _read_jsonl(path):
        question = row.get(spec.question_field)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path}:{lineno}: missing question field {spec.question_field!r}")
        for extra in spec.extra_question_fields:
            if row.get(extra):
                question = f"{row[extra]}\n{question}"
        gold: str | None = None
        if spec.answer_field is not None and row.get(spec.answer_field) not in (None, ""):
            gold = _answer_text(row[spec.answer_field])
        elif spec.solution_field is not None and isinstance(row.get(spec.solution_field), str):
            gold = _reference_from_solution(row[spec.solution_field])
        if not gold:
            wanted = spec.answer_field or spec.solution_field
            raise DataError(f"{path}:{lineno}: no reference answer (field {wanted!r})")
        labels = None
        if spec.options_field is not None and row.get(spec.options_field):
            options = row[spec.options_field]
            if isinstance(options, list):
                options = "\n".join(str(o) for o in options)
            question = f"{question.strip()}\n\nOptions: {options}"
            labels = LETTERS[:5]
            gold = gold.strip().strip("()").upper()[:1]
        item_id = str(row[spec.id_field]) if spec.id_field and spec.id_field in row else None
        items.append(MathItem(item_id or f"{path.stem}-{lineno}", question.strip(), gold, labels))
    if not items:
        raise DataError(f"{path}: no problems")
    return items


def load_mapped_set(
    path: str, fields: str | FieldMap = "auto", data_dir: Path | None = None
) -> list[MathItem]:
    """A custom downstream set read with the training data's field map (a preset name or a
    :class:`~patchgap.data.records.FieldMap`: context fields, answer patterns, choices, list
    fields). Every record must be valid: an evaluation set with holes would skew accuracy."""
    local = resolve_path(path, data_dir)
    result = load_records(DatasetSpec(source=str(local), fields=fields))
    if result.rejects:
        first = result.rejects[0]
        raise DataError(
            f"{first.where}: {first.reason} ({len(result.rejects)} record(s) rejected; "
            "an evaluation set must be complete)"
        )
    if not result.records:
        raise DataError(f"{local}: no problems")
    used = result.counts.fields.removeprefix("auto: ")
    fm = fields if isinstance(fields, FieldMap) else PRESETS[used]
    items = []
    for rec in result.records:
        n = choice_count(rec.meta.get(fm.choices)) if fm.choices else 0
        items.append(MathItem(rec.id, rec.question, rec.answer, LETTERS[:n] if n else None))
    return items


# ----------------------------------------------------------------------------- MC sets


def load_arc(path: Path) -> list[MCItem]:
    """ARC JSONL: ``choices{text,label}`` and ``answerKey`` (labels are A-E or 1-5)."""
    items = []
    for lineno, row in _read_jsonl(path):
        try:
            texts = list(row["choices"]["text"])
            labels = [str(x) for x in row["choices"]["label"]]
            gold = labels.index(str(row["answerKey"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{lineno}: not an ARC item (choices/answerKey)") from None
        items.append(MCItem(str(row.get("id", lineno)), row["question"], texts, gold))
    return items


def load_piqa(folder: Path) -> list[MCItem]:
    """PIQA: ``valid.jsonl`` (goal, sol1, sol2) aligned line by line with ``valid-labels.lst``."""
    rows = [row for _, row in _read_jsonl(folder / "valid.jsonl")]
    label_path = folder / "valid-labels.lst"
    if not label_path.is_file():
        raise DataError(f"{label_path}: PIQA labels file not found")
    labels = [ln.strip() for ln in label_path.read_text().splitlines() if ln.strip()]
    if len(labels) != len(rows):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(rows)} PIQA items")
    items = []
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        if lab not in ("0", "1"):
            raise DataError(f"{label_path}:{i + 1}: label {lab!r} is not 0 or 1")
        items.append(MCItem(f"piqa-{i}", row["goal"], [row["sol1"], row["sol2"]], int(lab)))
    return items


_BRACKETS = re.compile(r"\[.*?\]")


def _hellaswag_clean(text: str) -> str:
    # The same clean-up lm-eval applies to HellaSwag's WikiHow text.
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[MCItem]:
    """HellaSwag as text: 6 lines per item (context, gold label, 4 endings); ``.bz2`` or plain."""
    if not path.is_file():
        raise DataError(f"{path}: HellaSwag file not found")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4)")
    items = []
    for k in range(0, len(lines), 6):
        label = lines[k + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{k + 2}: label {label!r} is not 0-3")
        endings = [_hellaswag_clean(e) for e in lines[k + 2 : k + 6]]
        items.append(MCItem(f"hellaswag-{k // 6}", _hellaswag_clean(lines[k]), endings, int(label)))
    return items


def load_mmlu(folder: Path) -> list[MCItem]:
    """MMLU CSVs (header question, choice0..3, answer index), one per subject, sorted by name."""
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise DataError(f"{folder}: no MMLU CSV files")
    items = []
    for f in files:
        subject = f.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
        with f.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for i, row in enumerate(reader):
                try:
                    options = [row[f"choice{j}"] for j in range(4)]
                    gold = int(row["answer"])
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{f}:{i + 2}: not an MMLU row") from None
                items.append(
                    MCItem(f"{subject}-{i}", row["question"], options, gold, None, subject)
                )
    return items


def load_agieval(path: Path, files: Sequence[str] = AGIEVAL_EN) -> list[MCItem]:
    """AGIEval v1 JSONL (passage, question, options ``(A)...``, label). ``path`` is one file or a
    folder of them (``files`` picks which). Items with several correct letters are skipped: the
    single-answer metric cannot score them."""
    paths = [path] if path.is_file() else [path / f"{f}.jsonl" for f in files]
    items = []
    for p in paths:
        for lineno, row in _read_jsonl(p):
            options = row.get("options")
            label = row.get("label")
            if isinstance(label, list):
                if len(label) != 1:
                    continue
                label = label[0]
            if not options or not isinstance(label, str):
                raise DataError(f"{p}:{lineno}: not a multiple-choice item (cloze set?)")
            texts = [_strip_option_label(o) for o in options]
            gold = LETTERS.index(label.strip().upper())
            if gold >= len(texts):
                raise DataError(f"{p}:{lineno}: label {label!r} beyond {len(texts)} options")
            items.append(
                MCItem(
                    f"{p.stem}-{lineno - 1}",
                    row["question"],
                    texts,
                    gold,
                    row.get("passage") or None,
                    p.stem,
                )
            )
    return items


def _strip_option_label(option: str) -> str:
    text = option.strip()
    if len(text) >= 3 and text[0] == "(" and text[2] == ")" and text[1] in LETTERS:
        return text[3:].strip()
    return text


_MC_LOADERS = {
    "arc": load_arc,
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "mmlu": load_mmlu,
    "agieval": load_agieval,
}


def load_mc_set(
    name: str, path: str | Path | None = None, data_dir: Path | None = None
) -> list[MCItem]:
    """Load a general multiple-choice set by name; ``path`` overrides its default location."""
    try:
        fmt, default = MC_SETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown multiple-choice benchmark {name!r}; known: {sorted(MC_SETS)}"
        ) from None
    return load_mc_format(fmt, resolve_path(path or default, data_dir))


def load_mc_format(fmt: str, path: Path) -> list[MCItem]:
    """Load ``path`` with the loader for format ``fmt`` (arc, piqa, hellaswag, mmlu, agieval)."""
    try:
        loader = _MC_LOADERS[fmt]
    except KeyError:
        raise ConfigError(
            f"unknown multiple-choice format {fmt!r}; known: {sorted(_MC_LOADERS)}"
        ) from None
    items = loader(path)
    if not items:
        raise DataError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- held-out and drift

#: Held-out reference solutions for the downstream NLL: name -> (path in the data directory, the
#: field preset training data of that kind is read with, so solutions look as they do in D).
HELDOUT_SETS: dict[str, tuple[str, str]] = {
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k"),
    "math500": ("math500/test.jsonl", "math500"),
    "minerva_math": ("qwen25math_eval/minerva_math/test.jsonl", "auto"),
}


def load_heldout_set(
    name: str, path: str | Path | None = None, data_dir: Path | None = None
) -> list[Any]:
    """Problems with reference solutions (:class:`~patchgap.data.records.Record`) of a held-out
    set, read with the training data's loader; records without a solution are left out."""
    try:
        default, preset = HELDOUT_SETS[name]
    except KeyError:
        raise ConfigError(f"unknown held-out set {name!r}; known: {sorted(HELDOUT_SETS)}") from None
    local = resolve_path(path or default, data_dir)
    if not local.exists():
        raise DataError(f"{local}: held-out set {name!r} not found")
    result = load_records(DatasetSpec(source=str(local), fields=preset))
    records = [r for r in result.records if r.solution.strip()]
    if not records:
        raise DataError(f"{local}: no problems with a reference solution")
    return records


def general_questions(
    sets: dict[str, Sequence[MCItem]], count: int, seed: int = 0
) -> list[tuple[str, str, str]]:
    """A fixed seeded sample of ``count`` questions spread evenly over ``sets`` (earlier sets
    take the remainder), as (benchmark, item id, question text with any passage before it)."""
    names = list(sets)
    if not names:
        return []
    out = []
    for k, name in enumerate(names):
        share = count // len(names) + (1 if k < count % len(names) else 0)
        for item in take_subset(sets[name], share, seed) if share else []:
            text = f"{item.passage}\n\n{item.question}" if item.passage else item.question
            out.append((name, item.id, text.strip()))
    return out


# ----------------------------------------------------------------------------- subsets


def subset_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """A fixed seeded subset of ``range(n)`` of size ``limit`` (all when ``limit`` is None or
    not smaller), in ascending order so runs and models see the items in the same order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ConfigError(f"benchmark size limit must be positive, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


def take_subset(items: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """The items at :func:`subset_indices` (same seed and size: same items, on any machine)."""
    return [items[i] for i in subset_indices(len(items), limit, seed)]


# ----------------------------------------------------------------------------- lm-eval tasks

#: Benchmarks the project ships lm-eval task YAMLs for: name -> lm-eval task name.
LM_EVAL_TASKS: dict[str, str] = {
    "arc_easy": "patchgap_arc_easy",
    "arc_challenge": "patchgap_arc_challenge",
    "piqa": "patchgap_piqa",
    "hellaswag": "patchgap_hellaswag",
    "mmlu": "patchgap_mmlu",
    "agieval": "patchgap_agieval",
}

_DOCS_SHIM = (
    '"""Written by patchgap.data.evalsets.render_lm_eval_tasks: lm-eval imports task functions\n'
    'from a file beside the YAML, so this one forwards to the installed package."""\n\n'
    "from patchgap.data.evalsets import lm_eval_dataset as load  # noqa: F401\n"
)


def lm_eval_dataset(*, format: str, path: str, **_: Any) -> Any:
    """The ``custom_dataset`` of the project's lm-eval tasks: a ``DatasetDict`` with one ``test``
    split of :meth:`MCItem.to_doc` records, in loader order (lm-eval passes task metadata as
    extra keyword arguments, which are ignored)."""
    import datasets

    items = load_mc_format(format, resolve_path(path))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([i.to_doc() for i in items])})


def task_yaml_dir() -> Path:
    """The folder of the shipped task YAMLs (with the ``@DATA_DIR@`` placeholder)."""
    return Path(__file__).parent / "tasks"


def render_lm_eval_tasks(
    out_dir: Path, data_dir: Path | None = None, paths: dict[str, str] | None = None
) -> Path:
    """Write the task YAMLs into ``out_dir`` (an lm-eval ``include_path``) with the data
    directory filled in; ``paths`` overrides one benchmark's location (local path or s3:// URI,
    fetched here so lm-eval only ever reads local files)."""
    if data_dir is None:
        data_dir = default_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(task_yaml_dir().glob("*.yaml")):
        text = src.read_text(encoding="utf-8")
        override = (paths or {}).get(src.stem)
        if override is not None:
            local = resolve_path(override, data_dir)
            text = re.sub(r'(?m)^  path: ".*"$', f"  path: {_yaml_str(str(local))}", text)
        elif data_dir is not None:
            text = text.replace('"@DATA_DIR@', '"' + _yaml_escape(str(Path(data_dir).resolve())))
        (out_dir / src.name).write_text(text, encoding="utf-8")
    (out_dir / "patchgap_docs.py").write_text(_DOCS_SHIM, encoding="utf-8")
    return out_dir


def _yaml_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _yaml_str(text: str) -> str:
    return '"' + _yaml_escape(text) + '"'
