r"""Clinical reasoning rewards: faithfulness and comprehensiveness (registered in `REWARDS`).

CRPO (Clinical-R1, arXiv 2512.00601) trains on three rule-based objectives: accuracy,
faithfulness and comprehensiveness. Its faithfulness and comprehensiveness rules are not
public (the released code only has accuracy, format and an English-ratio reward), so the
rules here are ours: documented, verifiable, and each one stated in its docstring.
Accuracy is the built-in ``choice_accuracy``.

Two families:

* ``clinical_faithfulness`` / ``clinical_comprehensiveness`` score the synthetic clinical
  task, whose rows carry a small knowledge base (columns ``answer``, ``options``,
  ``findings``, ``key_findings``, ``condition_findings``, ``nonspecific_findings``) and
  whose reasoning uses three sentence forms inside ``<think>``:
  ``the patient has {finding}``, ``rule out {condition} because ...`` and
  ``the most likely diagnosis is {condition}``.
* ``mcq_faithfulness`` / ``mcq_comprehensiveness`` score real multiple-choice questions
  (MedQA, MedMCQA, MedXpertQA) that have only ``options`` (letter -> text) and the prompt.

Reading a completion (all four rewards):

* ``<think>...</think>`` and ``<answer>...</answer>`` are taken as the first of each
  pair; spaces inside a tag (``< / think >``) and between ``\`` and ``boxed`` are
  tolerated, as a word-level tokenizer's decode may write them. A missing pair scores 0.
* Sentences of the reasoning are split at ``.`` (not between two digits, so "38.5"
  stays whole), ``!``, ``?``, ``;`` and newlines. Phrases are compared after
  normalization: casefolded, every run of characters other than letters and digits
  turned into one space, so "st-elevation", "st - elevation" and "ST elevation" match.
* The boxed letter is read only when the completion holds exactly one ``\boxed{...}``,
  inside ``<answer>``, holding a single letter (case-insensitive).

Gate (parameter ``gate`` of every reward here), after GDPO's advice to condition easy
rewards on the hard one (arXiv 2601.05242): ``"format"`` (default) pays only when the
built-in ``format`` rule holds, i.e. the stripped completion matches
``^<think>.*?</think>\s*<answer>(.*?)</answer>$`` (strictly: no spaces inside tags);
``"correct"`` pays only when the boxed letter equals the gold ``answer`` (the
``choice_accuracy`` value is 1; a row without a letter gold then gives None);
``"none"`` always pays. A gated-out completion scores 0.0.

A row that lacks a needed column (absent, None, or of the wrong type) gives None, so a
dataset mixing the synthetic task with real questions can use both families at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from grouprl.rewards.base import REWARDS, completion_text
from grouprl.rewards.builtins import choice_accuracy, find_boxes, format_reward
from grouprl.rewards.scan import quoted_spans, tag_spans

GATES = ("none", "format", "correct")
FAITHFULNESS_CHECKS = ("no_invented", "matches_box", "consistent")

CITE = "the patient has"
RULE_OUT = "rule out"
CONCLUDE = "the most likely diagnosis is"

# "<\s*(/?)\s*name" would try every split of a long run of spaces between its two \s*
# (quadratic); with the "/" and its spaces optional together, a run is read one way only.
_TAG_SPACES = re.compile(r"<\s*(?:(/)\s*)?(think|answer)\s*>", re.IGNORECASE)
_BOX_SPACES = re.compile(r"\\\s+boxed")
_TAGS = {
    name: (re.compile(f"<{name}>", re.IGNORECASE), re.compile(f"</{name}>", re.IGNORECASE))
    for name in ("think", "answer")
}
_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[!?;\n]")
_WORD = re.compile(r"[^\W_]+")
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")
_MCQ_CONCLUSION = re.compile(
    r"\b(?:answer|diagnosis)\s+(?:is|would be|should be)\b\s*:?", re.IGNORECASE
)


# ---------------------------------------------------------------- reading a completion


def norm(text: str) -> str:
    """Casefold and keep only runs of letters and digits, joined by one space."""
    return " ".join(_WORD.findall(text.casefold()))


def _contains(haystack: str, needle: str) -> bool:
    """Whether normalized `needle` occurs in normalized `haystack` as whole words."""
    return bool(needle) and f" {needle} " in f" {haystack} "


@dataclass
class _Trace:
    think: str  # the raw reasoning between the think tags
    answer: str  # the raw text between the answer tags
    letter: str | None  # the boxed letter (upper case), when there is exactly one valid box

    def sentences(self) -> list[str]:
        """The reasoning's sentences, raw (stripped, non-empty)."""
        return [s.strip() for s in _SENTENCE_END.split(self.think) if s.strip()]


def _first_pair(text: str, name: str) -> str | None:
    """What ``<name>(.*?)</name>`` (DOTALL, case-insensitive) finds first, in one pass."""
    spans = tag_spans(text, *_TAGS[name], first=True)
    return text[spans[0][0] : spans[0][1]] if spans else None


def _read(completion: Any) -> _Trace | None:
    """The reasoning, answer and boxed letter of a completion; None if a tag pair is missing."""
    text = _BOX_SPACES.sub(r"\\boxed", _TAG_SPACES.sub(r"<\1\2>", completion_text(completion)))
    think, answer = _first_pair(text, "think"), _first_pair(text, "answer")
    if think is None or answer is None:
        return None
    return _Trace(think, answer, _boxed_letter(text, answer))


def _boxed_letter(text: str, answer: str) -> str | None:
    boxes = find_boxes(text)
    if len(boxes) != 1 or len(find_boxes(answer)) != 1 or boxes[0][2] is None:
        return None
    content = boxes[0][2].strip().upper()
    return content if len(content) == 1 and "A" <= content <= "Z" else None


def _gate(gate: str, completion: Any, gold: Any) -> bool | None:
    """Whether the gate lets the completion be paid; None when "correct" has no letter gold."""
    if gate == "none":
        return True
    if gate == "format":
        return bool(format_reward([None], [completion])[0])  # 0.0, 1.0 or 1.5
    value = choice_accuracy([None], [completion], answer=[gold])[0]
    return None if value is None else value == 1.0


def _check_gate(gate: str) -> None:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}; got {gate!r}")


def _column(values: list | None, i: int) -> Any:
    return None if values is None else values[i]


def _str_list(value: Any) -> list[str] | None:
    """A list (or tuple) of strings, else None."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return list(value)


def _options(value: Any) -> dict[str, str] | None:
    """letter -> text with upper-case keys; None values (parquet struct padding) dropped."""
    if not isinstance(value, Mapping):
        return None
    out = {}
    for k, v in value.items():
        if v is None:
            continue
        if not isinstance(k, str) or not isinstance(v, str):
            return None
        out[k.strip().upper()] = v
    return out or None


def _condition_findings(value: Any) -> dict[str, set[str]] | None:
    if not isinstance(value, Mapping):
        return None
    out: dict[str, set[str]] = {}
    for k, v in value.items():
        items = [] if v is None else _str_list(v)
        if not isinstance(k, str) or items is None:
            return None
        out[norm(k)] = {norm(f) for f in items}
    return out


def _after(sentence: str, prefix: str) -> str | None:
    """The normalized rest of a normalized sentence starting with `prefix`, else None."""
    if sentence == prefix:
        return ""
    return sentence[len(prefix) + 1 :] if sentence.startswith(prefix + " ") else None


@dataclass
class _Claims:
    """What the synthetic grammar's sentences state, all normalized."""

    cited: set[str]  # findings after "the patient has"
    ruled_out: set[str]  # conditions after "rule out", up to "because"
    conclusions: list[str]  # conditions after "the most likely diagnosis is", in order


def _claims(trace: _Trace) -> _Claims:
    claims = _Claims(set(), set(), [])
    for raw in trace.sentences():
        s = norm(raw)
        if (rest := _after(s, CITE)) is not None:
            if rest:
                claims.cited.add(rest)
        elif (rest := _after(s, RULE_OUT)) is not None:
            if condition := _before_because(rest):
                claims.ruled_out.add(condition)
        elif (rest := _after(s, CONCLUDE)) is not None:
            claims.conclusions.append(_before_because(rest))
    return claims


def _before_because(rest: str) -> str:
    return f" {rest} ".split(" because ", 1)[0].strip()


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


# ---------------------------------------------------------------- synthetic clinical task


def _gated_trace(gate: str, completion: Any, gold: Any) -> tuple[Any, float | None]:
    """(the parsed trace, None) when the gate pays; else (None, what to score): None when
    the gate cannot decide (no gold for gate="correct"), 0.0 when it refuses or the tags
    are missing."""
    paid = _gate(gate, completion, gold)
    if paid is None:
        return None, None
    trace = _read(completion)
    if not paid or trace is None:
        return None, 0.0
    return trace, None


@REWARDS.register("clinical_faithfulness")
def clinical_faithfulness(
    prompts: list,
    completions: list,
    answer: list | None = None,
    options: list | None = None,
    findings: list | None = None,
    condition_findings: list | None = None,
    nonspecific_findings: list | None = None,
    *,
    gate: str = "format",
    checks: tuple[str, ...] | list[str] = FAITHFULNESS_CHECKS,
    **kw: Any,
) -> list[float | None]:
    r"""Faithfulness of a clinical reasoning trace to the vignette and to its own answer (ours).

    The reward is the mean of the `checks` (default all three), each in [0, 1]; a subset,
    e.g. ``checks=["no_invented"]`` under an alias, monitors one check alone:
      (a) ``no_invented``: 1 if every finding cited as "the patient has {finding}" is in
          `findings`, else 0 (all or nothing: one invented finding is a hallucination
          however much else is right); 1 when nothing is cited (citing nothing is
          scored by clinical_comprehensiveness instead);
      (b) ``matches_box``: 1 if there is exactly one sentence
          "the most likely diagnosis is {condition}", {condition} is the text of option
          L in `options`, and the single ``\boxed{}`` holds L; else 0 (no conclusion,
          several conclusions, a condition that is no option, no box or several boxes);
      (c) ``consistent``: the share of the cited findings present in `findings` that are
          findings of the concluded condition (`condition_findings[condition]`) or in
          `nonspecific_findings`; 1 when no present finding is cited. Without exactly
          one conclusion the concluded condition has no findings, so only nonspecific
          findings count as consistent.
    Missing <think> or <answer> tags give 0.0; so does a completion the gate refuses
    (module docstring). Needs `options`, `findings` and `condition_findings`
    (`nonspecific_findings` absent or None means none; `answer` only for
    gate="correct"); a row without them gives None.
    """
    _check_gate(gate)
    checks = (checks,) if isinstance(checks, str) else tuple(checks)
    if not checks or set(checks) - set(FAITHFULNESS_CHECKS):
        raise ValueError(
            f"checks must be a non-empty subset of {', '.join(FAITHFULNESS_CHECKS)}; "
            f"got {list(checks)}"
        )
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        opts = _options(_column(options, i))
        present = _str_list(_column(findings, i))
        by_condition = _condition_findings(_column(condition_findings, i))
        raw_nonspecific = _column(nonspecific_findings, i)
        nonspecific = [] if raw_nonspecific is None else _str_list(raw_nonspecific)
        if opts is None or present is None or by_condition is None or nonspecific is None:
            out.append(None)
            continue
        trace, refused = _gated_trace(gate, completion, _column(answer, i))
        if trace is None:
            out.append(refused)
            continue
        claims = _claims(trace)
        present_n = {norm(f) for f in present}

        invented = claims.cited - present_n
        no_invented = float(not invented)  # "every cited finding is present": all or nothing

        concluded = claims.conclusions[0] if len(claims.conclusions) == 1 else None
        letters = [k for k, text in opts.items() if norm(text) == concluded]
        matches_box = float(len(letters) == 1 and trace.letter == letters[0])

        cited_present = claims.cited & present_n
        allowed = by_condition.get(concluded, set()) if concluded is not None else set()
        allowed = allowed | {norm(f) for f in nonspecific}
        consistent = _share(len(cited_present & allowed), len(cited_present))

        values = {"no_invented": no_invented, "matches_box": matches_box, "consistent": consistent}
        out.append(sum(values[c] for c in checks) / len(checks))
    return out


@REWARDS.register("clinical_comprehensiveness")
def clinical_comprehensiveness(
    prompts: list,
    completions: list,
    answer: list | None = None,
    options: list | None = None,
    key_findings: list | None = None,
    findings: list | None = None,
    *,
    w_key: float = 0.5,
    w_rule: float = 0.5,
    gate: str = "format",
    zero_if_invented: bool = False,
    **kw: Any,
) -> list[float | None]:
    r"""How much of the differential a clinical reasoning trace covers (ours).

    Rule: (w_key * K + w_rule * R) / (w_key + w_rule), where
      K = the share of the distinct `key_findings` (the true condition's key findings
          present in the vignette) cited as "the patient has {finding}"; 1 if there are none;
      R = the share of the options other than the gold `answer` whose condition is
          ruled out by a sentence "rule out {condition}" (optionally followed by
          "because ..."); 1 if there are none.
    The weights (defaults 0.5 and 0.5) must be >= 0 with a positive sum; dividing by the
    sum keeps the value in [0, 1]. With ``zero_if_invented=True`` a trace that cites a
    finding absent from `findings` scores 0: coverage is paid only on top of faithful
    citations (GDPO's advice to condition the easier reward on the harder one); without
    it, citing every key finding of the concluded condition, present or not, pays.
    Missing <think> or <answer> tags give 0.0; so does a completion the gate refuses
    (module docstring). Needs `answer` (a letter among the options), `options` and
    `key_findings` (and `findings` with zero_if_invented); a row without them gives None.
    """
    _check_gate(gate)
    if w_key < 0 or w_rule < 0 or w_key + w_rule <= 0:
        raise ValueError(
            f"w_key and w_rule must be >= 0 with a positive sum; got {w_key}, {w_rule}"
        )
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        opts = _options(_column(options, i))
        key = _str_list(_column(key_findings, i))
        gold = _column(answer, i)
        gold = gold.strip().upper() if isinstance(gold, str) else None
        if opts is None or key is None or gold not in opts:
            out.append(None)
            continue
        trace, refused = _gated_trace(gate, completion, gold)  # gold is a letter: never None
        if trace is None:
            out.append(refused)
            continue
        claims = _claims(trace)
        if zero_if_invented:
            present = _str_list(_column(findings, i))
            if present is None:
                out.append(None)
                continue
            if claims.cited - {norm(f) for f in present}:
                out.append(0.0)
                continue
        key_n = {norm(f) for f in key} - {""}
        key_share = _share(len(key_n & claims.cited), len(key_n))
        others = [norm(text) for letter, text in opts.items() if letter != gold]
        rule_share = _share(sum(o in claims.ruled_out for o in others), len(others))
        out.append((w_key * key_share + w_rule * rule_share) / (w_key + w_rule))
    return out


# ---------------------------------------------------------------- real multiple-choice questions


def _prompt_text(prompt: Any) -> str:
    """A prompt's text: the string, or every message's content joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)):
        parts = []
        for m in prompt:
            content = m.get("content") if isinstance(m, Mapping) else m
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            parts.append("" if content is None else str(content))
        return "\n".join(parts)
    return "" if prompt is None else str(prompt)


def _named_letter(rest: str, letters: set[str]) -> str | None:
    """The option letter a conclusion's rest names first: "b", "(b)", "b.", "option b"...

    A lone letter counts only when it stands alone, is in parentheses or is followed
    by ")", ".", ":" or ",", so that "is a viral infection" names no letter.
    """
    tokens = _TOKEN.findall(rest.casefold())
    i = 0
    bracket = False
    if i < len(tokens) and tokens[i] in ("option", "choice"):
        i += 1
        bracket = True  # "option b" names b whatever follows
    if i < len(tokens) and tokens[i] == "(":
        i += 1
        bracket = True
    if i >= len(tokens) or len(tokens[i]) != 1 or tokens[i].upper() not in letters:
        return None
    follows = tokens[i + 1] if i + 1 < len(tokens) else None
    if bracket or follows in (None, ")", ".", ":", ","):
        return tokens[i].upper()
    return None


def _named_text(rest: str, opts: dict[str, str]) -> str | None:
    """The letter of the longest option text that occurs in `rest` (None on a tie or none)."""
    rest_n = norm(rest)
    found = sorted(
        ((len(norm(t)), k) for k, t in opts.items() if _contains(rest_n, norm(t))), reverse=True
    )
    if not found or (len(found) > 1 and found[0][0] == found[1][0]):
        return None
    return found[0][1]


def _conclusion_names_box(trace: _Trace, opts: dict[str, str]) -> bool:
    if trace.letter is None or trace.letter not in opts:
        return False
    rest = None
    for sentence in trace.sentences():  # the last conclusion wins
        matches = list(_MCQ_CONCLUSION.finditer(sentence))
        if matches:
            rest = sentence[matches[-1].end() :]
    if rest is None:
        return False
    letter = _named_letter(rest, set(opts))
    if letter is not None:
        return letter == trace.letter
    return _named_text(rest, opts) == trace.letter


def _quotes_in_prompt(trace: _Trace, prompt: Any) -> bool:
    source = norm(_prompt_text(prompt))
    spans = [norm(s) for s in quoted_spans(trace.think)]
    return all(_contains(source, s) for s in spans if s)


@REWARDS.register("mcq_faithfulness")
def mcq_faithfulness(
    prompts: list,
    completions: list,
    answer: list | None = None,
    options: list | None = None,
    *,
    gate: str = "format",
    **kw: Any,
) -> list[float | None]:
    r"""Faithfulness of reasoning on a real multiple-choice question (ours; no knowledge base).

    The reward is the mean of two checks, each 0 or 1:
      (a) the conclusion names the boxed option: the last sentence of the reasoning
          that contains "answer is" or "diagnosis is" (also "... would be" / "should
          be") names, after that phrase, the letter of the single ``\boxed{}``
          ("the answer is b", "(b)", "option b") or, when it names no letter, holds the
          boxed option's text as its longest option text ("the most likely diagnosis is
          {option text}"); 0 without such a sentence or without a boxed option letter;
      (b) quotes are real: every non-empty span quoted with "..." (or curly quotes) in
          the reasoning occurs in the prompt, compared as normalized whole words; 1 when
          nothing is quoted.
    Missing <think> or <answer> tags give 0.0; so does a completion the gate refuses
    (module docstring). Needs `options` (letter -> text) and reads the prompt; `answer`
    only for gate="correct". A row without `options` gives None.
    """
    _check_gate(gate)
    out: list[float | None] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        opts = _options(_column(options, i))
        if opts is None:
            out.append(None)
            continue
        trace, refused = _gated_trace(gate, completion, _column(answer, i))
        if trace is None:
            out.append(refused)
            continue
        named = float(_conclusion_names_box(trace, opts))
        quoted = float(_quotes_in_prompt(trace, prompt))
        out.append((named + quoted) / 2.0)
    return out


def _letter_mentioned(think: str, letter: str) -> bool:
    x = re.escape(letter.casefold())
    # "\s*\(?\s*" read as "\s*(?:\(\s*)?": the same texts, without trying every split of a
    # long run of spaces between two \s* (quadratic).
    pattern = rf"\b(?:options?|choices?)\s*(?:\(\s*)?{x}\b|\(\s*{x}\s*\)"
    return re.search(pattern, think.casefold()) is not None


@REWARDS.register("mcq_comprehensiveness")
def mcq_comprehensiveness(
    prompts: list,
    completions: list,
    answer: list | None = None,
    options: list | None = None,
    *,
    gate: str = "format",
    **kw: Any,
) -> list[float | None]:
    """The share of the options that the reasoning discusses (ours; no knowledge base).

    An option is discussed when the reasoning (inside <think>) holds its text, compared
    as normalized whole words, or refers to it by letter as "option X", "choice X" or
    "(X)". Every option counts, the chosen one included. Missing <think> or <answer>
    tags give 0.0; so does a completion the gate refuses (module docstring). Needs
    `options` (letter -> text); `answer` only for gate="correct". A row without
    `options` gives None.
    """
    _check_gate(gate)
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        opts = _options(_column(options, i))
        if opts is None:
            out.append(None)
            continue
        trace, refused = _gated_trace(gate, completion, _column(answer, i))
        if trace is None:
            out.append(refused)
            continue
        think_n = norm(trace.think)
        discussed = sum(
            _contains(think_n, norm(text)) or _letter_mentioned(trace.think, letter)
            for letter, text in opts.items()
        )
        out.append(discussed / len(opts))
    return out
