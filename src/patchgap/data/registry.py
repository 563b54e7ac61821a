"""The one registry of named sets: every public set the project knows by name, with its role
(what the project uses it for), where it lies in the data directory (and on the hub), and how its
rows are read (a field map, or a multiple-choice layout).

A name is unique within a role; the same name may stand for different files in two roles (the
data source ``amc23`` is the original work's file, the math benchmark ``amc23`` the Qwen2.5-Math
evaluation file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from patchgap.data.fields import FieldMap
from patchgap.errors import ConfigError
from patchgap.settings import data_dir

#: What a named set is for:
#: ``training`` a dataset D to rewrite and train on, read as records by name;
#: ``reference`` a problem set read as records by name, kept for evaluation, never trained on;
#: ``math`` a downstream math benchmark the evaluate stage scores by final answer;
#: ``choice`` a general multiple-choice benchmark (forgetting, drift);
#: ``heldout`` held-out reference solutions for the downstream NLL.
Role = Literal["training", "reference", "math", "choice", "heldout"]
#: The roles whose sets a dataset source (``DatasetSpec.source``) may name.
SOURCE_ROLES: tuple[Role, ...] = ("training", "reference")


@dataclass(frozen=True)
class NamedSet:
    """A named set: its role, its files by split (relative to the data directory), how its rows
    are read, and where on the hub it lives when it has a public copy there."""

    name: str
    role: Role
    paths: dict[str, str]  # split -> path relative to the data directory
    # A preset name or a FieldMap; None for a multiple-choice set (read by its ``layout``).
    fields: str | FieldMap | None = None
    layout: str | None = None  # multiple-choice item layout: arc, piqa, hellaswag, mmlu, agieval
    hub: str | None = None
    hub_config: str | None = None
    hub_splits: dict[str, str] | None = None  # our split -> the hub's split name
    note: str = ""

    @property
    def default_split(self) -> str:
        return next(iter(self.paths))

    @property
    def path(self) -> str:
        """The file or folder of the default split."""
        return self.paths[self.default_split]

    @property
    def preset(self) -> str:
        """The field preset of a set read as records by name."""
        assert isinstance(self.fields, str), f"{self.name}: no field preset"
        return self.fields


def _qwen(name: str) -> str:
    return f"qwen25math_eval/{name}/test.jsonl"


_GSM8K_TEST = "gsm8k/test.jsonl"
_MATH500 = "math500/test.jsonl"

_TRAINING = [
    NamedSet(
        "gsm8k",
        "training",
        {"train": "gsm8k/train.jsonl", "test": _GSM8K_TEST},
        "gsm8k",
        hub="openai/gsm8k",
        hub_config="main",
        note="grade-school math, CoT ending '#### N'",
    ),
    NamedSet(
        "math_train",
        "training",
        {"train": "math_train/train"},
        "math",
        hub="DigitalLearningGmbH/MATH-lighteval",
        note="MATH train, one JSON file per problem",
    ),
    NamedSet(
        "authors_rewrites",
        "training",
        {"train": "authors_examples/data.json"},
        "authors_rewrites",
        note="original work's rewritten examples",
    ),
]

_REFERENCE = [
    NamedSet(
        "math500",
        "reference",
        {"test": _MATH500},
        "math500",
        hub="HuggingFaceH4/MATH-500",
        note="MATH-500 eval split",
    ),
    NamedSet(
        "math_test5000",
        "reference",
        {"test": "math_test5000/test.jsonl"},
        "math",
        hub="DigitalLearningGmbH/MATH-lighteval",
        note="MATH full test (contains MATH-500: never train on it)",
    ),
    NamedSet(
        "amc23",
        "reference",
        {"test": "authors_examples/amc23_orca.jsonl"},
        "amc23",
        note="AMC23 (original work's file)",
    ),
    NamedSet(
        "aime24",
        "reference",
        {"test": _qwen("aime24")},
        "aime24",
        hub="HuggingFaceH4/aime_2024",
        hub_splits={"test": "train"},
    ),
    NamedSet(
        "amc23_qwen", "reference", {"test": _qwen("amc23")}, "amc23_qwen", note="answers only"
    ),
    NamedSet("minerva_math", "reference", {"test": _qwen("minerva_math")}, "math"),
    NamedSet(
        "sat_math", "reference", {"test": _qwen("sat_math")}, "sat_math", note="multiple choice"
    ),
    NamedSet(
        "mmlu_stem", "reference", {"test": _qwen("mmlu_stem")}, "mmlu_stem", note="multiple choice"
    ),
    NamedSet("asdiv", "reference", {"test": _qwen("asdiv")}, "asdiv", note="answers only"),
    NamedSet(
        "gsm8k_qwen", "reference", {"test": _qwen("gsm8k")}, "gsm8k", note="GSM8K test with idx"
    ),
]

# Downstream math benchmarks (arXiv 2602.11220): the gold answer is the answer field when the
# field map names one and the row has it, else the final answer of the solution.
_MATH = [
    NamedSet(
        "gsm8k",
        "math",
        {"test": _GSM8K_TEST},
        FieldMap(question="question", solution="answer", answer_format="gsm8k"),
    ),
    NamedSet(
        "math500",
        "math",
        {"test": _MATH500},
        FieldMap(id="unique_id", question="problem", answer="answer"),
    ),
    NamedSet(
        "amc23",
        "math",
        {"test": _qwen("amc23")},
        FieldMap(id="id", question="problem", answer="answer"),
    ),
    NamedSet(
        "aime24",
        "math",
        {"test": _qwen("aime24")},
        FieldMap(id="id", question="problem", answer="answer"),
    ),
    NamedSet(
        "minerva_math",
        "math",
        {"test": _qwen("minerva_math")},
        FieldMap(question="problem", solution="solution", answer_format="boxed"),
    ),
    NamedSet(
        "sat_math",
        "math",
        {"test": _qwen("sat_math")},
        FieldMap(id="id", question="question", answer="Answer", choices="options"),
    ),
    NamedSet(
        "agieval_math",
        "math",
        {"test": "agieval_v1/math.jsonl"},
        FieldMap(question="question", answer="answer"),
    ),
]

_CHOICE = [
    NamedSet("arc_easy", "choice", {"test": "arc/ARC-Easy-test.jsonl"}, layout="arc"),
    NamedSet("arc_challenge", "choice", {"test": "arc/ARC-Challenge-test.jsonl"}, layout="arc"),
    NamedSet("piqa", "choice", {"validation": "piqa"}, layout="piqa"),
    NamedSet(
        "hellaswag",
        "choice",
        {"validation": "hellaswag_text/hellaswag_val_full.txt.bz2"},
        layout="hellaswag",
    ),
    NamedSet("mmlu", "choice", {"test": "mmlu/test"}, layout="mmlu"),
    NamedSet("agieval", "choice", {"test": "agieval_v1"}, layout="agieval"),
]

# Held-out reference solutions, read with the preset training data of that kind is read with,
# so solutions look as they do in D. Their files are the math benchmarks' files (a run uploads
# one file per name for both uses).
_HELDOUT = [
    NamedSet("gsm8k", "heldout", {"test": _GSM8K_TEST}, "gsm8k"),
    NamedSet("math500", "heldout", {"test": _MATH500}, "math500"),
    NamedSet("minerva_math", "heldout", {"test": _qwen("minerva_math")}, "auto"),
]

#: Every named set, in the order ``patchgap data ls`` lists the sources.
REGISTRY: tuple[NamedSet, ...] = (*_TRAINING, *_REFERENCE, *_MATH, *_CHOICE, *_HELDOUT)


def named_sets(*roles: Role) -> dict[str, NamedSet]:
    """The named sets of ``roles`` by name (a name unique within them)."""
    out: dict[str, NamedSet] = {}
    for entry in REGISTRY:
        if entry.role in roles:
            assert entry.name not in out, f"{entry.name}: named twice in roles {roles}"
            out[entry.name] = entry
    return out


def named_set(name: str, *roles: Role, what: str = "named set") -> NamedSet:
    """The set called ``name`` among ``roles``; an unknown name is a one-line ConfigError."""
    known = named_sets(*roles)
    try:
        return known[name]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}; known: {sorted(known)}") from None


def named_set_path(name: str, split: str | None = None) -> Path | None:
    """The local file or folder of a data source set in the data directory, or None when
    absent."""
    entry = named_sets(*SOURCE_ROLES)[name]
    root = data_dir()
    if root is None:
        return None
    path = root / entry.paths[split or entry.default_split]
    return path if path.exists() else None
