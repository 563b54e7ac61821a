"""Answer extraction, option letters and equivalence, including the hard time limit."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from patchgap.answers import equivalent, extract_answer, extract_choice, reference_answer

# An answer sympy cannot finish (9^387420489 to the 9th power...): only the time limit stops it.
TOWER = r"The answer is $\boxed{9^{9^{9^{9}}}}$."


@pytest.fixture(scope="module")
def warm() -> None:
    """Start the math-verify helper once, so timings below measure the comparison only."""
    assert equivalent(r"\boxed{\frac{2}{4}}", "0.5")


# ----------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"first \boxed{3}, then finally \boxed{4}.", "4"),
        (r"\fbox{7} is boxed too", "7"),
        (r"nested: \boxed{\boxed{1}+1}", r"\boxed{1}+1"),
        (r"sets: \boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{3} then an unclosed \boxed{4", "3"),
        (r"\boxed{ \boxed{5} never closed", "5"),
        (r"the result is $\boxed 5$", "5"),
        (r"the result is \boxed 12.", "12"),
        (r"spaced \boxed {8}", "8"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        ("She pays 2 * 500 = 1,000 dollars.\n#### 1,000", "1000"),
        ("The loss is 5.\n#### -5", "-5"),
        ("After 3 days the total is $1,234.50.", "1234.50"),
        ("It drops to -3.", "-3"),
        ("pages 3-5", "5"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_boxed_wins_over_hashes_and_numbers() -> None:
    assert extract_answer("#### 3\nthen $\\boxed{4}$ and 5") == "4"


def test_extraction_is_linear_on_adversarial_text() -> None:
    # About 0.1 s each when linear; a quadratic scan of these would take minutes.
    texts = ["\\boxed{" * 20_000, "{" * 50_000, "1," * 50_000, "answer " * 20_000]
    start = time.perf_counter()
    for text in texts:
        extract_answer(text)
        extract_choice(text)
    assert time.perf_counter() - start < 2.0


def test_reference_answer_reads_gsm8k_and_math_solutions() -> None:
    assert reference_answer("12 + 3 = 15 apples.\n#### 1,000") == "1000"
    assert reference_answer(r"Hence $\boxed{\text{None}}$.") == r"\text{None}"


# ----------------------------------------------------------------------------- extract_choice


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{C}$", "C"),
        (r"$\boxed{(C)}$", "C"),
        (r"$\boxed{\text{C}}$", "C"),
        (r"$\boxed{\textbf{(B)}\ 8}$", "B"),
        (r"$\boxed{c}$", "C"),
        ("Comparing the options, the answer is (C).", "C"),
        ("Answer: D", "D"),
        ("**Answer:** B", "B"),
        ("The correct answer is option A.", "A"),
        ("The answer is (A). On reflection, the answer is (D)", "D"),
        ("C", "C"),
        ("(B)", "B"),
        ("B. Paris is the capital", "B"),
        ("A cat sat on the mat.", None),
        ("I think it is hard to say.", None),
        ("no choice at all", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_extract_choice_respects_labels() -> None:
    assert extract_choice(r"\boxed{E}", labels="ABCD") is None
    assert extract_choice(r"\boxed{E}", labels="ABCDE") == "E"
    assert extract_choice("The answer is 2", labels=["1", "2", "3"]) == "2"


# ----------------------------------------------------------------------------- equivalent


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac12"),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{2,1\}}", "{1,2}"),
        (r"\boxed{{1,2}}", r"\{2,1\}"),
        (r"\boxed{3, 1, 2}", "1, 2, 3"),
        (r"\boxed{(1, 2]}", "(1,2]"),
        (r"\boxed{[-\infty, 3)}", r"[-\infty,3)"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})"),
        (r"\boxed{x^2+1}", "1+x^2"),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
        (r"\boxed{50\%}", "50"),
        (r"\boxed{50\%}", "0.5"),
        (r"\boxed{50}", r"50\%"),
        ("#### 1,000", "1000"),
        (r"\boxed{1,000}", "1000"),
        (r"\boxed{1000}", "1,000"),
        (r"\boxed{27.0}", "27"),
        (r"\boxed{\$18}", "18"),
        ("She makes $18 every day.", "18"),
        (r"\boxed{18 \text{ dollars}}", "18"),
        (r"\boxed{18 dollars per hour}", "18"),
        (r"\boxed{5\text{ cm}}", "5"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{x = 2}", "2"),
        (r"\boxed{(B)}", "B"),
        (r"\boxed{\text{(B)}}", r"\text{(B)}"),
        ("The answer is (B).", "B"),
        ("B", "(B)"),
        (r"\boxed{\text{Tuesday}}", r"\text{Tuesday}"),
        (r"\boxed{tuesday}", "Tuesday"),
        (r"\boxed{\text{New  York}}", "new york"),
        (r"\boxed{5}", r"\boxed{5}"),
    ],
)
def test_equivalent_accepts(warm: None, prediction: str, gold: str) -> None:
    assert equivalent(prediction, gold)


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{12}", "13"),
        (r"\boxed{0.5}", "50"),  # no percent sign: 0.5 is not 50
        (r"\boxed{[1,2)}", "(1,2]"),
        (r"\boxed{\{1,2\}}", r"\{1,2,3\}"),
        (r"\boxed{2x}", "2"),
        (r"\boxed{5 xy}", "5"),
        (r"\boxed{(C)}", "B"),
        ("no letter here", "B"),
        (r"\boxed{yadseuT}", "Tuesday"),  # sympy would call this product of symbols equal
        (r"\boxed{Monday}", r"\text{Tuesday}"),
        ("no answer", "5"),
        (r"\boxed{5}", ""),
        ("", "5"),
    ],
)
def test_equivalent_rejects(warm: None, prediction: str, gold: str) -> None:
    assert not equivalent(prediction, gold)


def test_nested_boxes_are_rejected_at_once() -> None:
    closed = "\\boxed{" * 5000 + "1" + "}" * 5000
    unclosed = "\\boxed{" * 5000
    start = time.perf_counter()
    assert not equivalent(closed, "1")
    assert not equivalent(unclosed, "1")
    assert time.perf_counter() - start < 1.0


def _timed(prediction: str, gold: str, timeout_s: float) -> tuple[bool, float]:
    start = time.perf_counter()
    verdict = equivalent(prediction, gold, timeout_s=timeout_s)
    return verdict, time.perf_counter() - start


def test_time_limit_stops_a_runaway_comparison(warm: None) -> None:
    verdict, elapsed = _timed(TOWER, "1", 1.0)
    assert verdict is False
    assert elapsed < 2.5
    # The killed helper is replaced: the next comparison works normally.
    assert equivalent(r"\boxed{\frac{3}{6}}", "0.5")


def test_time_limit_works_off_the_main_thread(warm: None) -> None:
    assert equivalent(r"\boxed{\frac{3}{6}}", "0.5")  # leaves a started helper idle
    results: list[tuple[bool, float]] = []
    worker = threading.Thread(
        target=lambda: results.append(_timed(r"\boxed{10^{10^{10}}}", "1", 2.0))
    )
    worker.start()
    worker.join(timeout=30)
    assert len(results) == 1
    verdict, elapsed = results[0]
    assert verdict is False
    assert elapsed < 3.5


def test_threads_share_helpers_safely(warm: None) -> None:
    pairs = [(rf"\boxed{{\frac{{{k}}}{{{2 * k}}}}}", "0.5") for k in range(1, 4)]
    pairs += [(rf"\boxed{{\sqrt{{{k * k}}}}}", str(k + 1)) for k in range(2, 5)]
    out: dict[int, bool] = {}

    def run(i: int) -> None:
        out[i] = equivalent(*pairs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [out[i] for i in range(len(pairs))] == [True] * 3 + [False] * 3


def test_time_limit_works_in_a_daemonic_worker_process(warm: None) -> None:
    # Pool workers are daemonic (multiprocessing forbids them children); forked, they also
    # inherit this process's helper pipes, which they must not reuse.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        start = time.perf_counter()
        slow = pool.apply_async(equivalent, (TOWER, "1", 1.0))
        assert slow.get(timeout=60) is False
        assert pool.apply(equivalent, ("#### 1,000", "1000")) is True
        assert time.perf_counter() - start < 30
