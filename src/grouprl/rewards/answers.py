"""Pulling a final answer out of a completion, and normalizing it for comparison.

These are light string heuristics for maj@k voting and quick checks; exact math equivalence
(``1/2`` vs ``0.5``) is the job of the math reward (math-verify).
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_boxed", "normalize_answer"]

_BOXED = re.compile(r"\\boxed\b")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# An integer, a decimal, a fraction a/b, or a number with thousands commas, optionally
# negative. The look-behind keeps "x2" or "5-3" from yielding "2" or "-3".
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d+/\d+|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
_THOUSANDS = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?![\d,])")


def _boxed_at(text: str, start: int) -> str | None:
    """Content of the ``\\boxed`` that ends at ``start``, or None if it is cut off."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # "\boxed 5" form: one token, up to whitespace or a closing "$".
        if i == start:  # "\boxedx" is another command, not a boxed answer
            return None
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the completion was truncated inside the box


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (nested braces balanced), or None.

    ``"so \\boxed{\\frac{1}{2}}"`` -> ``"\\frac{1}{2}"``. The brace-less form ``\\boxed 5``
    is accepted too. A final box cut off by truncation is skipped in favour of an earlier
    complete one.
    """
    for m in reversed(list(_BOXED.finditer(text))):
        content = _boxed_at(text, m.end())
        if content is not None:
            return content
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, stripped, or None.

    Tried in order: the last ``\\boxed{...}``; the last ``<answer>...</answer>``; the last
    number in the text (``-3``, ``2.5``, ``1/2``, ``1,000``). An empty result counts as no
    answer (None).
    """
    found = extract_boxed(text)
    if found is None:
        tags = _ANSWER_TAG.findall(text)
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
    s = ans.strip()
    s = s.rstrip(".").strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    s = s.rstrip(".").strip()
    s = " ".join(s.split())
    return _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
