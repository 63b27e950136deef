"""Pulling a final answer out of a completion, and normalizing it for comparison.

These are light string heuristics for maj@k voting and quick checks; exact math equivalence
(``1/2`` vs ``0.5``) is the job of the math reward (math-verify).
"""

from __future__ import annotations

import re

from grouprl.rewards.scan import brace_pairs, tag_spans

__all__ = ["answer_tags", "extract_answer", "extract_boxed", "normalize_answer"]

_BOXED = re.compile(r"\\boxed\b")
_BLANKS = re.compile(r"[ \t]*")
_TOKEN = re.compile(r"[^\s$]+")
_ANSWER_OPEN = re.compile("<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile("</answer>", re.IGNORECASE)
# An integer, a decimal, a fraction a/b, or a number with thousands commas, optionally
# negative. The look-behind keeps "x2" or "5-3" from yielding "2" or "-3". Linear: a match
# can only start where the look-behind allows, once per run of digits.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d+/\d+|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
_THOUSANDS = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?![\d,])")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (nested braces balanced), or None.

    ``"so \\boxed{\\frac{1}{2}}"`` -> ``"\\frac{1}{2}"``. The brace-less form ``\\boxed 5``
    is accepted too. A final box cut off by truncation is skipped in favour of an earlier
    complete one. Linear in the text: the braces are paired once (`brace_pairs`), not
    rescanned from every box.
    """
    pairs: dict[int, int] | None = None
    for m in reversed(list(_BOXED.finditer(text))):
        start = m.end()
        i = _BLANKS.match(text, start).end()
        if i >= len(text):
            continue
        if text[i] != "{":
            # "\boxed 5" form: one token, up to whitespace or a closing "$"; "\boxedx" is
            # another command, not a boxed answer.
            token = _TOKEN.match(text, i) if i > start else None
            if token is not None:
                return token.group(0)
            continue
        if pairs is None:
            pairs = brace_pairs(text)
        j = pairs.get(i)
        if j is not None:
            return text[i + 1 : j]
    return None  # none, or every box unbalanced: cut off inside the box


def answer_tags(text: str) -> list[str]:
    """The contents of the ``<answer>...</answer>`` pairs (case-insensitive), left to right."""
    return [text[a:b] for a, b in tag_spans(text, _ANSWER_OPEN, _ANSWER_CLOSE)]


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, stripped, or None.

    Tried in order: the last ``\\boxed{...}``; the last ``<answer>...</answer>``; the last
    number in the text (``-3``, ``2.5``, ``1/2``, ``1,000``). An empty result counts as no
    answer (None).
    """
    found = extract_boxed(text)
    if found is None:
        tags = answer_tags(text)
        found = tags[-1] if tags else None
    if found is None:
        numbers = _NUMBER.findall(text)
        found = numbers[-1] if numbers else None
    if found is None:
        return None
    found = found.strip()
    return found or None


def normalize_answer(ans: str) -> str:
    """Canonical string form of an answer, for exact-match comparison and voting.

    Strips whitespace, surrounding ``$...$``, a trailing period; collapses inner whitespace to
    one space; drops thousands separators (``"1,000"`` -> ``"1000"``). Nothing else: ``"2.0"``
    stays ``"2.0"`` and ``"1/2"`` is not ``"0.5"``; a comma-grouped pair like ``"(1,234)"``
    is read as a thousands number.
    """
    s = ans.strip().rstrip(".").strip()
    # Peel "$...$" pairs by moving two ends inward: slicing once per pair would copy the
    # string each time (quadratic on "$$$...$$$").
    lo, hi = 0, len(s)
    while hi - lo >= 2 and s[lo] == "$" and s[hi - 1] == "$":
        lo, hi = lo + 1, hi - 1
        while lo < hi and s[lo].isspace():
            lo += 1
        while hi > lo and s[hi - 1].isspace():
            hi -= 1
    s = s[lo:hi].rstrip(".").strip()
    s = " ".join(s.split())
    return _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
