"""The reasoning check: intermediate results, number normalisation, length, question overlap,
written-out arithmetic, and the verdict on faithful and degenerate rewrites."""

from __future__ import annotations

import doctest

import pytest

from patchgap.reward import reasoning
from patchgap.reward.reasoning import (
    BAD_ARITHMETIC,
    FEW_RESULTS,
    MENTIONS_REWRITE,
    QUOTES_QUESTION,
    TOO_SHORT,
    ReasoningCheckConfig,
    arithmetic_errors,
    check_reasoning,
    intermediate_results,
    normalise_number,
    numbers_in,
    question_containment,
    restated_share,
)

QUESTION = (
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money "
    "she needs. Her parents decided to give her $15 for that purpose, and her grandparents twice "
    "as much as her parents. How much more money does Betty need to buy the wallet?"
)
REFERENCE = (
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
    "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
    "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"
)
FAITHFUL = (
    "Betty starts with half of the wallet's price: 100 / 2 = $50. Her grandparents give twice "
    "what her parents gave, 15 * 2 = $30. What is still missing is 100 - 50 - 30 - 15 = $5. "
    "The answer is \\boxed{5}."
)


def test_docstring_examples_hold() -> None:
    from patchgap.reward import scoring

    result = doctest.testmod(reasoning)
    assert result.attempted > 10 and result.failed == 0
    # The pure helpers of the scorer (calibration sample and threshold, buckets).
    result = doctest.testmod(scoring)
    assert result.attempted > 3 and result.failed == 0


def test_intermediate_results_come_from_gsm8k_annotations_without_the_final_answer() -> None:
    assert intermediate_results(REFERENCE) == ["50", "30"]
    # A one-step solution has no intermediate result besides its answer.
    assert intermediate_results("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == []


def test_intermediate_results_of_math_style_equations() -> None:
    sol = r"We get $2x = 10$, so $x = 5$. Then $y = \frac{3}{4}$ and $x + y = \boxed{5.75}$."
    assert intermediate_results(sol) == ["10", "5", "0.75"]


@pytest.mark.parametrize(
    ("text", "norm"),
    [("1,200", "1200"), ("$1,200.00", "1200"), ("24.0", "24"), ("0.50", "0.5"), (".5", "0.5")],
)
def test_numbers_normalise(text: str, norm: str) -> None:
    assert normalise_number(text) == norm


def test_restated_results_match_across_spellings() -> None:
    ref = "Cost 2 * 600 = <<2*600=1200>>1200 dollars, then 1200 / 4 = <<1200/4=300>>300.\n#### 300"
    assert restated_share(ref, "Two cost $1,200.00 in all, a quarter of that is 300.") == 1.0
    assert numbers_in("a total of $1,200") == {"1200"}
    assert restated_share("one step: 3 + 4 = <<3+4=7>>7\n#### 7", "7") is None


def test_question_overlap_catches_an_echo_not_a_restatement() -> None:
    echo = QUESTION + "\nThe answer is 5."
    assert question_containment(QUESTION, echo) == 1.0
    assert question_containment(QUESTION, FAITHFUL) < 0.2


def test_wrong_arithmetic_is_caught_and_prose_is_left_alone() -> None:
    assert arithmetic_errors("100 - 50 - 30 - 15 = 6") == (1, 1)
    assert (
        arithmetic_errors("He drives 2 * 2S = 4S miles; 20% of 50 = 10; twice 5 + 3 = 13.")[0] == 0
    )
    assert arithmetic_errors("10 / 3 = 3.33 and 7 / 2 = 3 whole boxes; 100 - 5 = 95%") == (0, 3)
    assert arithmetic_errors(r"$3 \times 4 = 12$ and $\frac{1}{2} + 1 = 1.5$") == (0, 2)
    assert arithmetic_errors("8 * 2 + 4 * 5 = 16 + 20 = 36") == (0, 2)


def test_a_faithful_rewrite_passes() -> None:
    verdict = check_reasoning(QUESTION, REFERENCE, FAITHFUL, final_answer="5")
    assert verdict.accepted and verdict.restated == 1.0 and verdict.wrong_equations == 0
    assert verdict.score == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("rewrite", "fails"),
    [
        ("The answer is 5.", {FEW_RESULTS, TOO_SHORT}),
        (QUESTION + "\nThe answer is \\boxed{5}.", {FEW_RESULTS, QUOTES_QUESTION}),
        (
            "Betty starts with 100 / 2 = $50 for the wallet she wants to buy.\n#### 5",
            {FEW_RESULTS, TOO_SHORT},
        ),
        (FAITHFUL.replace("$30", "$35").replace("- 30 -", "- 35 -"), {FEW_RESULTS, BAD_ARITHMETIC}),
        ("Following the expert solution: " + FAITHFUL, {MENTIONS_REWRITE}),
    ],
    ids=["answer_only", "echo", "truncated", "wrong_step", "mentions_expert"],
)
def test_degenerate_rewrites_fail_for_their_reason(rewrite: str, fails: set[str]) -> None:
    verdict = check_reasoning(QUESTION, REFERENCE, rewrite, final_answer="5")
    assert not verdict.accepted
    assert set(verdict.failed) == fails
    assert verdict.score < 1.0


def test_thresholds_are_settings() -> None:
    lenient = ReasoningCheckConfig(
        min_restated=0.0, min_length_ratio=0.0, max_question_overlap=1.0, check_arithmetic=False
    )
    assert check_reasoning(QUESTION, REFERENCE, "The answer is 5.", lenient).accepted
    with pytest.raises(ValueError):
        ReasoningCheckConfig(min_restated=1.5)
