"""The inputs components may ask for by name: shape, stage, cross-process rule, probe value.

Advantage estimators (and their modifiers), token masks and sample filters name the values
they need as parameters (`registry.BoundComponent`). This module is the one place that
declares each such value:

- `stage`: who computes it. `collect`: read off the scored batch (rewards, lengths, the
  greedy baseline); `prepass`: one no-grad pass of the sampling policy over the whole
  batch (log-probs, entropy), run only when some component asks; `plan`: derived during
  planning from earlier values (advantages, masks, step counters).
- `reduce`: how the value combines across data-parallel processes, so that batch-wide
  statistics stay exact when the batch is sharded: `groups` (concatenate along B),
  `rows` (concatenate along N = B*G), `replicated` (the same on every process).
- `consumers`: which kinds of component may ask for it; a component that names anything
  else is refused at start-up with its config key.
- `probe`: a value on the tiny start-up batch (B=2 prompts, G=2, T=3) used to run every
  configured component once before the model loads (`components.probe_components`).

The planning stage (`training/plan.py`) provides every name declared here; a test checks
that the two lists agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grouprl.registry import Registry

STAGES = ("collect", "prepass", "plan")
REDUCTIONS = ("groups", "rows", "replicated")
CONSUMERS = ("advantage", "token_mask", "sample_filter")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: str
    doc: str
    stage: str
    reduce: str
    consumers: frozenset[str]
    probe: Callable[[], Any]


INPUTS: Registry[InputSpec] = Registry("input")


def declare(
    name: str,
    shape: str,
    doc: str,
    *,
    stage: str,
    reduce: str,
    consumers: tuple[str, ...],
    probe: Callable[[], Any],
) -> None:
    if stage not in STAGES or reduce not in REDUCTIONS or not set(consumers) <= set(CONSUMERS):
        raise ValueError(f"input {name!r}: bad stage/reduce/consumers")
    INPUTS.register(name)(InputSpec(name, shape, doc, stage, reduce, frozenset(consumers), probe))


def allowed_inputs(consumer: str) -> tuple[str, ...]:
    """Names a component of kind `consumer` may ask for."""
    return tuple(n for n in INPUTS if consumer in INPUTS.get(n).consumers)


def probe_inputs() -> dict[str, Any]:
    """Every declared input on the tiny start-up batch (fresh tensors each call)."""
    return {n: INPUTS.get(n).probe() for n in INPUTS}


_ADV, _MASK, _FILTER = "advantage", "token_mask", "sample_filter"
_PROBE_MASK = [[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]

declare(
    "rewards_BG",
    "[B, G] float",
    "combined reward of each completion (NaN = unscorable)",
    stage="collect",
    reduce="groups",
    consumers=(_ADV, _FILTER),
    probe=lambda: torch.tensor([[0.0, 1.0], [1.0, 1.0]]),
)
declare(
    "rewards_BGK",
    "[B, G, K] float",
    "each reward function's value before weighting",
    stage="collect",
    reduce="groups",
    consumers=(_ADV,),
    probe=lambda: torch.tensor([[[0.0], [1.0]], [[1.0], [1.0]]]),
)
declare(
    "weights_K",
    "[K] float",
    "the reward functions' weights",
    stage="collect",
    reduce="replicated",
    consumers=(_ADV,),
    probe=lambda: torch.tensor([1.0]),
)
declare(
    "lengths_BG",
    "[B, G] float",
    "completion lengths in tokens",
    stage="collect",
    reduce="groups",
    consumers=(_ADV, _FILTER),
    probe=lambda: torch.tensor([[2.0, 3.0], [1.0, 2.0]]),
)
declare(
    "turns_BG",
    "[B, G] float",
    "model turns per trajectory (1 for a single-turn rollout)",
    stage="collect",
    reduce="groups",
    consumers=(_ADV,),
    probe=lambda: torch.tensor([[1.0, 2.0], [1.0, 3.0]]),
)
declare(
    "truncated_BG",
    "[B, G] bool",
    "completions cut at the maximum length (no EOS)",
    stage="collect",
    reduce="groups",
    consumers=(_ADV, _FILTER),
    probe=lambda: torch.zeros(2, 2, dtype=torch.bool),
)
declare(
    "prompt_keys_B",
    "list[B] str",
    "a stable key per prompt (its dataset index)",
    stage="collect",
    reduce="groups",
    consumers=(_ADV,),
    probe=lambda: ["probe-a", "probe-b"],
)
declare(
    "row_tokens_N",
    "list[N] of (prompt ids, completion ids, loss mask)",
    "each row's prompt token ids (no padding), its completion token ids (real tokens) and "
    "their loss mask, as lists",
    stage="collect",
    reduce="rows",
    consumers=(_ADV,),
    probe=lambda: [([1, 2], [3, 4], [1.0, 1.0])] * 4,
)
declare(
    "token_scorer",
    "rows -> list of float lists",
    "a function: [(prompt ids, completion ids), ...] -> the sampling policy's log-prob of "
    "each completion token (no grad; each call an extra no-grad forward over those rows)",
    stage="prepass",
    reduce="replicated",
    consumers=(_ADV,),
    probe=lambda: lambda rows: [[-1.0] * len(c) for _, c in rows],
)
declare(
    "baseline_B",
    "[B] float",
    "combined reward of one greedy completion per prompt (ReMax), sampled by the collector",
    stage="collect",
    reduce="groups",
    consumers=(_ADV,),
    probe=lambda: torch.tensor([0.5, 1.0]),
)
declare(
    "answers_BG",
    "list[B][G] str",
    "the answer extracted from each completion (majority votes, answer diversity)",
    stage="collect",
    reduce="groups",
    consumers=(_ADV,),
    probe=lambda: [["1", "2"], ["1", "1"]],
)
declare(
    "item_rel_BGK",
    "[B, G, K] float",
    "relevance of each line (item) of each completion, from a reward that logs it as the "
    "`item_rel` column (rank_relevance); NaN past a list's end",
    stage="collect",
    reduce="groups",
    consumers=(_ADV,),
    probe=lambda: torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, float("nan")]]]),
)
declare(
    "budget_rows_N",
    "list[N] of dict",
    "each row's place in an anytime_budget group (the `budget` column): a thinking row's "
    "cuts and budget prior, or a summary row's (chain, budget)",
    stage="collect",
    reduce="rows",
    consumers=(_ADV,),
    probe=lambda: (
        [
            {"role": "think", "g": 0, "cuts": [2], "p": [1.0]},
            {"role": "summary", "g": 0, "s": 0},
        ]
        * 2
    ),
)
declare(
    "segment_values_N",
    "list[N] of [[position, value], ...]",
    "Monte-Carlo values at cut points of each completion, logged by the segment_mc rollout "
    "strategy (`segment_values` column)",
    stage="collect",
    reduce="rows",
    consumers=(_ADV,),
    probe=lambda: [
        [[0, 0.5], [2, 1.0]],
        [[0, 0.5], [3, 0.0]],
        [[0, 0.5], [1, 1.0]],
        [[0, 0.5], [2, 0.0]],
    ],
)
declare(
    "item_index_NT",
    "[N, T] long",
    "the item (line) of the completion each token belongs to, −1 for none",
    stage="plan",
    reduce="rows",
    consumers=(_ADV, _MASK),
    probe=lambda: torch.tensor([[0, 0, -1], [0, 1, 1], [0, -1, -1], [0, 1, -1]]),
)
declare(
    "seq_logp_BG",
    "[B, G] float",
    "sum of the sampling policy's log-probs over each completion's action tokens",
    stage="prepass",
    reduce="groups",
    consumers=(_ADV,),
    probe=lambda: torch.tensor([[-2.0, -3.0], [-1.0, -2.0]]),
)
declare(
    "entropy_NT",
    "[N, T] float",
    "the sampling policy's entropy at each completion position (no grad)",
    stage="prepass",
    reduce="rows",
    consumers=(_ADV, _MASK),
    probe=lambda: torch.tensor(
        [[0.5, 1.0, 0.0], [0.2, 0.1, 0.9], [0.3, 0.0, 0.0], [0.7, 0.4, 0.0]]
    ),
)
declare(
    "capo_curvature_NT",
    "[N, T] float",
    "‖h_t‖²·‖onehot(o_t) − π(·)‖² of each token (the LM head's gradient norm of log π, "
    "no grad; an extra no-grad forward)",
    stage="prepass",
    reduce="rows",
    consumers=(_MASK,),
    probe=lambda: torch.tensor(
        [[1.0, 2.0, 0.0], [0.5, 3.0, 0.2], [0.1, 0.0, 0.0], [4.0, 0.3, 0.0]]
    ),
)
declare(
    "rescore_NT",
    "scale -> [N, T] float",
    "a function: each sampled token's log-prob at scale × the sampling temperature (no "
    "grad; each call an extra no-grad forward)",
    stage="prepass",
    reduce="rows",
    consumers=(_ADV,),
    probe=lambda: lambda scale: torch.full((4, 3), -1.0 * scale),
)
declare(
    "old_logp_NT",
    "[N, T] float",
    "the sampling policy's log-prob of each completion token (no grad)",
    stage="prepass",
    reduce="rows",
    consumers=(_ADV, _MASK),
    probe=lambda: torch.full((4, 3), -1.0),
)
declare(
    "adv_BG",
    "[B, G] float",
    "the advantage so far (modifiers and sample filters)",
    stage="plan",
    reduce="groups",
    consumers=(_ADV, _FILTER),
    probe=lambda: torch.tensor([[-1.0, 1.0], [0.0, 0.0]]),
)
declare(
    "adv_N",
    "[N] float",
    "the advantage of each completion",
    stage="plan",
    reduce="rows",
    consumers=(_MASK,),
    probe=lambda: torch.tensor([-1.0, 1.0, 0.0, 0.0]),
)
declare(
    "adv_NT",
    "[N, T] float",
    "the advantage of each completion, broadcast over its positions",
    stage="plan",
    reduce="rows",
    consumers=(_MASK,),
    probe=lambda: torch.tensor([-1.0, 1.0, 0.0, 0.0])[:, None].expand(4, 3),
)
declare(
    "mask_NT",
    "[N, T] float",
    "loss mask: 1 on the policy's own tokens, 0 on padding and on context tokens",
    stage="plan",
    reduce="rows",
    consumers=(_ADV, _MASK),
    probe=lambda: torch.tensor(_PROBE_MASK),
)
declare(
    "completion_ids_NT",
    "[N, T] long",
    "completion token ids",
    stage="plan",
    reduce="rows",
    consumers=(_MASK,),
    probe=lambda: torch.tensor([[1, 2, 0], [1, 3, 4], [5, 0, 0], [1, 2, 0]]),
)
declare(
    "group_N",
    "[N] long",
    "index of each row's prompt group (rows of a group are contiguous), on the batch's device",
    stage="plan",
    reduce="rows",
    consumers=(_MASK,),
    probe=lambda: torch.tensor([0, 0, 1, 1]),
)
declare(
    "step",
    "int",
    "the training step (0-based)",
    stage="plan",
    reduce="replicated",
    consumers=(_MASK,),
    probe=lambda: 0,
)
declare(
    "max_steps",
    "int",
    "the run's total number of steps",
    stage="plan",
    reduce="replicated",
    consumers=(_MASK,),
    probe=lambda: 10,
)
