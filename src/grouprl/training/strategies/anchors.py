"""Off-policy anchors: expert solutions inserted into the groups the policy cannot solve."""

from __future__ import annotations

import math

import torch

from grouprl.data.datasets import PromptExample
from grouprl.rollout.base import rollouts_from_rows
from grouprl.training.collect import ScoredBatch, StrategyContext
from grouprl.training.strategies.base import ROLLOUT_STRATEGIES, Strategy, replace_rows
from grouprl.training.strategies.continuation import _eos_ids


@ROLLOUT_STRATEGIES.register("offpolicy_anchors")
class OffPolicyAnchors(Strategy):
    """DaGRPO's off-policy data augmentation: hard groups get expert "anchor" solutions in
    place of some of their rollouts, so that a group with no positive carries a signal.

    "DaGRPO: Rectifying Gradient Conflict in Reasoning via Distinctiveness-Aware Group
    Relative Policy Optimization", arXiv 2512.06337 (abstract and page notes: a reading;
    the hardness rule, the number of anchors and which rows they replace are ours).

        after `warmup_steps`, for each group with at most `max_positives` rollouts whose
        reward >= success_at (a hard group):
          k = min(num_anchors, #solutions, #non-positive rows, #real rows − 1)
          the group's last k non-positive rows are replaced by the first k solutions of
          `solution_column` (a string or a list of strings), as completions of the
          group's own prompt ids: tokenized with the engine's tokenizer (+ EOS), every
          token trained
          their rewards come from the reward functions on the plain example (never assumed)

    Anchors are group members like any rollout: they enter the group's mean and std and get
    an advantage; the learner computes π_old on their tokens itself. `Rollouts.offpolicy_N`
    and `extra["offpolicy"]` flag them, so a loss may treat them apart (ppo_clip's
    `offpolicy: shaped`, LUFFY's policy shaping). When the batch carries the sampler's log-probs (vLLM), the
    anchors' are NaN, which the learner reads as "no sampler probability": left out of the
    mismatch correction and its metrics. Groups without a solution are left alone.
    """

    def __init__(
        self,
        *,
        solution_column: str = "solution",
        num_anchors: int = 1,
        max_positives: int = 0,
        success_at: float = 1.0,
        warmup_steps: int = 0,
    ) -> None:
        for key, v, low in (
            ("num_anchors", num_anchors, 1),
            ("max_positives", max_positives, 0),
            ("warmup_steps", warmup_steps, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"rollout.strategy.{key}: must be an integer >= {low}, got {v!r}")
        if not math.isfinite(success_at):
            raise ValueError(f"rollout.strategy.success_at: must be finite, got {success_at}")
        self.solution_column, self.num_anchors = solution_column, num_anchors
        self.max_positives, self.success_at = max_positives, float(success_at)
        self.warmup_steps = warmup_steps

    def solutions_of(self, ex: PromptExample) -> list[str]:
        value = ex.columns.get(self.solution_column)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError(
                f"rollout.strategy.solution_column: row {ex.row}'s {self.solution_column!r} "
                f"must be a string or a list of strings, got {type(value).__name__}"
            )
        return [s for s in value if s.strip()]

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        if ctx.step < self.warmup_steps:
            return batch, {}
        if ctx.tokenizer is None or ctx.score is None:
            raise ValueError(
                "rollout.strategy: offpolicy_anchors tokenizes the solutions with the "
                "engine's tokenizer, which this engine does not expose (rollout.engine hf "
                "or vllm)"
            )
        ro = batch.rollouts
        B, G = batch.num_groups, ro.group_size
        ok_BG = (batch.rewards_N >= self.success_at).view(B, G)  # NaN: never a positive
        sample_N = getattr(ro, "sample_N", None)
        real_BG = (sample_N if sample_N is not None else ro.real_N).view(B, G).cpu()
        ok_BG = ok_BG.cpu() & real_BG
        tok = ctx.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
        hard = 0
        groups, prompts, comps, texts, rows = [], [], [], [], []
        for g in range(B):
            if int(ok_BG[g].sum()) > self.max_positives:
                continue
            hard += 1
            sols = self.solutions_of(batch.examples[g])
            free = [j for j in range(G) if bool(real_BG[g, j]) and not bool(ok_BG[g, j])]
            k = min(self.num_anchors, len(sols), len(free), int(real_BG[g].sum()) - 1)
            if k < 1:
                continue
            first = g * G + int(real_BG[g].nonzero()[0])  # the group's own prompt ids
            prompt = ro.prompt_ids_NP[first][ro.prompt_mask_NP[first].bool()].tolist()
            for sol, j in zip(sols[:k], free[-k:], strict=True):
                ids = tok(sol, add_special_tokens=False)["input_ids"]
                ids = ids + [eos] if eos is not None else ids
                groups.append(g)
                prompts.append(prompt)
                comps.append(ids)
                texts.append(tok.decode(ids, skip_special_tokens=True))
                rows.append(g * G + j)
        metrics: dict[str, float] = {"anchor/hard_groups": float(hard)}
        metrics["anchor/inserted"] = float(len(rows))
        N = ro.num_rollouts
        offpolicy = list(batch.extra.get("offpolicy") or [False] * N)
        if rows:
            anchors = rollouts_from_rows(
                prompts,
                comps,
                texts=texts,
                group_size=1,  # scored one by one: groups may get different numbers
                pad_token_id=ctx.pad_token_id,
                eos_ids=_eos_ids(tok),
                # no sampler probability for an expert's tokens: NaN (see the docstring)
                logps=[[math.nan] * len(c) for c in comps]
                if ro.sampling_logp_NT is not None
                else None,
            )
            anchors.offpolicy_N = torch.ones(anchors.num_rollouts, dtype=torch.bool)
            new = ctx.score([batch.examples[g] for g in groups], anchors)
            batch = replace_rows(batch, new, rows, list(range(len(rows))), ctx.pad_token_id)
            for r in rows:
                offpolicy[r] = True
            finite = new.rewards_N[torch.isfinite(new.rewards_N)]
            if finite.numel():
                metrics["anchor/anchor_reward_mean"] = float(finite.mean())
        batch.extra["offpolicy"] = [bool(x) for x in offpolicy]
        return batch, metrics
