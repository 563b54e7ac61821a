"""Benchmark loaders on small hand-written files in each format, seeded subsets, and answer
extraction for the generative multiple-choice form."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest

from patchgap.data import evalsets as bm
from patchgap.data.fields import FieldMap
from patchgap.data.registry import NamedSet, named_sets
from patchgap.errors import ConfigError, DataError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_arc_letter_and_number_labels(tmp_path: Path) -> None:
    p = _jsonl(
        tmp_path / "arc.jsonl",
        [
            {
                "id": "a",
                "question": "Q1",
                "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
                "answerKey": "C",
            },  # noqa: E501
            {
                "id": "b",
                "question": "Q2",
                "choices": {"text": ["p", "q"], "label": ["1", "2"]},
                "answerKey": "2",
            },  # noqa: E501
        ],
    )
    items = bm.load_arc(p)
    assert [(i.id, i.gold, i.options[i.gold]) for i in items] == [("a", 2, "z"), ("b", 1, "q")]
    assert items[0].gold_letter == "C"


def test_piqa_reads_labels_file(tmp_path: Path) -> None:
    _jsonl(tmp_path / "valid.jsonl", [{"goal": "g0", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "valid-labels.lst").write_text("1\n0\n")
    items = bm.load_piqa(tmp_path)
    assert [i.gold for i in items] == [1, 0]
    (tmp_path / "valid-labels.lst").write_text("1\n")
    with pytest.raises(DataError, match="1 labels for 2"):
        bm.load_piqa(tmp_path)


def test_hellaswag_six_lines_per_item_bz2(tmp_path: Path) -> None:
    text = "Ctx: A man [title] walks. he\n2\nsits.\nruns.\njumps.\nflies.\n"
    p = tmp_path / "h.txt.bz2"
    p.write_bytes(bz2.compress((text * 2).encode()))
    items = bm.load_hellaswag(p)
    assert len(items) == 2
    assert items[0].question == "Ctx: A man. walks. he"
    assert items[0].options[items[0].gold] == "jumps."
    bad = tmp_path / "bad.txt"
    bad.write_text(text + "extra\n")
    with pytest.raises(DataError, match="multiple of 6"):
        bm.load_hellaswag(bad)


def test_mmlu_csv_with_quoted_commas(tmp_path: Path) -> None:
    (tmp_path / "anatomy_test.csv").write_text(
        'question,choice0,choice1,choice2,choice3,answer\n"What, exactly?",a,"b, c",d,e,1\n'
    )
    (item,) = bm.load_mmlu(tmp_path)
    assert item.subject == "anatomy" and item.options[1] == "b, c" and item.gold == 1


def test_agieval_strips_option_labels_and_skips_multi_answer(tmp_path: Path) -> None:
    rows = [
        {"passage": "P", "question": "Q", "options": ["(A)1", "(B)2", "(C)3"], "label": "B"},
        {"passage": None, "question": "Q2", "options": ["(A)x", "(B)y"], "label": ["A", "B"]},
        {"passage": None, "question": "Q3", "options": ["(A)x", "(B)y"], "label": ["B"]},
    ]
    items = bm.load_agieval(_jsonl(tmp_path / "t.jsonl", rows))
    assert [(i.options, i.gold, i.passage) for i in items] == [
        (["1", "2", "3"], 1, "P"),
        (["x", "y"], 1, None),
    ]
    cloze = _jsonl(tmp_path / "c.jsonl", [{"question": "Q", "options": None, "label": None}])
    with pytest.raises(DataError, match="cloze"):
        bm.load_agieval(cloze)


def test_math_set_spec_maps_fields_and_extracts_answers(tmp_path: Path) -> None:
    p = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"Problem": "1+1?", "Answer": 2.0, "ID": 7},
            {"Problem": "half?", "Solution": "so \\boxed{\\frac{1}{2}}"},
        ],
    )
    fields = FieldMap(id="ID", question="Problem", answer="Answer", solution="Solution")
    items = bm.load_math_set(NamedSet("m", "math", {"test": str(p)}, fields))
    assert [(i.id, i.gold) for i in items] == [("7", "2"), ("m-2", "\\frac{1}{2}")]
    broken = _jsonl(tmp_path / "b.jsonl", [{"Problem": "no answer"}])
    with pytest.raises(DataError, match="b.jsonl:1"):
        only_answer = FieldMap(question="Problem", answer="Answer")
        bm.load_math_set(NamedSet("b", "math", {"test": str(broken)}, only_answer))


def test_custom_set_takes_the_training_field_map(tmp_path: Path) -> None:
    from patchgap.config import validate
    from patchgap.stages.evaluate import Config, _math_items

    # A word-problem set whose question is split across Body and Question, answers in lists.
    rows = [
        {"ID": "w1", "Body": "Ann has 3 pens and buys 4.", "Question": "How many?", "Answer": [7]},
        {"ID": "w2", "Body": "Bo had 9 pens.", "Question": "He lost 2. How many?", "Answer": [7]},
    ]
    words = _jsonl(tmp_path / "words.jsonl", rows)
    fields = {
        "id": "ID",
        "context": "Body",
        "question": "Question",
        "answer": "Answer",
        "lists": {"answer": "first"},
    }
    config = validate(Config, {"math": [{"name": "words", "path": str(words), "fields": fields}]})
    (item, _) = _math_items(config, None)["words"]
    assert (item.id, item.gold) == ("w1", "7")
    assert item.question == "Ann has 3 pens and buys 4. How many?"

    # Choices and an answer pattern: a multiple-choice item scored by its letter.
    mc = _jsonl(
        tmp_path / "mc.jsonl",
        [{"id": 1, "question": "2+2?", "options": ["3", "4", "5"], "label": "(B)"}],
    )
    pick = {"question": "question", "choices": "options", "answer": "label"}
    (item,) = bm.load_mapped_set(str(mc), bm.FieldMap(**pick, answer_pattern=r"\((\w)\)"))
    assert (item.question, item.gold, item.choice_labels) == ("2+2?\nA) 3\nB) 4\nC) 5", "B", "ABC")

    holes = _jsonl(tmp_path / "holes.jsonl", [*rows, {"ID": "w3", "Body": "x", "Answer": [1]}])
    with pytest.raises(DataError, match=r"holes.jsonl:3: no question.*must be complete"):
        bm.load_mapped_set(str(holes), bm.FieldMap(**fields))
    with pytest.raises(ConfigError, match="fields apply to a custom set"):
        validate(Config, {"math": [{"name": "gsm8k", "fields": "gsm8k"}]})


def test_subset_is_fixed_sorted_and_seed_dependent() -> None:
    a = bm.subset_indices(1000, 10, seed=1)
    assert a == bm.subset_indices(1000, 10, seed=1) == sorted(a)
    assert len(set(a)) == 10
    assert a != bm.subset_indices(1000, 10, seed=2)
    assert bm.subset_indices(5, None) == bm.subset_indices(5, 9) == [0, 1, 2, 3, 4]
    assert bm.take_subset(list("abcdef"), 3, seed=0) == [
        "abcdef"[i] for i in bm.subset_indices(6, 3, 0)
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step by step ... so the answer is \\boxed{C}.", "C"),
        ("\\boxed{(B)}", "B"),
        ("B", "B"),
        ("(D) because it is larger", "D"),
        ("I am not sure which one.", None),
        ("", None),
    ],
)
def test_choice_extraction_boxed_bare_and_none(text: str, expected: str | None) -> None:
    from patchgap.answers import extract_choice

    assert extract_choice(text, "ABCD") == expected


def test_rendered_task_yamls_point_at_data_dir(tmp_path: Path) -> None:
    out = bm.render_lm_eval_tasks(tmp_path / "tasks", data_dir=tmp_path / "data")
    arc = (out / "arc_easy.yaml").read_text()
    assert f'"{(tmp_path / "data").resolve()}/arc/ARC-Easy-test.jsonl"' in arc
    assert '"@DATA_DIR@' not in arc
    assert (out / "patchgap_docs.py").is_file()
    assert {p.stem for p in out.glob("*.yaml")} >= set(bm.LM_EVAL_TASKS)
    moved = bm.render_lm_eval_tasks(
        tmp_path / "t2", data_dir=tmp_path, paths={"piqa": str(tmp_path / "elsewhere")}
    )
    assert f'path: "{tmp_path / "elsewhere"}"' in (moved / "piqa.yaml").read_text()


def test_drift_questions_are_a_fixed_sample_spread_over_the_sets() -> None:
    def mc(prefix: str, n: int, passage: str | None = None) -> list[bm.MCItem]:
        return [
            bm.MCItem(f"{prefix}{i}", f"Q {prefix}{i}?", ["a", "b"], 0, passage) for i in range(n)
        ]

    sets = {"arc": mc("a", 30), "piqa": mc("p", 30), "agi": mc("g", 30, "A passage.")}
    qs = bm.general_questions(sets, 8, seed=1)
    assert [b for b, _, _ in qs].count("arc") == 3 and [b for b, _, _ in qs].count("agi") == 2
    assert qs == bm.general_questions(sets, 8, seed=1)
    assert qs != bm.general_questions(sets, 8, seed=2)
    agi = next(text for b, _, text in qs if b == "agi")
    assert agi.startswith("A passage.\n\nQ g")  # the passage comes before its question
    assert bm.general_questions({}, 5) == []


def test_heldout_set_reads_solutions_as_training_data(tmp_path: Path) -> None:
    p = _jsonl(
        tmp_path / "test.jsonl",
        [
            {"question": "1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"},
            {"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
        ],
    )
    recs = bm.load_heldout_set("gsm8k", p)
    assert [r.question for r in recs] == ["1 + 1?", "2 + 2?"]
    assert recs[0].solution == "1 + 1 = <<1+1=2>>2\n#### 2"  # as D holds it, unchanged
    with pytest.raises(ConfigError, match="held-out"):
        bm.load_heldout_set("nope", p)
    with pytest.raises(DataError, match="not found"):
        bm.load_heldout_set("gsm8k", tmp_path / "missing.jsonl")


def test_heldout_sets_are_the_math_sets_files() -> None:
    # benchmark_paths names one file for both uses (the run uploads it once, under that name)
    for name, entry in named_sets("heldout").items():
        assert named_sets("math")[name].path == entry.path, name


def test_drift_exclude_drops_questions_before_the_draw(tmp_path: Path) -> None:
    from patchgap.stages.evaluate.config import Config
    from patchgap.stages.evaluate.continuous import drift_questions

    math = "mmlu:high_school_mathematics"
    rows = [
        f"{subject}_test.csv" for subject in ("high_school_mathematics", "virology", "sociology")
    ]
    for name in rows:
        lines = "".join(f"Q{i} of {name}?,a,b,c,d,0\n" for i in range(6))
        (tmp_path / name).write_text("question,choice0,choice1,choice2,choice3,answer\n" + lines)
    config = {"general": ["mmlu"], "benchmark_paths": {"mmlu": str(tmp_path)}}
    every = drift_questions(Config.model_validate({**config, "drift": {"questions": 18}}), None)
    assert sum(f"mmlu:{i}".startswith(math) for _, i, _ in every) == 6
    kept = drift_questions(
        Config.model_validate({**config, "drift": {"questions": 12, "exclude": [math]}}), None
    )
    assert len(kept) == 12 and not any(f"mmlu:{i}".startswith(math) for _, i, _ in kept)
