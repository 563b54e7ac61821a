"""Evaluation items: the downstream math benchmarks (:class:`MathItem`) and the general
multiple-choice benchmarks (:class:`MCItem`) built from the registry's ``math``, ``choice`` and
``heldout`` sets (or any path / s3:// URI), the fixed seeded subsets used for size-limited runs,
and the lm-eval task files.

Files are read through :mod:`patchgap.data.readers` and, for math sets, mapped to records with
the set's :class:`~patchgap.data.fields.FieldMap` like training data; the multiple-choice layouts
build their items from the rows (HellaSwag's text and MMLU's CSV files are their own formats)."""

from __future__ import annotations

import bz2
import csv
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchgap.data.convert import RecordError, choice_count, to_record
from patchgap.data.fields import PRESETS, FieldMap, Record
from patchgap.data.readers import json_objects
from patchgap.data.registry import NamedSet, named_set, named_sets
from patchgap.data.sources import DatasetSpec, resolve_path
from patchgap.data.stream import load_records
from patchgap.errors import ConfigError, DataError
from patchgap.settings import data_dir as default_data_dir

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


# ----------------------------------------------------------------------------- math sets

# Record errors that mean the row has no usable question / no reference answer.
_NO_QUESTION = {"missing_question", "empty_question"}
_NO_ANSWER = {"no_answer", "missing_solution", "empty_solution"}


def math_set(name: str) -> NamedSet:
    """The registry's downstream math benchmark called ``name``."""
    known = named_sets("math")
    if name not in known:
        raise ConfigError(
            f"unknown math benchmark {name!r}; known: {sorted(known)} "
            "(or give a path with field names)"
        )
    return known[name]


def load_math_set(
    name_or_set: str | NamedSet, data_dir: Path | None = None, *, path: str | Path | None = None
) -> list[MathItem]:
    """Load a downstream math set by name (a ``math`` set of the registry) or from a
    :class:`~patchgap.data.registry.NamedSet`; ``path`` overrides its location.

    Rows go through the one JSONL reader and :func:`~patchgap.data.convert.to_record` with the
    set's field map. The gold answer is the answer field when the map names one and the row has
    it, else the final answer extracted from the solution (``\\boxed{}`` or GSM8K's ``#### N``).
    A row without a question or an answer is a :class:`DataError` naming the file and line: an
    evaluation set must be complete.
    """
    entry = math_set(name_or_set) if isinstance(name_or_set, str) else name_or_set
    assert isinstance(entry.fields, FieldMap), f"{entry.name}: a math set needs a FieldMap"
    local = resolve_path(path or entry.path, data_dir)
    items = [
        _math_item(row, entry.fields, f"{local}:{lineno}", f"{local.stem}-{lineno}")
        for lineno, row in json_objects(local)
    ]
    if not items:
        raise DataError(f"{local}: no problems")
    return items


def _math_item(row: dict[str, Any], fm: FieldMap, where: str, default_id: str) -> MathItem:
    """One math problem: the record of ``row`` under ``fm``, with the options (``fm.choices``)
    written after the question and the gold answer reduced to their letter."""
    # The solution only stands in for a missing answer, and the options are written here.
    use = {"choices": None}
    if fm.answer is not None and row.get(fm.answer) not in (None, ""):
        use["solution"] = None
    try:
        rec = to_record(row, fm.model_copy(update=use), default_id)
    except RecordError as err:
        if err.kind in _NO_QUESTION or "(question)" in err.reason:
            raise DataError(f"{where}: missing question field {fm.question!r}") from None
        if err.kind in _NO_ANSWER:
            wanted = fm.answer or fm.solution
            raise DataError(f"{where}: no reference answer (field {wanted!r})") from None
        raise DataError(f"{where}: {err.reason}") from None
    gold = rec.answer
    raw = row.get(fm.answer) if fm.answer is not None else None
    if isinstance(raw, float) and raw.is_integer():  # AMC23 stores 27.0: read it as 27
        gold = str(int(raw))
    question, labels = rec.question.strip(), None
    options = row.get(fm.choices) if fm.choices is not None else None
    if options:
        if isinstance(options, list):
            options = "\n".join(str(o) for o in options)
        question = f"{question}\n\nOptions: {options}"
        labels = LETTERS[:5]
        gold = gold.strip().strip("()").upper()[:1]
    return MathItem(rec.id, question, gold, labels)


def load_mapped_set(
    path: str, fields: str | FieldMap = "auto", data_dir: Path | None = None
) -> list[MathItem]:
    """A custom downstream set read with the training data's field map (a preset name or a
    :class:`~patchgap.data.fields.FieldMap`: context fields, answer patterns, choices, list
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
    for lineno, row in json_objects(path):
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
    rows = [row for _, row in json_objects(folder / "valid.jsonl")]
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
        for lineno, row in json_objects(p):
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
    entry = named_set(name, "choice", what="multiple-choice benchmark")
    assert entry.layout is not None
    return load_mc_format(entry.layout, resolve_path(path or entry.path, data_dir))


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


def load_heldout_set(
    name: str, path: str | Path | None = None, data_dir: Path | None = None
) -> list[Record]:
    """Problems with reference solutions (:class:`~patchgap.data.fields.Record`) of a held-out
    set, read with the training data's loader; records without a solution are left out."""
    entry = named_set(name, "heldout", what="held-out set")
    local = resolve_path(path or entry.path, data_dir)
    if not local.exists():
        raise DataError(f"{local}: held-out set {name!r} not found")
    result = load_records(DatasetSpec(source=str(local), fields=entry.fields))
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
    import datasets  # heavy third-party import, needed only when lm-eval asks for the documents

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
