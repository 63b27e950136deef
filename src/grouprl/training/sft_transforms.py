"""SFT row transforms (`SFT_TRANSFORMS`): rewrite the supervised pairs before a warm start.

A transform is built from its registered factory with keyword-only parameters and maps one
row (its index, prompt, completion) to a new (prompt, completion). Every transform is
deterministic per row: the same row index, seed and text give the same output whatever
the batch order, so a resumed `sft` run sees the same data.

`sft(..., transforms=[...])` applies them, in order, once before training; each spec is a
name (`"thought_dropout"`) or a mapping `{"name": "thought_dropout", "ratio": 0.5}`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from grouprl.registry import Registry

log = logging.getLogger("grouprl")

# A completion as `training/sft.py` takes it: a string, or (text, trained) segments.
Completion: TypeAlias = "str | Sequence[tuple[str, bool]]"
# (row index, prompt, completion) -> (prompt, completion)
RowTransform: TypeAlias = Callable[[int, str, Any], "tuple[str, Completion]"]

SFT_TRANSFORMS: Registry = Registry("sft transform")

THINK_START, THINK_END = "<think>", "</think>"
EMPTY_THOUGHT = "<think>\n\n</think>"
# TON's format rule (kokolerk/TON src/r1-v/src/open_r1/grpo.py `format_reward`, re.fullmatch):
# an empty thought matches it, a missing answer tag does not.
TON_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def row_uniform(tag: str, seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (tag, seed, row index): sha256, first 8 bytes."""
    digest = hashlib.sha256(f"{tag}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def think_block(start: str = THINK_START, end: str = THINK_END) -> re.Pattern[str]:
    """The pattern of one thought: `start`, anything (DOTALL, non-greedy), `end`; the tags are
    matched literally."""
    if not start or not end:
        raise ValueError(f"think tags must be non-empty, got start={start!r} end={end!r}")
    return re.compile(f"{re.escape(start)}(.*?){re.escape(end)}", re.DOTALL)


def is_empty_thought(text: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """Whether the completion's first `start`...`end` block holds only whitespace (a skipped
    thought, TON's "skip think" rate counts these); False when it has none."""
    m = think_block(start, end).search(text)
    return m is not None and not m.group(1).strip()


@SFT_TRANSFORMS.register("thought_dropout")
def thought_dropout(
    *,
    ratio: float = 0.5,
    seed: int = 0,
    empty: str = EMPTY_THOUGHT,
    think_start: str = THINK_START,
    think_end: str = THINK_END,
) -> RowTransform:
    """TON's thought dropout: each reasoning trace becomes an empty thought with probability
    `ratio`.

    "Think or Not? Selective Reasoning via Reinforcement Learning for Vision-Language
    Models" (TON, arXiv 2505.16854), SFT stage; the authors' data script
    (kokolerk/TON `src/eval/aitz_evaluate/sft_grpo_data.py`) keeps the trace when
    `random.random() < 0.5`, else writes `<think>\\n\\n</think>` before the unchanged
    answer; their released SFT sets use ratio 0.5. Confidence: code.

    Per row i: u_i = sha256("thought_dropout:{seed}:{i}") as a number in [0, 1); the row's
    thoughts are emptied when u_i < ratio (an independent draw per row, fixed by seed and
    index, so the share of emptied rows is Binomial(n, ratio) / n). Every
    `think_start`...`think_end` block (default `<think>`...`</think>`; DOTALL, non-greedy)
    of the completion is replaced by `empty`; everything else, the answer included, is
    kept character for character. In a multi-turn trace of (text, trained) segments only
    the trained segments change (one draw per row). A row without a think block is left
    as it is.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise ValueError(f"thought_dropout: ratio must be a number in [0, 1], got {ratio!r}")
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"thought_dropout: ratio must be in [0, 1], got {ratio}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"thought_dropout: seed must be an integer, got {seed!r}")
    if not isinstance(empty, str):
        raise ValueError(f"thought_dropout: empty must be a string, got {empty!r}")
    if not (isinstance(think_start, str) and isinstance(think_end, str)):
        raise ValueError("thought_dropout: think_start and think_end must be strings")
    block = think_block(think_start, think_end)

    def drop(text: str) -> str:
        return block.sub(lambda _: empty, text)

    def transform(index: int, prompt: str, completion: Completion) -> tuple[str, Completion]:
        if row_uniform("thought_dropout", seed, index) >= ratio:
            return prompt, completion
        if isinstance(completion, str):
            return prompt, drop(completion)
        return prompt, [(drop(str(t)) if k else str(t), bool(k)) for t, k in completion]

    return transform


def build_sft_transform(spec: str | Mapping[str, Any]) -> RowTransform:
    """One transform from a name or a `{"name": ..., params...}` mapping (parameters are
    checked against the factory's signature: an unknown one fails naming it)."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ValueError(
            f"transforms: each transform is a name or a mapping with a 'name', got {spec!r}"
        )
    return SFT_TRANSFORMS.build(name, **params)


def apply_sft_transforms(
    prompts: Sequence[str],
    completions: Sequence[Completion],
    specs: Sequence[str | Mapping[str, Any]],
) -> tuple[list[str], list[Completion]]:
    """`prompts`, `completions` after each transform of `specs` in turn (row i keeps index i).

    Logs how many rows each transform changed."""
    if isinstance(specs, str | Mapping):
        raise ValueError("transforms: expected a list of transforms, got a single one")
    if len(prompts) != len(completions):
        raise ValueError(
            f"transforms: prompts and completions differ in length "
            f"({len(prompts)} vs {len(completions)})"
        )
    P, C = list(prompts), list(completions)
    for spec in specs:
        fn = build_sft_transform(spec)
        rows = [fn(i, p, c) for i, (p, c) in enumerate(zip(P, C, strict=True))]
        changed = sum(r != (p, c) for r, p, c in zip(rows, P, C, strict=True))
        P, C = [r[0] for r in rows], [r[1] for r in rows]
        name = spec if isinstance(spec, str) else spec["name"]
        log.info("sft: transform %s changed %d of %d rows", name, changed, len(P))
    return P, C


def parse_sft_transform(text: str) -> dict[str, Any]:
    """A command-line spec `name` or `name:key=value,key=value` as a transform mapping
    (values read as int, then float, else kept as strings)."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise ValueError(f"transform {text!r}: expected name or name:key=value,...")
    spec: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"transform {text!r}: {item!r} is not key=value")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        spec[key.strip()] = value
    return spec
