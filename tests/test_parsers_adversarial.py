"""The built-in parsers and rewards are linear-time on text written to hurt them, and give the
same results as the regexes they replaced (which backtracked quadratically).

Every timing runs in-process (not through the reward worker), so the parser itself is
measured: each 100k-character adversarial completion must take under 1 s, and the time at
100k over the time at 25k must stay under 8 (linear is about 4, quadratic about 16).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

import pytest

from grouprl.rewards import answers, builtins, clinical, majority
from grouprl.rewards.scan import brace_pairs, quoted_spans, tag_spans

N = 100_000

# ---------------------------------------------------------------- adversarial texts

PIECES: dict[str, str] = {  # each repeated up to n characters
    "unclosed_boxed": "\\boxed{",
    "boxed_no_brace": "\\boxed ",
    "boxed_dollar": "\\boxed $",
    "boxed_spaces": "\\boxed     \t",
    "open_braces": "{",
    "close_braces": "}",
    "think_open": "<think>",
    "answer_open": "<answer>",
    "think_close": "</think>",
    "format_backtrack": "</think><answer></answer>x",
    "tag_opener": "<",
    "slash_tag": "< / ",
    "digits": "1",
    "digits_spaced": "1 ",
    "thousands": "1,000",
    "decimals": "1.",
    "fractions": "1/",
    "negatives": "-1",
    "whitespace": " ",
    "newlines": "\n",
    "dollars": "$",
    "letters": "A ",
    "option_letters": "option (",
    "straight_quotes": '"',
    "curly_quotes": "\u201c",
    "sentence_ends": ".",
    "conclusions": "the answer is ",
    "citations": "the patient has ",
    "rule_outs": "rule out x because ",
    "backslashes": "\\ ",
}


def _fill(piece: str, n: int) -> str:
    return (piece * (n // len(piece) + 1))[:n]


def adversarial(n: int) -> dict[str, str]:
    """About n characters of each attack, raw and inside well-formed tags (so that the
    parsers behind a tag check run too)."""
    texts: dict[str, str] = {}
    for name, piece in PIECES.items():
        body = _fill(piece, n)
        texts[name] = body
        texts[f"{name} in think"] = f"<think>{body}</think><answer>\\boxed{{B}}</answer>"
        texts[f"{name} in answer"] = f"<think>a</think><answer>{body}</answer>"
    half = n // 2
    texts["nested_50k"] = "\\boxed" + "{" * half + "}" * half
    texts["nested_unclosed"] = "\\boxed" + "{" * n
    texts["spaces_then_tag"] = "<" + " " * (n - 10) + "x"
    texts["option_spaces"] = "<think>option" + " " * n + "z</think><answer>\\boxed{A}</answer>"
    texts["dollar_wrapped"] = "$" * half + " 1 " + "$" * half
    texts["format_unterminated"] = "<think>" + _fill("</think><answer></answer>x", n)
    return texts


OPTIONS = {"A": "influenza", "B": "pneumonia", "C": "asthma", "D": "heart failure"}
ROW = {
    "answer": "B",
    "options": OPTIONS,
    "findings": ["fever", "productive cough", "crackles"],
    "key_findings": ["productive cough", "crackles"],
    "condition_findings": {"pneumonia": ["fever", "productive cough", "crackles"]},
    "nonspecific_findings": ["fatigue"],
}


def reward(fn: Callable, **params) -> Callable[[str], object]:
    """One completion through a built-in reward, with a full row of columns."""
    return lambda text: fn(["p"], [text], **{k: [v] for k, v in ROW.items()}, **params)


TARGETS: dict[str, Callable[[str], object]] = {
    "extract_boxed": answers.extract_boxed,
    "extract_answer": answers.extract_answer,
    "normalize_answer": answers.normalize_answer,
    "answer_tags": answers.answer_tags,
    "find_boxes": builtins.find_boxes,
    "think_answer": builtins.think_answer,
    "brace_pairs": brace_pairs,
    "quoted_spans": quoted_spans,
    "clinical_read": clinical._read,
    "choice_accuracy": reward(builtins.choice_accuracy),
    "format": reward(builtins.format_reward),
    "exact_match": reward(builtins.exact_match),
    "overlong_penalty": lambda t: builtins.overlong_penalty(["p"], [t], max_length=4096),
    "clinical_faithfulness": reward(clinical.clinical_faithfulness, gate="none"),
    "clinical_faithfulness_format": reward(clinical.clinical_faithfulness),
    "clinical_comprehensiveness": reward(clinical.clinical_comprehensiveness, gate="none"),
    "clinical_comprehensiveness_correct": reward(
        clinical.clinical_comprehensiveness, gate="correct"
    ),
    "mcq_faithfulness": reward(clinical.mcq_faithfulness, gate="none"),
    "mcq_comprehensiveness": reward(clinical.mcq_comprehensiveness, gate="none"),
    # one completion votes without math-verify: the parsing is what is timed
    "majority_vote_auto": lambda t: majority.MajorityVote()(["p"], [t]),
    "majority_vote_math": lambda t: majority.MajorityVote(mode="math")(["p"], [t]),
    "majority_vote_choice": lambda t: majority.MajorityVote(mode="choice")(["p"], [t]),
}


def seconds(fn: Callable[[str], object], text: str, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - t0)
    return best


BIG, SMALL = adversarial(N), adversarial(N // 4)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_adversarial_text_takes_under_a_second_and_grows_linearly(target):
    fn = TARGETS[target]
    times = {name: seconds(fn, text) for name, text in BIG.items()}
    slow = {name: t for name, t in times.items() if t >= 1.0}
    assert not slow, f"{target}: over 1 s on {slow}"
    # The worst cases again at a quarter of the length: quadratic would be ~16x slower at
    # 100k, linear ~4x. Only where 100k takes long enough to time; measured up to 3 times,
    # since other processes on the machine can slow one measurement but not all three.
    for name in sorted(times, key=times.get, reverse=True)[:2]:
        ratio = growth(fn, name)
        assert ratio is None or ratio < 8, f"{target} on {name!r}: {ratio:.1f}x from 25k to 100k"


def growth(fn: Callable[[str], object], name: str) -> float | None:
    """Time at 100k over time at 25k (best of 2 runs each); the lowest of up to 3 tries."""
    best = float("inf")
    for _ in range(3):
        t_big = seconds(fn, BIG[name], repeats=2)
        if t_big < 0.01:
            return None
        best = min(best, t_big / max(seconds(fn, SMALL[name], repeats=2), 1e-6))
        if best < 8:
            break
    return best


def test_math_accuracy_on_adversarial_text_is_bounded_by_its_deadline():
    """math-verify itself is not linear (seconds on some texts); the reward's deadline
    bounds it: the call comes back NaN, in time."""
    from grouprl.rewards import RewardSet

    text = _fill("1 ", N)
    with RewardSet([{"name": "math_accuracy", "timeout": 1.0}]) as rs:
        t0 = time.perf_counter()
        res = rs(["p"], [text], {"answer": ["1"]})
    assert time.perf_counter() - t0 < 3.0
    assert res.timeouts["math_accuracy"] == 1


def test_big_integers_vote_without_int_conversion():
    """int() refuses more than 4300 digits (and is quadratic); votes compare digit strings."""
    a, b = "0" + "7" * 5000, "7" * 5000
    vote = majority.MajorityVote(mode="math")
    assert vote(["p"] * 3, [f"\\boxed{{{a}}}", f"\\boxed{{{b}}}", "\\boxed{-0}"]) == [1, 1, 0]
    assert majority._integer_key("-0") == majority._integer_key("000") == "0"
    assert majority._integer_key("-007") == "-7" != majority._integer_key("7")


# ---------------------------------------------------------------- identical results

# The parsers as they were before the linear rewrite, to check that the new ones read small
# random texts the same way.
_OLD_BOXED = re.compile(r"\\boxed\b")
_OLD_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OLD_THINK_ANSWER = re.compile(r"^<think>.*?</think>\s*<answer>(.*?)</answer>$", re.DOTALL)
_OLD_TAG_SPACES = re.compile(r"<\s*(/?)\s*(think|answer)\s*>", re.IGNORECASE)
_OLD_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_OLD_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OLD_QUOTE = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def old_boxed_at(text: str, start: int) -> str | None:
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        if i == start:
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
    return None


def old_extract_boxed(text: str) -> str | None:
    for m in reversed(list(_OLD_BOXED.finditer(text))):
        content = old_boxed_at(text, m.end())
        if content is not None:
            return content
    return None


def old_extract_answer(text: str) -> str | None:
    found = old_extract_boxed(text)
    if found is None:
        tags = _OLD_ANSWER_TAG.findall(text)
        found = tags[-1] if tags else None
    if found is None:
        numbers = answers._NUMBER.findall(text)
        found = numbers[-1] if numbers else None
    if found is None:
        return None
    return found.strip() or None


def old_normalize_answer(ans: str) -> str:
    s = ans.strip()
    s = s.rstrip(".").strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    s = s.rstrip(".").strip()
    s = " ".join(s.split())
    return answers._THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)


def old_find_boxes(text: str) -> list[tuple[int, int, str | None]]:
    boxes = []
    start = text.find("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i].isspace():
            i += 1
        content, end = None, start + len("\\boxed")
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    content, end = text[i + 1 : j], j + 1
                    break
        boxes.append((start, end, content))
        start = text.find("\\boxed", end)
    return boxes


def old_think_answer(text: str) -> str | None:
    m = _OLD_THINK_ANSWER.search(text)
    return None if m is None else m.group(1)


def old_read(text: str) -> tuple[str, str] | None:
    text = clinical._BOX_SPACES.sub(r"\\boxed", _OLD_TAG_SPACES.sub(r"<\1\2>", text))
    think, answer = _OLD_THINK.search(text), _OLD_ANSWER.search(text)
    if think is None or answer is None:
        return None
    return think.group(1), answer.group(1)


def old_letter_mentioned(think: str, letter: str) -> bool:
    x = re.escape(letter.casefold())
    pattern = rf"\b(?:options?|choices?)\s*\(?\s*{x}\b|\(\s*{x}\s*\)"
    return re.search(pattern, think.casefold()) is not None


TOKENS = [
    "\\boxed", "\\boxed", "\\ boxed", "{", "{", "}", "}", " ", " ", "\t", "\n", "$", "$",
    "<think>", "</think>", "<answer>", "</answer>", "<ANSWER>", "< / think >", "< think>",
    "<", "/", ">", "A", "b", "1", "23", ",", ",000", ".", "-", "/", "x", '"', "\u201c",
    "\u201d", "option", "(", ")", "choice", "the answer is", "\u00a0",
]  # fmt: skip


def random_texts(count: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(TOKENS, k=rng.randint(0, 24))) for _ in range(count)]


@pytest.mark.parametrize(
    "new,old",
    [
        (answers.extract_boxed, old_extract_boxed),
        (answers.extract_answer, old_extract_answer),
        (answers.normalize_answer, old_normalize_answer),
        (answers.answer_tags, _OLD_ANSWER_TAG.findall),
        (builtins.find_boxes, old_find_boxes),
        (lambda t: builtins.think_answer(t.strip()), lambda t: old_think_answer(t.strip())),
        (
            lambda t: clinical._TAG_SPACES.sub(r"<\1\2>", t),
            lambda t: _OLD_TAG_SPACES.sub(r"<\1\2>", t),
        ),
        (
            lambda t: (lambda r: None if r is None else (r.think, r.answer))(clinical._read(t)),
            old_read,
        ),
        (quoted_spans, lambda t: [a or b for a, b in _OLD_QUOTE.findall(t)]),
        (
            lambda t: [clinical._letter_mentioned(t, x) for x in "AB"],
            lambda t: [old_letter_mentioned(t, x) for x in "AB"],
        ),
    ],
    ids=[
        "extract_boxed", "extract_answer", "normalize_answer", "answer_tags", "find_boxes",
        "think_answer", "tag_spaces", "clinical_read", "quoted_spans", "letter_mentioned",
    ],
)  # fmt: skip
def test_the_linear_parsers_read_random_texts_as_the_old_regexes_did(new, old):
    for text in random_texts():
        assert new(text) == old(text), repr(text)


def test_tag_spans_is_findall_and_brace_pairs_is_a_scan_from_each_brace():
    opener, closer = re.compile("<a>", re.IGNORECASE), re.compile("</a>", re.IGNORECASE)
    findall = re.compile("<a>(.*?)</a>", re.DOTALL | re.IGNORECASE).findall
    rng = random.Random(1)
    for _ in range(3000):
        text = "".join(rng.choices(["<a>", "</a>", "<A>", "x", "<", "a>", "{", "}"], k=20))
        assert [text[a:b] for a, b in tag_spans(text, opener, closer)] == findall(text)
        first = tag_spans(text, opener, closer, first=True)
        assert first == tag_spans(text, opener, closer)[:1]
        pairs = brace_pairs(text)
        for i, c in enumerate(text):
            if c != "{":
                continue
            depth, match = 0, None
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    match = j
                    break
            assert pairs.get(i) == match, (text, i)
