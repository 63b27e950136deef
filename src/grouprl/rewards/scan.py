"""Linear-time scanners shared by the reward parsers: brace pairs, tag pairs and quotes.

A policy can write anything, so a parser must stay fast on text written to hurt it: thousands
of unclosed ``\\boxed{`` or ``<answer>``, braces nested 50k deep. Each function here reads its
text once, left to right, with constant work per character: no regex with two unbounded
repeats side by side (which backtracks quadratically) and no scan restarted from every opener.
"""

from __future__ import annotations

import re

__all__ = ["brace_pairs", "quoted_spans", "tag_spans"]

_BRACE = re.compile(r"[{}]")
_QUOTE_OPEN = re.compile('["\u201c]')


def brace_pairs(text: str) -> dict[int, int]:
    """The position of each ``{`` that is closed -> the position of its matching ``}``.

    One pass with a stack. The match of the ``{`` at i is the first j > i where the count
    of ``{`` minus ``}`` over text[i:j+1] returns to 0, as a scan from i would find; an
    unclosed ``{`` is absent and a stray ``}`` is skipped.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        pos = m.start()
        if text[pos] == "{":
            stack.append(pos)
        elif stack:
            pairs[stack.pop()] = pos
    return pairs


def tag_spans(
    text: str, opener: re.Pattern[str], closer: re.Pattern[str], *, first: bool = False
) -> list[tuple[int, int]]:
    """(start, end) of what lies between each opener and the next closer, left to right.

    The spans ``re.findall(opener + "(.*?)" + closer, text, re.DOTALL)`` would return (with
    `first`, only the first), without its restart at every opener: once an opener has no
    closer after it, no later opener has one either, so the scan stops there.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    while (o := opener.search(text, pos)) is not None:
        c = closer.search(text, o.end())
        if c is None:
            break
        spans.append((o.end(), c.start()))
        if first:
            break
        pos = c.end()
    return spans


def quoted_spans(text: str) -> list[str]:
    """The spans quoted with ``"..."`` or curly ``\u201c...\u201d``, left to right.

    What ``re.findall(r'"([^"]*)"|\u201c([^\u201d]*)\u201d', text)`` finds (one string per
    match instead of a pair), without its rescan to the end from every unclosed quote.
    """
    spans: list[str] = []
    closed = {'"': True, "\u201c": True}  # False once a quote of that kind has no closer
    pos = 0
    while (o := _QUOTE_OPEN.search(text, pos)) is not None:
        start = o.start()
        kind = text[start]
        end = text.find('"' if kind == '"' else "\u201d", start + 1) if closed[kind] else -1
        if end == -1:
            closed[kind] = False
            pos = start + 1
            continue
        spans.append(text[start + 1 : end])
        pos = end + 1
    return spans
