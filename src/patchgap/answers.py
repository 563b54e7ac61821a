"""Final answers: extract them from model or reference text and decide whether two agree."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

__all__ = [
    "DEFAULT_LABELS",
    "equivalent",
    "extract_answer",
    "extract_choice",
    "reference_answer",
]

log = logging.getLogger(__name__)

DEFAULT_LABELS = "ABCDEFGHIJ"

# The longest MATH-500 answer is 53 characters; anything far beyond that is not a final answer.
MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 32
# Importing math-verify (sympy, antlr) takes about a second; a loaded machine may need far more.
# This wait is not part of a call's timeout_s, which bounds the comparison itself.
_STARTUP_TIMEOUT_S = 120.0
# The helper's own SIGALRM fires this long after the caller's deadline (the caller kills first).
_HELPER_GRACE_S = 5.0

# ----------------------------------------------------------------------------- extraction

# One token pass: escaped braces and line breaks are skipped, so only grouping braces count.
_BOX_TOKENS = re.compile(r"\\\\|\\[{}]|\\(?:boxed|fbox)(?![A-Za-z])|[{}]")
_HASH_ANSWER = "####"
# Bounded alternatives only (at most three digits before a separator), so matching stays linear.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+"
)
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the ``\\boxed``/``\\fbox`` that closes last, or None.

    Nested boxes resolve to the outer one (it closes last); an unclosed box is ignored, so
    ``\\boxed{ \\boxed{5}`` gives ``5``. ``\\boxed 5`` (no braces) takes the next run of non-space
    characters.
    """
    n = len(text)
    stack: list[int] = []  # content start of an open box, or -1 for a plain group
    open_box_at = -1  # index of the "{" that opens the box just seen
    best: str | None = None
    best_end = -1
    for m in _BOX_TOKENS.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(m.end() if m.start() == open_box_at else -1)
        elif tok == "}":
            if stack:
                start = stack.pop()
                if start >= 0 and m.start() >= best_end:
                    best, best_end = text[start : m.start()], m.start()
        elif tok[1] in "bf":  # \boxed or \fbox
            j = m.end()
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == "{":
                open_box_at = j
                continue
            k = j
            while k < n and not text[k].isspace() and text[k] != "$":
                k += 1
            value = text[j:k].rstrip(".,;")
            if value and k >= best_end:
                best, best_end = value, k
    return best


def _clean_number(s: str) -> str:
    s = s.strip().strip("$").strip().rstrip(".")
    if _THOUSANDS.fullmatch(s):
        return s.replace(",", "")
    return s


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    return None if last is None else last.group().replace(",", "")


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``, or None when there is none.

    Order: the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces (LaTeX kept verbatim),
    then the line after GSM8K's last ``####`` (thousands separators removed), then the last number
    in the text.

    >>> extract_answer(r"so $x = \\boxed{\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_answer("She pays 2 * 500 = 1,000 dollars.\\n#### 1,000")
    '1000'
    """
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    at = text.rfind(_HASH_ANSWER)
    if at >= 0:
        line = text[at + len(_HASH_ANSWER) :].split("\n", 1)[0]
        value = _clean_number(line)
        if value:
            return value
    return _last_number(text)


def reference_answer(solution: str) -> str | None:
    """The gold answer of a reference solution (GSM8K ``#### 1,000`` gives ``1000``)."""
    return extract_answer(solution)


# ----------------------------------------------------------------------------- choices

_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|rm|bf)\s*\{([^{}]*)\}")


def _unwrap(s: str) -> str:
    """Replace ``\\text{x}``-style wrappers (without nested braces) by their content."""
    return _WRAPPERS.sub(r" \1 ", s)


def _label_pattern(labels: Sequence[str]) -> str:
    alts = sorted({str(x).strip() for x in labels if str(x).strip()}, key=len, reverse=True)
    return "|".join(re.escape(a) for a in alts)


def _choice_in_box(content: str, labels: Sequence[str], lab: str) -> str | None:
    s = _unwrap(content).replace("$", "").strip().strip("*").strip()
    m = re.match(rf"\(?({lab})\)?(?=$|[\s.:,)])", s)
    if m is None:  # models sometimes box a lowercase letter; inside a box that is unambiguous
        low = {str(x).strip().lower(): str(x).strip() for x in labels}
        m2 = re.fullmatch(r"\(?([a-z])\)?\.?", s)
        return low.get(m2.group(1)) if m2 else None
    return m.group(1)


def extract_choice(text: str, labels: Sequence[str] = DEFAULT_LABELS) -> str | None:
    """The option label a response chose, or None when it names none.

    Looks, in order, at the last box (``\\boxed{C}``, ``\\boxed{(C)}``, ``\\boxed{\\text{C}}``), the
    last "answer is (C)" / "Answer: C" phrase, and a bare label that makes up or opens the
    response (``C``, ``(C)``, ``C.``). Labels are case-sensitive outside a box.

    >>> extract_choice("Comparing the options, the answer is (B).")
    'B'
    """
    if not text:
        return None
    lab = _label_pattern(labels)
    if not lab:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        choice = _choice_in_box(boxed, labels, lab)
        if choice is not None:
            return choice
    # Non-overlapping character classes between quantifiers keep this linear on long inputs.
    phrase = re.compile(
        rf"(?i:answer)(?:\s+is\b)?[\s*:]*(?:(?i:option|choice)\s+)?\(?({lab})\)?(?![\w])"
    )
    last = None
    for last in phrase.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    if last is not None:
        return last.group(1)
    s = _unwrap(text).strip().strip("*$").strip()
    m = re.match(rf"\(({lab})\)|({lab})(?:\s*(?:[.):]|$))", s)
    if m is not None:
        return m.group(1) or m.group(2)
    return None


# ----------------------------------------------------------------------------- fast paths

_SPACING = re.compile(r"\\(?:left|right|quad|qquad)(?![A-Za-z])|\\[!,;: ]|\\?\$|~|\s+")
_UNIT_TAIL = re.compile(r"(?:\s+[A-Za-z]{3,}\.?)+\s*$")
_NUMERIC = re.compile(
    r"(?P<sign>[-+])?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<pct>\\?%)?(?:\^\{?\\circ\}?|°)?"
)
_WORDS = re.compile(r"[A-Za-z][A-Za-z' \-]*")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _as_number(s: str) -> tuple[Decimal, bool] | None:
    """(value, is_percent) when ``s`` is one plain number with optional ``$``, units and ``%``."""
    t = s.replace("\\$", " ").replace("\u2212", "-")
    t = _unwrap_units(t)
    t = _UNIT_TAIL.sub("", t)
    t = _SPACING.sub("", t).rstrip(".")
    m = _NUMERIC.fullmatch(t)
    if m is None:
        return None
    try:
        value = Decimal(m.group("num").replace(",", ""))
    except InvalidOperation:
        return None
    if m.group("sign") == "-":
        value = -value
    return value, m.group("pct") is not None


def _unwrap_units(s: str) -> str:
    # \text{ dollars} after a number is a unit; drop wrappers whose content is words only.
    return re.sub(
        r"\\(?:text|textrm|mathrm|mbox)\s*\{\s*([A-Za-z][A-Za-z .]*)\}",
        lambda m: " " + m.group(1) + " ",
        s,
    )


def _numbers_decide(pred: str, gold: str) -> bool | None:
    """True/False when both sides are plain numbers and the answer is certain; else None."""
    p, g = _as_number(pred), _as_number(gold)
    if p is None or g is None:
        return None
    (pv, pp), (gv, gp) = p, g
    # A percent sign reads both ways, as in math-verify: "50\%" matches 50 and 0.5.
    if pv == gv or (pp and pv / 100 == gv) or (gp and gv / 100 == pv):
        return True
    if not pp and not gp and pv == pv.to_integral_value() and gv == gv.to_integral_value():
        return False  # two different integers: nothing math-verify could add
    return None  # decimals: let math-verify apply its rounding rules


def _plain(s: str) -> str:
    """Presentation-free form: text wrappers, spacing, ``$`` and ``\\dfrac`` spellings removed."""
    t = _unwrap(s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _SPACING.sub("", t).rstrip(".")


def _words(answer: str, require_word: bool) -> str | None:
    """Casefolded, space-free words of a plain-text answer ("\\text{Tuesday}", "even"), else None.

    With ``require_word``, a bare answer needs a word of three or more letters: short bare
    letters ("x", "ab") are variables or products, not words. ``\\text{...}`` always counts.
    """
    explicit = "\\text" in answer or "\\mbox" in answer
    words = _unwrap(answer).replace("$", "").strip().rstrip(".")
    if not _WORDS.fullmatch(words):
        return None
    if require_word and not explicit:
        if max(len(w) for w in re.split(r"[\s'\-]+", words) if w) < 3:
            return None
    return re.sub(r"\s+", "", words).casefold()


def _choice_label(gold: str) -> str | None:
    s = _unwrap(gold).replace("$", "").strip()
    m = re.fullmatch(r"\(?([A-J])\)?", s)
    return m.group(1) if m else None


def _brace_depth(s: str) -> int:
    depth = worst = 0
    for ch in s:
        if ch == "{":
            depth += 1
            worst = max(worst, depth)
        elif ch == "}":
            depth -= 1
    return worst


def _too_wild(answer: str) -> bool:
    return len(answer) > MAX_ANSWER_CHARS or _brace_depth(answer) > MAX_BRACE_DEPTH


# ----------------------------------------------------------------------------- equivalence


def equivalent(prediction_text: str, gold: str, timeout_s: float = 2.0) -> bool:
    """Whether the final answer in ``prediction_text`` equals the gold answer ``gold``.

    The prediction's answer is found with :func:`extract_answer`. Gold option letters
    (``B``, ``(B)``) are compared with :func:`extract_choice`; plain-text golds
    (``\\text{Tuesday}``) case- and space-insensitively; numbers exactly, ignoring ``$``, units
    text, thousands separators and degree signs, with ``50\\%`` matching both 50 and 0.5. The rest
    (fractions, radicals, sets, intervals, tuples, expressions) goes to math-verify, bounded by
    ``timeout_s`` from any thread or process; a timeout, an oversized answer or a parse failure
    is False, never an exception. Raises RuntimeError only when the math-verify helper process
    cannot start at all (math-verify missing from the environment).

    >>> equivalent(r"The result is $\\boxed{\\frac{1}{2}}$.", "0.5")
    True
    """
    if not isinstance(gold, str):
        gold = str(gold)
    gold = gold.strip()
    if "\\boxed" in gold or "\\fbox" in gold:
        gold = extract_answer(gold) or ""
    if not gold or not prediction_text:
        return False
    letter = _choice_label(gold)
    if letter is not None:
        return extract_choice(prediction_text) == letter
    pred = extract_answer(prediction_text)
    if pred is None:
        return False
    if _plain(pred) == _plain(gold):
        return True
    if _too_wild(pred) or _too_wild(gold):
        return False
    words = _words(gold, require_word=True)
    if words is not None:
        # math-verify reads "Tuesday" as a product of symbols, so anagrams would match there.
        return _words(pred, require_word=False) == words
    decided = _numbers_decide(pred, gold)
    if decided is not None:
        return decided
    return _math_verify(_UNESCAPED_DOLLAR.sub("", pred), _UNESCAPED_DOLLAR.sub("", gold), timeout_s)


# ----------------------------------------------------------------------------- helper processes
#
# Why math-verify runs in helper processes: sympy can spend unbounded time, holding the GIL, on
# an answer such as 9^{9^{9^{9}}}. math-verify's own guard is signal.alarm, which works only in
# the main thread of the main interpreter, and no thread can interrupt GIL-holding C code. So a
# calling process keeps up to one helper per core, started with subprocess (which, unlike
# multiprocessing, also works inside daemonic worker processes), each importing math-verify once
# and answering one comparison at a time over a pipe. The caller waits on the pipe with a
# deadline and kills the helper when it passes, so a call gives up after timeout_s whatever
# thread or process it runs in; a replacement starts at once. The one-off helper start (about a
# second, more on a loaded machine) is not charged to timeout_s. Input guards (answer length,
# brace depth) reject absurd inputs such as 5,000 nested \boxed{ before any parsing. A helper
# also arms a per-request SIGALRM left at its default action, so it dies on its own should its
# caller be gone.


class _Helper:
    """One helper process that runs math-verify; it answers one request at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # The helper imports this module; make sure it finds the same copy as the caller.
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from patchgap.answers import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self._ready = False
        _live.add(self)

    def drop_pipes(self) -> None:
        """Close this process's copies of the pipes without touching the helper (after fork)."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def _read_line(self, timeout_s: float) -> bytes | None:
        """The next line from the helper, or None on timeout or when it died."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ask(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """math-verify's verdict, or None when the helper timed out or died."""
        if not self._ready:
            line = self._read_line(_STARTUP_TIMEOUT_S)
            if line != b"ready":
                self.kill()
                detail = "" if line is None else line.decode(errors="replace")
                raise RuntimeError(
                    "the math-verify helper process did not start"
                    + (f": {detail}" if detail else "")
                    + " (is math-verify installed in this Python environment?)"
                )
            self._ready = True
        assert self.proc.stdin is not None
        request = {"pred": pred, "gold": gold, "limit": timeout_s + _HELPER_GRACE_S}
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        line = self._read_line(timeout_s)
        if line not in (b"0", b"1"):
            return None
        return line == b"1"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def close(self) -> None:
        # Closing stdin ends the helper's read loop; kill only if it does not leave promptly.
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


def _helper_limit() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


# More helpers than cores only makes every comparison slower and pushes sound ones past their
# deadline; callers beyond the limit wait for a free helper (that wait is not part of timeout_s).
_MAX_HELPERS = _helper_limit()
_lock = threading.Lock()
_slots = threading.BoundedSemaphore(_MAX_HELPERS)
_idle: list[_Helper] = []
_live: weakref.WeakSet[_Helper] = weakref.WeakSet()


def _take_helper() -> _Helper:
    with _lock:
        while _idle:
            helper = _idle.pop()
            if helper.proc.poll() is None:
                return helper
            helper.kill()
    return _Helper()


def _return_helper(helper: _Helper) -> None:
    with _lock:
        if len(_idle) < _MAX_HELPERS:
            _idle.append(helper)
            return
    helper.close()


def _math_verify(pred: str, gold: str, timeout_s: float) -> bool:
    with _slots:
        helper = _take_helper()
        try:
            verdict = helper.ask(pred, gold, max(timeout_s, 0.01))
        except BaseException:
            helper.kill()
            raise
        if verdict is None:
            helper.kill()
            log.warning(
                "math-verify took over %.1f s on %.80r vs gold %.80r; counted as not equivalent",
                timeout_s,
                pred,
                gold,
            )
            # Start the replacement now so its import overlaps with the caller's next work.
            _return_helper(_Helper())
            return False
        _return_helper(helper)
        return verdict


def _close_helpers() -> None:
    with _lock:
        helpers = list(_idle)
        _idle.clear()
    for helper in helpers:
        helper.close()


def _forget_helpers_after_fork() -> None:
    # A forked child shares the parent's pipes; talking to those helpers would mix two streams.
    # Their pipe copies are closed too, or a helper would never see EOF when its owner closes.
    global _lock, _slots
    _lock = threading.Lock()
    _slots = threading.BoundedSemaphore(_MAX_HELPERS)
    for helper in list(_live):
        helper.drop_pipes()
    _live.clear()
    _idle.clear()


atexit.register(_close_helpers)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers_after_fork)


_WARM_UP = [
    (r"\frac{2}{4}", "0.5"),
    (r"\{2, 1\}", "(1, 2]"),
    (r"x = 2\sqrt{2}", r"\sqrt{8}"),
    (r"[-\infty, \pi)", "2x"),
]


def _verify_in_helper(pred: str, gold: str) -> bool:
    """math-verify on two bare answers; runs inside a helper process."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed:
        return False
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)  # type: ignore[arg-type]
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _serve() -> None:
    """Helper process main loop: one JSON request per line in, "1"/"0" per line out."""
    import signal

    # math-verify logs every parse failure and warns that its timeouts are off (ours are on).
    logging.disable(logging.WARNING)
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
    try:
        import math_verify  # noqa: F401
    except Exception as err:  # report why, then exit: the caller raises with this text
        out.write(f"error: {type(err).__name__}: {err}".replace("\n", " ").encode() + b"\n")
        out.flush()
        return
    # sympy builds caches and imports modules on first use; pay for that before "ready", so
    # the first real comparison is not charged for it.
    for pred, gold in _WARM_UP:
        _verify_in_helper(pred, gold)
    # SIGALRM at its default action ends the process even while C code holds the GIL.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            signal.setitimer(signal.ITIMER_REAL, float(request["limit"]))
            ok = _verify_in_helper(str(request["pred"]), str(request["gold"]))
        except Exception:
            ok = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(b"1\n" if ok else b"0\n")
        out.flush()
