"""The reasoning check: a deterministic judge that a rewrite restates the reference's reasoning.

pi0 as its own judge only works when pi0 can judge; a 135M model says YES to almost nothing. This
check needs no model. A rewrite passes when

- it restates enough of the reference solution's intermediate results (GSM8K marks each step as
  ``<<48/2=24>>``: the results are the ``24``; MATH-style solutions state them as equations
  ``... = value``). The final answer is not an intermediate result: the answer check covers it;
- it is not much shorter than the reference (words, calculator annotations removed);
- it does not quote the question at length (the share of the question's word n-grams found in
  the rewrite);
- the arithmetic it writes out is right (``48 + 25 = 72`` is caught even though the answer is);
- it does not mention the rewriting task (the rewriting prompt forbids it: "the expert solution").

Numbers compare after normalisation: thousands separators, ``$``, ``%``, a leading sign and
trailing zeros of a decimal are dropped (``$1,200.50`` and ``1200.5`` agree), ``\\frac{3}{4}`` and
``3/4`` read as ``0.75``. Everything is pure Python; a check costs about a millisecond.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from pydantic import Field

from patchgap.answers import extract_answer
from patchgap.config import StrictModel

__all__ = [
    "ReasoningCheckConfig",
    "ReasoningVerdict",
    "arithmetic_errors",
    "check_reasoning",
    "intermediate_results",
    "length_ratio",
    "normalise_number",
    "numbers_in",
    "question_containment",
    "restated_share",
    "strip_calculator",
]

# Criteria a rewrite can fail, in the order they are checked (the gate report counts them).
FEW_RESULTS = "few_results"
TOO_SHORT = "too_short"
QUOTES_QUESTION = "quotes_question"
BAD_ARITHMETIC = "bad_arithmetic"
MENTIONS_REWRITE = "mentions_rewrite"
CRITERIA = (FEW_RESULTS, TOO_SHORT, QUOTES_QUESTION, BAD_ARITHMETIC, MENTIONS_REWRITE)


class ReasoningCheckConfig(StrictModel):
    """Thresholds of the reasoning check, chosen with benchmarks/judge_comparison.py on GSM8K
    train. There, faithful rewrites (the reference and paraphrases of it) restate every
    intermediate result, are at least 1.01 times the reference's length and repeat at most 0.62
    of the question's 6-grams; truncated ones (half the steps) are at most 0.68 times as long;
    an echoed question repeats all of them; a changed intermediate result leaves up to 0.75 of
    the results restated, which is why the arithmetic is checked as well."""

    min_restated: float = Field(
        0.75,
        ge=0,
        le=1,
        description="least share of the reference's intermediate results the rewrite restates",
    )
    min_length_ratio: float = Field(
        0.7, ge=0, description="least rewrite length / reference length, in words"
    )
    max_question_overlap: float = Field(
        0.8,
        ge=0,
        le=1,
        description="most share of the question's word n-grams the rewrite may repeat verbatim",
    )
    ngram: int = Field(6, ge=2, description="n of the word n-grams of the question overlap")
    check_arithmetic: bool = Field(
        True, description="reject a rewrite whose written-out arithmetic (a + b = c) is wrong"
    )
    banned_phrases: tuple[str, ...] = Field(
        ("expert solution", "original solution", "the expert"),
        description="phrases (case-insensitive) that give the rewriting away",
    )


@dataclass(frozen=True)
class ReasoningVerdict:
    """What the check measured on one rewrite and whether it passes.

    ``restated`` is None when the reference has no intermediate result (one-step problems): that
    criterion then holds vacuously. ``failed`` lists the criteria not met (empty: accepted).
    """

    restated: float | None
    length_ratio: float
    question_overlap: float
    wrong_equations: int
    failed: tuple[str, ...]

    @property
    def accepted(self) -> bool:
        return not self.failed

    @property
    def score(self) -> float:
        """A graded version of the verdict for ranking (AUC): the restated share, cut to the
        length ratio and by the other criteria (each failed one halves it)."""
        base = 1.0 if self.restated is None else self.restated
        base = min(base, self.length_ratio)
        others = [c for c in self.failed if c not in (FEW_RESULTS, TOO_SHORT)]
        return base * 0.5 ** len(others)


# ----------------------------------------------------------------------------- numbers

_CALC = re.compile(r"<<[^<>]*>>")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}")
# A number: thousands groups or plain digits, a decimal part, an optional a/b fraction part.
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*(?:{_NUM}))?(?![\w])")
_GSM8K_FINAL = re.compile(r"^\s*####.*$", re.MULTILINE)


def strip_calculator(solution: str) -> str:
    """The solution without GSM8K's calculator annotations.

    >>> strip_calculator("48/2 = <<48/2=24>>24 clips")
    '48/2 = 24 clips'
    """
    return _CALC.sub("", solution)


_ANSWER_LINE = re.compile(r"\s*####[^\n]*$", re.MULTILINE)


def neutral_solution(solution: str) -> str:
    """A reference solution without GSM8K's training format: calculator annotations and the
    ``#### N`` answer line removed, so that its NLL does not favour a model tuned on that
    format. Other text is left as written.

    >>> neutral_solution("48/2 = <<48/2=24>>24 clips. 48+24 = <<48+24=72>>72 in all.\\n#### 72")
    '48/2 = 24 clips. 48+24 = 72 in all.'
    """
    return _ANSWER_LINE.sub("", strip_calculator(solution)).strip()


def _to_fraction(text: str) -> Fraction | None:
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").lstrip("+-")
    percent = s.endswith("%")
    s = s.rstrip("%").rstrip(".")
    if not s:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = Fraction(Decimal(num)) / Fraction(Decimal(den))
        else:
            value = Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def normalise_number(text: str) -> str | None:
    """One canonical spelling of a number (its magnitude), or None when ``text`` is not one.

    >>> [normalise_number(s) for s in ("$1,200.50", "1200.5", "24.0", "-7", "3/4", "50%", "x")]
    ['1200.5', '1200.5', '24', '7', '0.75', '0.5', None]
    """
    value = _to_fraction(text)
    if value is None:
        return None
    return _canonical(value)


def _canonical(value: Fraction) -> str:
    value = abs(value)
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    d = Decimal(value.numerator) / Decimal(value.denominator)
    # A terminating decimal prints exactly; any other to 6 places (1/3 and 0.333333 agree).
    text = format(d if den == 1 else d.quantize(Decimal("0.000001")), "f")
    return text.rstrip("0").rstrip(".")


def numbers_in(text: str) -> set[str]:
    """Every number written in ``text``, normalised; a fraction ``a/b`` also gives a and b.

    >>> sorted(numbers_in(r"She pays $1,000 and \\frac{1}{2} of 3/4, so 24.0 dollars."))
    ['0.5', '0.75', '1', '1000', '2', '24', '3', '4']
    """
    out: set[str] = set()
    text = _FRAC.sub(lambda m: f" {m.group(1)}/{m.group(2)} ", text)
    for m in _NUMBER.finditer(text):
        token = m.group()
        parts = [token]
        if "/" in token:
            parts += token.split("/")
        for part in parts:
            norm = normalise_number(part)
            if norm is not None:
                out.add(norm)
    return out


# After "=": optional $ or \boxed{, then a number (a \frac or a plain/decimal/fraction number).
_EQ_VALUE = re.compile(
    rf"=\s*(?:\\\$|\$)?\s*(?:\\boxed\s*\{{\s*)?(?:\\\$|\$)?\s*"
    rf"(\\[dt]?frac\s*\{{\s*-?\d+\s*\}}\s*\{{\s*-?\d+\s*\}}|-?(?:{_NUM})(?:\s*/\s*(?:{_NUM}))?%?)"
    rf"(?![\w])"
)


def intermediate_results(solution: str, final_answer: str | None = None) -> list[str]:
    """The reference's intermediate results, normalised, distinct, in order of appearance.

    GSM8K's annotations ``<<expr=result>>`` give them when present; otherwise every number right
    after an ``=`` does. The final answer (given, or read from the solution) is left out.

    >>> intermediate_results("48/2 = <<48/2=24>>24 clips. 48+24 = <<48+24=72>>72 clips.\\n#### 72")
    ['24']
    >>> intermediate_results("So $x = 3$ and $y = \\\\frac{1}{2}$, thus $x + y = \\\\boxed{3.5}$.")
    ['3', '0.5']
    """
    final = final_answer if final_answer is not None else extract_answer(solution)
    final_norm = normalise_number(final) if final is not None else None
    annotations = _CALC.findall(solution)
    if annotations:
        values = [a[2:-2].rsplit("=", 1)[-1] for a in annotations if "=" in a]
    else:
        body = _GSM8K_FINAL.sub("", solution)
        values = [
            _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", v) for v in _EQ_VALUE.findall(body)
        ]
    out: list[str] = []
    for v in values:
        norm = normalise_number(v)
        if norm is not None and norm != final_norm and norm not in out:
            out.append(norm)
    return out


def restated_share(reference: str, rewrite: str, final_answer: str | None = None) -> float | None:
    """Share of the reference's intermediate results that appear as numbers in the rewrite;
    None when the reference has none.

    >>> ref = "48/2 = <<48/2=24>>24 clips in May, 48+24 = <<48+24=72>>72 in all.\\n#### 72"
    >>> restated_share(ref, "In May she sold half of 48, that is 24; in all 72."), restated_share(
    ...     ref, "The answer is 72.")
    (1.0, 0.0)
    """
    results = intermediate_results(reference, final_answer)
    if not results:
        return None
    have = numbers_in(strip_calculator(rewrite))
    return sum(1 for r in results if r in have) / len(results)


# ----------------------------------------------------------------------------- words

_WORD = re.compile(r"[a-z0-9]+(?:[.,'][a-z0-9]+)*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def length_ratio(reference: str, rewrite: str) -> float:
    """Words of the rewrite over words of the reference (annotations and ``####`` line removed).

    >>> length_ratio("One two three four.\\n#### 4", "One two.")
    0.5
    """
    ref = _words(_GSM8K_FINAL.sub("", strip_calculator(reference)))
    return len(_words(strip_calculator(rewrite))) / max(len(ref), 1)


def question_containment(question: str, rewrite: str, n: int = 6) -> float:
    """Share of the question's word n-grams that the rewrite repeats verbatim (0 for a question of
    fewer than n words).

    >>> q = "Natalia sold clips to 48 of her friends in April."
    >>> question_containment(q, q + " The answer is 72."), question_containment(q, "She sold 72.")
    (1.0, 0.0)
    """
    qw = _words(question)
    grams = {tuple(qw[i : i + n]) for i in range(len(qw) - n + 1)}
    if not grams:
        return 0.0
    rw = _words(rewrite)
    have = {tuple(rw[i : i + n]) for i in range(len(rw) - n + 1)}
    return len(grams & have) / len(grams)


# ----------------------------------------------------------------------------- arithmetic

# Characters written-out arithmetic is made of, read backwards from an "=" (left side) and
# forwards from it (right side).
_ARITH_CHARS = set("0123456789.,$ +-*/x×÷()%\u2212")
_LATEX_OPS = re.compile(r"\\(times|cdot|div)(?![A-Za-z])")
_LATEX_REPLACE = {"times": " × ", "cdot": " × ", "div": " ÷ "}
# A left side right after one of these words is part of a phrase ("twice 5 + 3 = 13").
_OPERATOR_WORDS = ("times", "twice", "thrice", "half", "by", "plus", "minus", "than")
# A tight fraction "2/3" (no spaces) is one number: "2000 / 2/3" is 2000 / (2/3).
_TOKEN = re.compile(rf"\s*(?:({_NUM})(?:/(\d+)(?![\d.]))?(%?)|([-+*/×÷x()\u2212]))")
_OPERATOR = re.compile(r"[-+*/×÷\u2212]|\sx\s")


def _tokens(expr: str, percent: bool) -> list[object] | None:
    """Numbers (Fractions) and operators; ``percent`` reads ``20%`` as 0.2, else as 20."""
    expr = expr.replace("$", "")
    pos, out = 0, []
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if m is None:
            return None
        if m.group(1) is not None:
            value = Fraction(Decimal(m.group(1).replace(",", "")))
            if m.group(2) is not None:
                if int(m.group(2)) == 0:
                    return None
                value /= int(m.group(2))
            out.append(value / 100 if m.group(3) and percent else value)
        else:
            op = m.group(4)
            # "x" multiplies only standing alone ("0.2 x 50"); "5x-28" holds a variable.
            if op == "x" and not (
                m.start(4) > 0
                and expr[m.start(4) - 1].isspace()
                and m.end(4) < len(expr)
                and expr[m.end(4)].isspace()
            ):
                return None
            out.append({"x": "*", "×": "*", "÷": "/", "\u2212": "-"}.get(op, op))
        pos = m.end()
    return out


def _evaluate(tokens: list[object]) -> Fraction | None:
    """Value of + - * / ( ) arithmetic over numbers, or None when it is not such an expression."""
    pos = 0

    def peek() -> object:
        return tokens[pos] if pos < len(tokens) else None

    def atom() -> Fraction:
        nonlocal pos
        tok = peek()
        if tok == "-":
            pos += 1
            return -atom()
        if tok == "(":
            pos += 1
            value = expr()
            if peek() != ")":
                raise ValueError("unbalanced")
            pos += 1
            return value
        if isinstance(tok, Fraction):
            pos += 1
            return tok
        raise ValueError("not a number")

    def term() -> Fraction:
        nonlocal pos
        value = atom()
        while peek() in ("*", "/"):
            op = peek()
            pos += 1
            rhs = atom()
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr() -> Fraction:
        nonlocal pos
        value = term()
        while peek() in ("+", "-"):
            op = peek()
            pos += 1
            rhs = term()
            value = value + rhs if op == "+" else value - rhs
        return value

    try:
        value = expr()
    except (ValueError, ZeroDivisionError):
        return None
    return value if pos == len(tokens) else None


def _values(expr: str) -> list[Fraction]:
    """The expression's value with percent signs read as /100 and as plain numbers (prose writes
    "100 - 5 = 95%"); empty when it is not arithmetic."""
    out = []
    for percent in (True, False):
        toks = _tokens(expr, percent)
        value = _evaluate(toks) if toks else None
        if value is not None and value not in out:
            out.append(value)
    return out


def _places(expr: str) -> int:
    return max((len(m.group(1)) for m in re.finditer(r"\.(\d+)", expr)), default=0)


def _arith_at(text: str, i: int) -> bool:
    # A comma belongs to arithmetic only as a thousands separator (1,000), not as punctuation.
    if text[i] == ",":
        return 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
    return text[i] in _ARITH_CHARS


def _agree(left: Fraction, right: Fraction, places: int) -> bool:
    left, right = abs(left), abs(right)
    if abs(left - right) <= Fraction(1, 2 * 10**places) + left * Fraction(1, 10**6):
        return True
    # Whole things: "100 / 6 = 16 bags" drops the remainder, "= 17 trips" rounds it up.
    return places == 0 and right.denominator == 1 and math.floor(left) <= right <= math.ceil(left)


def _sides(text: str, eq: int, end: int) -> tuple[str, str] | None:
    """The arithmetic run before the "=" at ``eq`` and after it (ending at ``end`` or the first
    character that is not arithmetic), or None when either side is not a phrase of its own."""
    start = eq
    while start > 0 and _arith_at(text, start - 1):
        start -= 1
    while start < eq and text[start] == " ":
        start += 1
    # The left side must start a phrase: "2x + 3" (a variable) and "twice 5 + 3" (a word that
    # belongs to the expression) are not arithmetic we can read.
    if start == eq or (start > 0 and text[start - 1] not in " \t\n(:;,"):
        return None
    if text[:start].rstrip().lower().endswith(_OPERATOR_WORDS):
        return None
    stop = eq + 1
    while stop < end and _arith_at(text, stop):
        stop += 1
    # "= 4S people" or "= 2x": the last number belongs to a word.
    if stop < end and text[stop].isalnum() and not text[stop - 1].isspace():
        return None
    rhs = text[eq + 1 : stop].rstrip(" .,(-+*/x×÷")
    if not rhs.strip():
        return None
    return text[start:eq], rhs


def arithmetic_errors(text: str) -> tuple[int, int]:
    """(wrong, checked): written-out equations ``a op b ... = c`` over plain numbers, and how many
    of them are wrong. A chain ``a = b + c = d`` checks each link; left sides that are not pure
    arithmetic (``2x + 3 = 9``, ``20% of 50 = 10``) are skipped, never counted wrong. The right
    side may round the left to the decimal places it writes (``10 / 3 = 3.33``; a whole number
    may drop the remainder) and may drop a sign ("a loss of 100 - 150 = 50").

    >>> arithmetic_errors("She sold 48/2 = 24 clips, then 48 + 25 = 72 in all. 2x + 3 = 9.")
    (1, 2)
    >>> arithmetic_errors("Each costs $10 / 3 = $3.33, 20% * 50 = 10, 8 * 2 + 4 = 16 + 4 = 20.")
    (0, 4)
    """
    text = _LATEX_OPS.sub(lambda m: _LATEX_REPLACE[m.group(1)], strip_calculator(text))
    text = _FRAC.sub(lambda m: f"({m.group(1)}/{m.group(2)})", text)
    equals = [m.start() for m in re.finditer(r"(?<![=<>!])=(?!=)", text)]
    wrong = checked = 0
    for i, eq in enumerate(equals):
        sides = _sides(text, eq, equals[i + 1] if i + 1 < len(equals) else len(text))
        if sides is None:
            continue
        lhs, rhs = sides
        # Something must be computed on the left, and it must not continue a phrase ("total
        # - 20 - 25 = 45" subtracts from a word).
        body = lhs.strip().lstrip("$")
        if not _OPERATOR.search(body[1:]) or body[0] in "+-*/×÷x\u2212":
            continue
        left, right = _values(lhs), _values(rhs)
        if not left or not right:
            continue
        checked += 1
        if not any(_agree(a, b, _places(rhs)) for a in left for b in right):
            wrong += 1
    return wrong, checked


# ----------------------------------------------------------------------------- the check


def check_reasoning(
    question: str,
    reference: str,
    rewrite: str,
    config: ReasoningCheckConfig | None = None,
    final_answer: str | None = None,
) -> ReasoningVerdict:
    """Measure a rewrite against its reference and decide.

    >>> q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips"
    >>> q += " in May. How many clips did Natalia sell altogether in April and May?"
    >>> ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n"
    >>> ref += "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\\n#### 72"
    >>> check_reasoning(q, ref, "In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 clips in "
    ...                 "April and May together. \\\\boxed{72}").failed
    ()
    >>> check_reasoning(q, ref, "The answer is 72.").failed
    ('few_results', 'too_short')
    """
    cfg = config or ReasoningCheckConfig()
    restated = restated_share(reference, rewrite, final_answer)
    ratio = length_ratio(reference, rewrite)
    overlap = question_containment(question, rewrite, cfg.ngram)
    wrong = arithmetic_errors(rewrite)[0] if cfg.check_arithmetic else 0
    lowered = rewrite.lower()
    failed = []
    if restated is not None and restated < cfg.min_restated:
        failed.append(FEW_RESULTS)
    if ratio < cfg.min_length_ratio:
        failed.append(TOO_SHORT)
    if overlap > cfg.max_question_overlap:
        failed.append(QUOTES_QUESTION)
    if wrong:
        failed.append(BAD_ARITHMETIC)
    if any(p.lower() in lowered for p in cfg.banned_phrases):
        failed.append(MENTIONS_REWRITE)
    return ReasoningVerdict(restated, ratio, overlap, wrong, tuple(failed))
