"""The judge comparison's labelled set, built from real GSM8K train records: both classes, every
candidate passing the answer check, and the reasoning check telling them apart."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "judge_comparison.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("judge_comparison", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_labelled_set_has_both_classes_and_every_kind(bench, data_dir: Path) -> None:
    from patchgap.answers import equivalent

    cands, calibration = bench.build_labelled_set(data_dir / "gsm8k" / "train.jsonl", 30, 16)
    assert len(cands) >= 100
    kinds = Counter(c.kind for c in cands)
    assert set(kinds) == set(bench.GOOD_KINDS + bench.BAD_KINDS)
    assert len(set(kinds.values())) == 1  # every record gives one candidate of each kind
    labels = Counter(c.label for c in cands)
    assert labels[1] == 3 * 30 and labels[0] == 4 * 30
    # The answer check passes them all: only a judge can separate the classes.
    assert all(equivalent(c.text, c.answer) for c in cands)
    # Calibration references come from other records than the labelled ones.
    assert len(calibration) == 16
    assert not {q for q, _, _ in calibration} & {c.question for c in cands}
    # Built the same way twice.
    again, _ = bench.build_labelled_set(data_dir / "gsm8k" / "train.jsonl", 30, 16)
    assert [c.text for c in again] == [c.text for c in cands]


def test_reasoning_check_separates_the_labelled_set(bench, data_dir: Path) -> None:
    from patchgap.reward.reasoning import check_reasoning

    cands, _ = bench.build_labelled_set(data_dir / "gsm8k" / "train.jsonl", 30, 0)
    verdicts = [
        check_reasoning(c.question, c.reference, c.text, final_answer=c.answer) for c in cands
    ]
    labels = [c.label for c in cands]
    assert bench.auc([v.score for v in verdicts], labels) > 0.95
    good = [v.accepted for v, y in zip(verdicts, labels, strict=True) if y]
    bad = [v.accepted for v, y in zip(verdicts, labels, strict=True) if not y]
    assert sum(good) / len(good) > 0.9 and sum(bad) / len(bad) < 0.1


def test_auc_counts_ties_as_half(bench) -> None:
    assert bench.auc([1.0, 1.0], [1, 0]) == 0.5
    assert bench.auc([0.9, 0.1], [1, 0]) == 1.0
