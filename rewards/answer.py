"""Find the final ``\\boxed{...}`` answer and decide the cases that need no math-verify.

Everything here is pure, linear in the input length, and cheap: it runs in the
calling process, before an answer is sent to the math-verify worker.

Extraction (``extract_answer``): the answer region is the text after the first
``</think>`` (``"after_think"``: a response without ``</think>`` has no answer),
or the whole response (``"whole"``). The answer is the content of the *last*
``\\boxed`` in that region, which must be followed by ``{`` (whitespace allowed)
and closed by its matching ``}``; a last ``\\boxed{`` left unclosed is a missing
answer, not a reason to fall back to an earlier one. ``\\fbox`` and unbraced
``\\boxed 5`` are not recognised.

Fast decisions (``quick_verdict``), tried in order, each final:

* *numbers*: both sides are plain numbers -- integers (``1,234`` thousands
  separators allowed), decimals, ``a/b`` or ``\\frac{a}{b}`` with integer ``a``,
  ``b``, each with an optional sign -- read as exact fractions: the same value
  -> correct; two different integers, or values apart by more than ``1e-4``
  (absolute) and ``1e-4`` relative -> incorrect. Closer values (``0.333333`` for ``1/3``) go to
  math-verify, which rounds floats to 6 decimals, so this rule never disagrees
  with it;
* *text*: the reference is a word answer (letters, spaces, ``'`` and ``-`` only,
  with a word of 3+ letters, optionally in ``\\text{}``/``\\textbf{}``/
  ``\\mathrm{}``) -> equal iff the normalised texts match, case-insensitively.
  math-verify reads bare words as products of symbols (``Paris`` = ``a*i*p*r*s``),
  so it is never asked about them;
* *same text*: equal after removing whitespace, ``$``, ``\\left``/``\\right``,
  thin spaces and a trailing period, with ``\\dfrac``/``\\tfrac`` read as
  ``\\frac`` -> correct.

Anything else returns None: math-verify decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from rollout.format import THINK_CLOSE

_BOXED = "\\boxed"
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_NUMBER_RES = [
    re.compile(rf"(?P<sign>[+-]?)(?P<int>{_INT})(?:\.(?P<dec>\d+))?"),
    re.compile(r"(?P<sign>[+-]?)\.(?P<dec>\d+)"),
    re.compile(r"(?P<sign>[+-]?)(?P<num>\d+)\s*/\s*(?P<den>\d+)"),
    re.compile(r"(?P<sign>[+-]?)\\[dt]?frac\s*\{\s*(?P<num>\d+)\s*\}\s*\{\s*(?P<den>\d+)\s*\}"),
]
_INTEGER_RE = re.compile(rf"[+-]?{_INT}")
#: a quick "incorrect" needs the values this far apart, absolutely and relatively
NUMBER_TOLERANCE = 1e-4
_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|textrm|mbox)\s*\{(.*)\}$", re.S)
_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z '\-]*")
_LONG_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_NOISE_RE = re.compile(r"\s+|\$|\\left\b|\\right\b|\\[!,;:]|\\displaystyle\b")


@dataclass
class Extraction:
    """The final answer of a response, or why there is none.

    ``status`` is ``"ok"``, ``"no_think_close"`` (region ``after_think`` and no
    ``</think>``), ``"no_boxed"`` or ``"unclosed_boxed"``.
    """

    answer: str | None
    status: str


def answer_region(response: str, region: str) -> str | None:
    """The part of ``response`` the final answer is read from; None if there is none."""
    if region == "whole":
        return response
    if region != "after_think":
        raise ValueError(f"answer region must be 'after_think' or 'whole', got {region!r}")
    cut = response.find(THINK_CLOSE)
    return None if cut < 0 else response[cut + len(THINK_CLOSE):]


def extract_answer(response: str, region: str = "after_think") -> Extraction:
    """The content of the last ``\\boxed{...}`` of the answer region (see module doc)."""
    text = answer_region(response, region)
    if text is None:
        return Extraction(None, "no_think_close")
    pos = text.rfind(_BOXED)
    while pos >= 0:
        start = pos + len(_BOXED)
        brace = _skip_spaces(text, start)
        if brace < len(text) and text[brace] == "{":
            content = _braced(text, brace)
            return Extraction(content, "ok") if content is not None else Extraction(None, "unclosed_boxed")
        pos = text.rfind(_BOXED, 0, pos)  # "\boxedfoo" or "\boxed" at the end: not an answer, look further left
    return Extraction(None, "no_boxed")


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n":
        i += 1
    return i


def _braced(text: str, open_pos: int) -> str | None:
    """Content between ``text[open_pos] == '{'`` and its matching ``}``; None if unclosed.

    ``\\{`` and ``\\}`` are literal braces and do not count.
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
        i += 1
    return None


def _unwrap(s: str) -> str:
    s = s.strip().strip("$").strip()
    while (m := _WRAPPER_RE.match(s)) is not None:
        s = m.group(1).strip()
    return s


def as_number(s: str) -> Fraction | None:
    """The exact value of a plain number (see module doc), else None."""
    s = _unwrap(s)
    if len(s) > 64:
        return None
    for pattern in _NUMBER_RES:
        m = pattern.fullmatch(s)
        if m is None:
            continue
        groups = m.groupdict()
        if groups.get("den") is not None:
            if int(groups["den"]) == 0:
                return None
            value = Fraction(int(groups["num"]), int(groups["den"]))
        else:
            whole = int((groups.get("int") or "0").replace(",", ""))
            dec = groups.get("dec") or ""
            value = whole + (Fraction(int(dec), 10 ** len(dec)) if dec else 0)
        return -value if groups["sign"] == "-" else value
    return None


def as_text(s: str) -> str | None:
    """Lower-case, single-spaced words if ``s`` is a word answer (see module doc), else None."""
    s = _unwrap(s.strip().rstrip(".")).rstrip(".").strip()
    if len(s) > 200 or not _WORDS_RE.fullmatch(s) or not _LONG_WORD_RE.search(s):
        return None
    return " ".join(s.lower().split())


def squeeze(s: str) -> str:
    """``s`` without the LaTeX noise that never changes a value (see module doc)."""
    s = _NOISE_RE.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _unwrap(s).rstrip(".")


def quick_verdict(pred: str, gold: str) -> tuple[bool, str] | None:
    """``(correct, method)`` when no math-verify is needed, else None (see module doc)."""
    gold_value = as_number(gold)
    if gold_value is not None:
        pred_value = as_number(pred)
        if pred_value is not None:
            if pred_value == gold_value:
                return True, "number"
            if _INTEGER_RE.fullmatch(_unwrap(pred)) and _INTEGER_RE.fullmatch(_unwrap(gold)):
                return False, "number"  # math-verify compares two integers exactly too
            gap = abs(pred_value - gold_value)
            if gap > NUMBER_TOLERANCE and gap > NUMBER_TOLERANCE * max(abs(pred_value), abs(gold_value)):
                return False, "number"
            return None
    gold_text = as_text(gold)
    if gold_text is not None:
        pred_text = as_text(pred)
        return (pred_text == gold_text), "text"
    if squeeze(pred) == squeeze(gold):
        return True, "same_text"
    return None
