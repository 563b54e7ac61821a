"""Every general-benchmark format in the data directory loads, with hand-checked gold options."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchgap.data import evalsets as bm

pytestmark = pytest.mark.integration


def _by_id(items: list[bm.MCItem], item_id: str) -> bm.MCItem:
    return next(i for i in items if i.id == item_id)


def test_arc_easy_and_challenge(data_dir: Path) -> None:
    easy = bm.load_mc_set("arc_easy", data_dir=data_dir)
    assert len(easy) == 2376
    first = _by_id(easy, "Mercury_417466")  # why photosynthesis underlies food webs
    assert (
        first.options[first.gold] == "Sunlight is the source of energy for nearly all ecosystems."
    )
    numeric = _by_id(easy, "NYSEDREGENTS_2015_8_28")  # labels 1-4, answerKey "2"
    assert numeric.options[numeric.gold] == "elements"
    five = _by_id(easy, "TIMSS_2003_4_pg35")  # five options A-E
    assert len(five.options) == 5 and five.options[five.gold] == "oxygen"
    challenge = bm.load_mc_set("arc_challenge", data_dir=data_dir)
    assert len(challenge) == 1172
    c = _by_id(challenge, "Mercury_7175875")  # faster rotation -> shorter days
    assert c.options[c.gold] == "Planetary days will become shorter."


def test_piqa(data_dir: Path) -> None:
    items = bm.load_mc_set("piqa", data_dir=data_dir)
    assert len(items) == 1838
    assert "ripped paper strips" in items[0].options[items[0].gold]  # not "ripped jeans"
    assert items[1].question == "dresser" and items[1].gold == 1


def test_hellaswag(data_dir: Path) -> None:
    items = bm.load_mc_set("hellaswag", data_dir=data_dir)
    assert len(items) == 10042
    assert items[0].question.startswith("Roof shingle removal: A man is sitting on a roof.")
    assert items[0].options[items[0].gold] == "starts pulling up roofing on a roof."
    assert items[1].options[items[1].gold] == "stands and lifts the weight over her head."
    assert all(len(i.options) == 4 for i in items)


def test_mmlu(data_dir: Path) -> None:
    items = bm.load_mc_set("mmlu", data_dir=data_dir)
    assert len(items) == 14042
    assert len({i.subject for i in items}) == 57
    alg = _by_id(items, "abstract_algebra-0")  # [Q(sqrt2, sqrt3, sqrt18) : Q] = 4
    assert alg.options[alg.gold] == "4"
    ana = _by_id(items, "anatomy-0")  # facial nerve at the stylomastoid foramen
    assert ana.options[ana.gold] == "paralysis of the facial muscles."


def test_agieval_english_mc(data_dir: Path) -> None:
    items = bm.load_mc_set("agieval", data_dir=data_dir)
    assert {i.subject for i in items} == set(bm.AGIEVAL_EN)
    sat = _by_id(items, "sat-math-0")  # (x - 1) / 3 = k, k = 3  ->  x = 10
    assert sat.options == ["2", "4", "9", "10"] and sat.options[sat.gold] == "10"
    assert _by_id(items, "lsat-lr-0").passage  # reading passages are kept


def test_downstream_math_sets(data_dir: Path) -> None:
    sizes = {"gsm8k": 1319, "math500": 500, "amc23": 40, "minerva_math": 272, "sat_math": 32}
    for name, n in sizes.items():
        items = bm.load_math_set(name, data_dir)
        assert len(items) == n, name
    assert bm.load_math_set("gsm8k", data_dir)[0].gold == "18"  # Janet's ducks
    assert bm.load_math_set("amc23", data_dir)[0].gold == "27"  # stored as 27.0
    sat = bm.load_math_set("sat_math", data_dir)[0]
    assert sat.gold == "A" and "A) $f(-6)=0$" in sat.question and sat.choice_labels
