r"""`clinical`: synthetic diagnosis questions for CRPO-style rewards (Clinical-R1, arXiv 2512.00601).

This is a training environment for rule-based reasoning rewards (accuracy, faithfulness,
comprehensiveness). It is not medical advice: the knowledge base (`clinical_kb`) is a
simplified, rule-consistent set of textbook associations.

Vignettes
---------
A vignette is made from one true condition. It holds an age, a sex and a shuffled list of
findings:

- 1 or 2 of the condition's key findings (always at least one);
- 0 to 2 of its supporting findings;
- 1 or 2 of its family's non-specific findings;
- 1 or 2 distractors, taken from the generic findings and from other families' findings.
  A distractor is never a finding of the vignette's own family, and never a finding
  that only conditions of the other sex have (no "missed period" in a male patient).

The question offers `options` (4 or 5) conditions from the same family: the gold and
randomly drawn siblings, listed in alphabetical order (as USMLE-style items list them),
so the gold's letter depends on which siblings were drawn. Why alphabetical: with
options in random order, a 3-layer model must bind each letter to a name it has just
concluded (associative recall), and it stayed at chance (20%) on that binding after
1750 SFT steps; in alphabetical order the letter follows from the concluded condition
and the siblings on the list, which it learns in a few hundred steps. All prompts are rendered by `render_mcq`, which later real-benchmark
loaders (MedQA and others) can share::

    {age} year old {sex} with {f1}, {f2}, .... most likely diagnosis?
    A. {condition}
    B. {condition}
    ...
    answer as <think> reasoning </think><answer>\boxed{letter}</answer>

Rows are produced by one random stream seeded with `seed_split`. A row is dropped when its
set of findings has been generated before, so no vignette appears twice: not in one split,
not across splits, and not reworded with other options or another order. That set-level
rule is stricter than deduplicating by the rendered prompt. The first `num_eval` unique
rows are held out and the next `num_train` rows are for training. The held-out rows
therefore do not depend on `num_train`, and no run seed is involved.

Row schema (every row is a dict)
--------------------------------
prompt               the rendered question (str)
answer               the gold letter, "A".."E"
options              {letter: condition name}, in letter order
findings             every finding in the vignette, distractors included, in prompt order
key_findings         the true condition's key findings that the vignette contains (>= 1)
condition_findings   {option condition: all its KB findings (key first, then supporting)}
condition_key_findings  {option condition: its KB key findings}
nonspecific_findings the family's non-specific findings (all of them, present or not)
condition            the true condition's name
family               the family's name
reference            a gold reasoning trace in the grammar below

Reasoning grammar (what the CRPO rewards parse)
-----------------------------------------------
A completion is ``<think> S1. S2. ... Sn </think><answer>\boxed{X}</answer>``. The text
inside <think> ... </think> is a list of sentences separated by ". " (period, space). Each
sentence is one of:

- a cited finding: ``the patient has {finding}`` (one finding per sentence);
- a ruled-out option: ``rule out {condition} because {finding} is absent``, or
  ``rule out {condition} because {finding} favors {other condition}``. The ruled-out
  condition's name comes right after ``rule out ``;
- the conclusion: ``the most likely diagnosis is {condition}``, exactly once, last.

Everything is lowercase, and conditions and findings are KB phrases. No KB phrase
contains "because", "favors", "absent", "rule", "patient" or "diagnosis" (`check_kb`). The
reference traces cite the key findings present, in prompt order (supporting findings
are left out to keep traces short). They then rule out every other option in letter order: with "is absent" naming one of
that option's key findings, or with "favors" naming a key finding of the true condition
present in the vignette, half the time each. They end with the conclusion. They never
contain a "." except the separators.

Parsing advice for reward authors: take the text between ``<think>`` and ``</think>``,
collapse runs of whitespace to one space, strip it, and split it on the regex ``\.\s+``.
Then strip each sentence of spaces and a trailing ".". The word tokenizer
(`clinical_tokenizer`) decodes in-vocabulary text exactly, but a sampling model may emit
stray spaces, newlines or a final period, and this recipe absorbs them.

SFT traces
----------
`sft_rows` pairs prompts with traces. Exactly ``round(n * imperfect_frac)`` of the traces
are imperfect. The imperfect ones are split by `IMPERFECTION_MIX` (largest remainder),
with one kind of flaw per trace:

- ``skip_key`` (25%): leaves out a non-empty subset of the key findings present (all of
  them when only one is present). Those findings appear nowhere in the trace, so the
  rule-outs that would cite them use "is absent". The answer is correct.
- ``invented`` (25%): one extra citation of a finding absent from the vignette: an absent
  key or supporting finding of the true condition, else a key finding of another option.
  The answer is correct.
- ``no_rule_out`` (15%): no rule-out sentences. The answer is correct.
- ``mismatch`` (10%): complete reasoning that concludes the true condition but boxes
  another option's letter.
- ``wrong_answer`` (25%): cites only the supporting and non-specific findings present,
  rules out the other options (the true one included) "because {its key finding} is
  absent", which is false when that finding is present, then concludes and boxes a wrong
  option.

The other traces are complete and faithful (the reference trace). With the default
``imperfect_frac=0.4``, 14% of the boxed letters are wrong (the ``mismatch`` and
``wrong_answer`` traces), so 86% are correct.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from grouprl.data.tasks.base import TASKS, Task
from grouprl.data.tasks.clinical_kb import (
    CONDITIONS,
    FAMILIES,
    GENERIC_FINDINGS,
    SEXES,
    Condition,
    all_findings,
    family_findings,
)

LETTERS = "ABCDE"
INSTRUCTION = "answer as <think> reasoning </think><answer>\\boxed{letter}</answer>"
QUESTION = "{age} year old {sex} with {findings}. most likely diagnosis?"

CITE = "the patient has {finding}"
RULE_OUT_ABSENT = "rule out {condition} because {finding} is absent"
RULE_OUT_FAVORS = "rule out {condition} because {finding} favors {other}"
CONCLUDE = "the most likely diagnosis is {condition}"

IMPERFECTION_MIX: dict[str, float] = {
    "skip_key": 0.25,
    "invented": 0.25,
    "no_rule_out": 0.15,
    "mismatch": 0.10,
    "wrong_answer": 0.25,
}
COMPLETE = "complete"
OPTION_TOKENS = tuple(f"\n{letter}." for letter in LETTERS)  # whole tokens in the tokenizer


# ---------------------------------------------------------------- rendering


def render_mcq(question: str, options: Mapping[str, str]) -> str:
    r"""A multiple-choice prompt: the question, one ``"A. text"`` line per option, then the
    instruction to answer as ``<think> reasoning </think><answer>\boxed{letter}</answer>``.

    Generic: the question and option texts are used as given, and options keep the
    mapping's order.
    """
    if not options:
        raise ValueError("render_mcq: no options")
    lines = [question.strip()]
    lines += [f"{letter}. {str(text).strip()}" for letter, text in options.items()]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def format_trace(sentences: list[str], letter: str) -> str:
    r"""``<think> s1. s2. ... sn </think><answer>\boxed{letter}</answer>``."""
    return "<think> " + ". ".join(sentences) + " </think><answer>\\boxed{" + letter + "}</answer>"


@dataclass
class _Plan:
    """A trace before rendering: what it cites, rules out, concludes and boxes."""

    cited: list[str]
    rule_outs: list[tuple[str, str, str | None]]  # (condition, finding, favored or None)
    conclusion: str
    letter: str

    def render(self) -> str:
        sentences = [CITE.format(finding=f) for f in self.cited]
        for cond, finding, favored in self.rule_outs:
            if favored is None:
                sentences.append(RULE_OUT_ABSENT.format(condition=cond, finding=finding))
            else:
                sentences.append(
                    RULE_OUT_FAVORS.format(condition=cond, finding=finding, other=favored)
                )
        sentences.append(CONCLUDE.format(condition=self.conclusion))
        return format_trace(sentences, self.letter)


# ---------------------------------------------------------------- vignettes


def _distractor_pool(family: str, sex: str) -> list[str]:
    """Findings outside `family`, less those that only conditions of the other sex have."""
    other_sex: set[str] = set()
    any_sex: set[str] = set()
    for c in CONDITIONS.values():
        (other_sex if c.sex not in (None, sex) else any_sex).update(c.findings)
    for fam in FAMILIES.values():
        any_sex.update(fam.nonspecific)
    pool = (set(GENERIC_FINDINGS) | set(all_findings())) - family_findings(family)
    return sorted(pool - (other_sex - any_sex))


def _reference_plan(row: dict[str, Any], rng: random.Random) -> _Plan:
    cond = CONDITIONS[row["condition"]]
    present = row["findings"]
    keys = [f for f in present if f in cond.key]
    rule_outs: list[tuple[str, str, str | None]] = []
    for name in row["options"].values():
        if name == cond.name:
            continue
        if rng.random() < 0.5:
            rule_outs.append((name, rng.choice(CONDITIONS[name].key), None))
        else:
            rule_outs.append((name, rng.choice(keys), cond.name))
    return _Plan(keys, rule_outs, cond.name, row["answer"])


def _vignette(rng: random.Random, cond: Condition, n_options: int, pools: dict) -> dict:
    fam = FAMILIES[cond.family]
    keys = rng.sample(cond.key, rng.randint(1, min(2, len(cond.key))))
    supp = rng.sample(cond.supporting, rng.randint(0, min(2, len(cond.supporting))))
    nonspecific = rng.sample(fam.nonspecific, rng.randint(1, min(2, len(fam.nonspecific))))
    age = rng.randint(*cond.ages)
    sex = cond.sex or rng.choice(SEXES)
    distractors = rng.sample(pools[fam.name, sex], rng.randint(1, 2))
    findings = keys + supp + nonspecific + distractors
    rng.shuffle(findings)
    siblings = [c for c in fam.conditions if c is not cond]
    chosen = [cond, *rng.sample(siblings, n_options - 1)]
    chosen.sort(key=lambda c: c.name)  # alphabetical, as USMLE-style items list them
    options = {LETTERS[i]: c.name for i, c in enumerate(chosen)}
    question = QUESTION.format(age=age, sex=sex, findings=", ".join(findings))
    row = {
        "prompt": render_mcq(question, options),
        "answer": LETTERS[chosen.index(cond)],
        "options": options,
        "findings": findings,
        "key_findings": [f for f in findings if f in cond.key],
        "condition_findings": {c.name: list(c.findings) for c in chosen},
        "condition_key_findings": {c.name: list(c.key) for c in chosen},
        "nonspecific_findings": list(fam.nonspecific),
        "condition": cond.name,
        "family": fam.name,
    }
    row["reference"] = _reference_plan(row, rng).render()
    return row


def generate_rows(n: int, *, seed: int, options: int = 5) -> list[dict[str, Any]]:
    """`n` rows with pairwise different finding sets, from one stream seeded by `seed`."""
    if not 2 <= options <= len(LETTERS):
        raise ValueError(f"clinical: options must be in 2..{len(LETTERS)}, got {options}")
    smallest = min(len(f.conditions) for f in FAMILIES.values())
    if options > smallest:
        raise ValueError(f"clinical: options={options} exceeds the smallest family ({smallest})")
    rng = random.Random(seed)
    conditions = list(CONDITIONS.values())
    pools = {(fam, sex): _distractor_pool(fam, sex) for fam in FAMILIES for sex in SEXES}
    rows: list[dict[str, Any]] = []
    seen: set[frozenset[str]] = set()
    misses = 0
    while len(rows) < n:
        row = _vignette(rng, rng.choice(conditions), options, pools)
        key = frozenset(row["findings"])
        if key in seen:
            misses += 1
            if misses > 100 * n + 1000:
                raise RuntimeError(f"clinical: cannot make {n} distinct vignettes")
            continue
        seen.add(key)
        rows.append(row)
    return rows


@TASKS.register("clinical")
def clinical(
    *, num_train: int = 4000, num_eval: int = 400, seed_split: int = 1234, options: int = 5
) -> Task:
    """Synthetic diagnosis MCQs; see the module docstring for the rows and the grammar."""
    if num_train < 1 or num_eval < 1:
        raise ValueError(
            f"clinical: num_train and num_eval must be >= 1, got {num_train}, {num_eval}"
        )
    rows = generate_rows(num_eval + num_train, seed=seed_split, options=options)
    train_rows = rows[num_eval:]

    def pairs(seed: int) -> tuple[list[str], list[str]]:
        data = sft_rows(rows=train_rows, seed=seed)
        return [r["prompt"] for r in data], [r["completion"] for r in data]

    return Task(
        name="clinical",
        train_rows=train_rows,
        eval_rows=rows[:num_eval],
        rewards=[{"name": "choice_accuracy", "weight": 1.0}, {"name": "format", "weight": 1.0}],
        correct_reward="choice_accuracy",
        chars="",
        tokenizer_factory=clinical_tokenizer,
        sft_pairs=pairs,
        eval_rewards=[
            "choice_accuracy",
            "format",
            "clinical_faithfulness",
            "clinical_comprehensiveness",
        ],
    )


# ---------------------------------------------------------------- SFT traces


def _counts(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split `n` over `mix` by largest remainder (the counts sum to `n`)."""
    total = sum(mix.values())
    raw = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    order = sorted(mix, key=lambda k: raw[k] - counts[k], reverse=True)
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _imperfect_plan(row: dict[str, Any], kind: str, rng: random.Random) -> _Plan:
    cond = CONDITIONS[row["condition"]]
    present = row["findings"]
    others = [(letter, name) for letter, name in row["options"].items() if name != cond.name]
    plan = _reference_plan(row, rng)
    if kind == "skip_key":
        keys = row["key_findings"]
        dropped = set(rng.sample(keys, rng.randint(1, len(keys))))
        plan.cited = [f for f in plan.cited if f not in dropped]
        plan.rule_outs = [
            (c, rng.choice(CONDITIONS[c].key), None) if f in dropped else (c, f, fav)
            for c, f, fav in plan.rule_outs
        ]
    elif kind == "invented":
        absent = [f for f in cond.findings if f not in present]
        if absent:
            invented = rng.choice(absent)
        else:
            target = rng.choice(others)[1]
            invented = rng.choice(CONDITIONS[target].key)
            plan.rule_outs = [
                (c, rng.choice(row["key_findings"]), cond.name) if c == target else (c, f, fav)
                for c, f, fav in plan.rule_outs
            ]
        plan.cited.insert(rng.randint(0, len(plan.cited)), invented)
    elif kind == "no_rule_out":
        plan.rule_outs = []
    elif kind == "mismatch":
        plan.letter = rng.choice(others)[0]
    elif kind == "wrong_answer":
        letter, wrong = rng.choice(others)
        cited = [f for f in present if f in cond.supporting or f in row["nonspecific_findings"]]
        rule_outs: list[tuple[str, str, str | None]] = []
        for name in row["options"].values():
            if name == wrong:
                continue
            key = CONDITIONS[name].key
            absent_keys = [f for f in key if f not in present]
            # for the true condition this may claim a present key finding is absent
            rule_outs.append((name, rng.choice(absent_keys or list(key)), None))
        plan = _Plan(cited, rule_outs, wrong, letter)
    elif kind != COMPLETE:
        raise ValueError(f"unknown imperfection {kind!r}; known: {', '.join(IMPERFECTION_MIX)}")
    return plan


def sft_rows(
    split: str = "train",
    seed: int = 0,
    imperfect_frac: float = 0.4,
    *,
    rows: list[dict[str, Any]] | None = None,
    mix: Mapping[str, float] | None = None,
    **task_params: Any,
) -> list[dict[str, Any]]:
    """Prompt/completion pairs for SFT, with ``round(n * imperfect_frac)`` imperfect traces.

    `rows` are task rows (default: ``clinical(**task_params).rows(split)``). `mix` gives
    the weights of the imperfection kinds (default `IMPERFECTION_MIX`). Each output row
    has ``prompt``, ``completion`` (the trace), ``kind`` ("complete" or an imperfection
    kind) and ``answer`` (the gold letter). The output is in the order of `rows`, and it
    is the same for the same `seed`.
    """
    if not 0.0 <= imperfect_frac <= 1.0:
        raise ValueError(f"sft_rows: imperfect_frac must be in [0, 1], got {imperfect_frac}")
    mix = dict(IMPERFECTION_MIX if mix is None else mix)
    unknown = set(mix) - set(IMPERFECTION_MIX)
    if unknown:
        raise ValueError(f"sft_rows: unknown imperfection kinds {sorted(unknown)}")
    if rows is None:
        rows = clinical(**task_params).rows(split)
    n = len(rows)
    n_imperfect = round(n * imperfect_frac)
    kinds = [COMPLETE] * (n - n_imperfect)
    for kind, count in _counts(n_imperfect, mix).items():
        kinds += [kind] * count
    rng = random.Random(seed)
    rng.shuffle(kinds)
    out = []
    for row, kind in zip(rows, kinds, strict=True):
        completion = (
            row["reference"] if kind == COMPLETE else _imperfect_plan(row, kind, rng).render()
        )
        out.append(
            {
                "prompt": row["prompt"],
                "completion": completion,
                "kind": kind,
                "answer": row["answer"],
            }
        )
    return out


# ---------------------------------------------------------------- tokenizer


def vocabulary_texts() -> list[str]:
    """Texts that cover every piece a clinical prompt or trace can contain."""
    texts = [
        render_mcq(
            QUESTION.format(age=40, sex="male", findings="fever, cough"),
            {letter: "asthma" for letter in LETTERS},
        ),
        _Plan(
            ["fever"], [("asthma", "fever", None), ("copd", "fever", "asthma")], "asthma", "A"
        ).render(),
    ]
    texts += [format_trace(["fever"], letter) for letter in LETTERS]
    words = [*all_findings(), *CONDITIONS, *SEXES, *(str(age) for age in range(0, 101))]
    return texts + words  # the tokenizer adds every word with and without a leading space


def clinical_tokenizer():
    """The word tokenizer (`models.word_tokenizer`) over the clinical task's vocabulary."""
    from grouprl.models.word_tokenizer import build_word_tokenizer

    # "\nA." (an option line's start) is one token: it saves 10 tokens per prompt.
    return build_word_tokenizer(vocabulary_texts(), extra_tokens=OPTION_TOKENS)
