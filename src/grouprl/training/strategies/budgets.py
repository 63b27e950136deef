"""Anytime reasoning: each chain of thought is cut at several token budgets and the policy
writes a summary answer at every cut, so that the thinking is rewarded for being right
early as well as at the end (the `brpo` advantage turns the scores into credit)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from grouprl.algorithms.budgets import BUDGET_PRIORS, budget_prior
from grouprl.rollout.base import rollouts_from_rows
from grouprl.training.collect import ScoredBatch, StrategyContext
from grouprl.training.strategies.base import (
    ROLLOUT_STRATEGIES,
    Strategy,
    require_continuation,
    thinking_length,
)
from grouprl.training.strategies.continuation import _eos_ids

SUMMARY_CUE = "\n</think>\n\n**Final Answer**\n"
log = logging.getLogger("grouprl")


@ROLLOUT_STRATEGIES.register("anytime_budget")
class AnytimeBudget(Strategy):
    """AnytimeReasoner's budgeted summaries: every sampled chain of thought is cut at S
    budgets and the policy writes an answer at each cut.

    "Optimizing Anytime Reasoning via Budget Relative Policy Optimization", arXiv
    2505.13438 (authors' code sail-sg/AnytimeReasoner `verl/trainer/ppo/brpo.py`).

        budgets b_s = round(fraction_s · rollout.max_new_tokens), s = 1..S
        (default fractions 0.25, 0.5, 0.75, 1: the code's 2k/4k/6k/8k of 8k)
        thinking of chain g: its completion up to `think_end` (else all of it, no EOS)
        cut c_{g,s} = min(b_s, thinking length)
        summary (g, s) ~ π(· | prompt + thinking[:c_{g,s}] + summary_cue), at most
            `summary_tokens` (128, the code's MAX_ANSWER_LEN), scored: r[g, s]
        the group becomes G thinking rows (trained up to c_{g,S}) + G·S summary rows;
        a thinking row's reward is its last summary's score (for metrics)

    Train it with `advantage: {name: brpo}` (the `budget` column says which row is which).
    The prior p over budgets (`prior`: uniform, linear, base) goes with the rows. Needs an
    engine that continues token ids (hf, vllm); each step samples G·S summaries more.
    """

    needs_continuation = True

    def __init__(
        self,
        *,
        budgets: list[float] | tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
        prior: str = "uniform",
        summary_cue: str = SUMMARY_CUE,
        summary_tokens: int = 128,
        think_end: str = "</think>",
    ) -> None:
        fr = [float(f) for f in budgets]
        if not fr or any(not 0 < f <= 1 for f in fr) or fr != sorted(set(fr)):
            raise ValueError(
                "rollout.strategy.budgets: increasing fractions of rollout.max_new_tokens in "
                f"(0, 1], got {list(budgets)}"
            )
        if prior not in BUDGET_PRIORS:
            raise ValueError(f"rollout.strategy.prior: one of {BUDGET_PRIORS}, got {prior!r}")
        if summary_tokens < 1:
            raise ValueError(f"rollout.strategy.summary_tokens: must be >= 1, got {summary_tokens}")
        self._warned_all_zero = False
        self.fractions, self.prior = fr, prior
        self.summary_cue, self.summary_tokens, self.think_end = (
            summary_cue,
            summary_tokens,
            think_end,
        )

    def budgets(self, max_new_tokens: int) -> list[int]:
        """The token budgets: each fraction of max_new_tokens, at least 1, kept increasing."""
        out: list[int] = []
        for f in self.fractions:
            b = max(1, round(f * max_new_tokens))
            out.append(max(b, out[-1] + 1) if out else b)
        return out

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        require_continuation(ctx, "anytime_budget")
        tok, ro = ctx.tokenizer, batch.rollouts
        B, G = batch.num_groups, ro.group_size
        budgets = self.budgets(ctx.max_new_tokens or int(ro.completion_ids_NT.shape[1]))
        S = len(budgets)
        p = budget_prior(budgets, self.prior)
        cue = tok(self.summary_cue, add_special_tokens=False)["input_ids"]
        eos = _eos_ids(tok)
        chains = []  # (prompt ids, thinking ids, cuts, thinking sampler log-probs) per row
        for n in range(ro.num_rollouts):
            prompt = ro.prompt_ids_NP[n][ro.prompt_mask_NP[n].bool()].tolist()
            real = ro.attention_mask_NT[n].bool()
            ids = ro.completion_ids_NT[n][real].tolist()
            k = min(thinking_length(ids, tok.decode, self.think_end), budgets[-1])
            while k > 0 and ids[k - 1] in eos:  # an EOS ends the completion, not the thinking
                k -= 1
            lp = None if ro.sampling_logp_NT is None else ro.sampling_logp_NT[n][real][:k].tolist()
            chains.append((prompt, ids[:k], [min(b, k) for b in budgets], lp))
        contexts = [pr + th[:c] + cue for pr, th, cuts, _ in chains for c in cuts]
        answers = ctx.continue_ids(contexts, 1, self.summary_tokens)
        prompts, comps, texts, info, logps, truncated = [], [], [], [], [], []
        for b in range(B):
            for g in range(G):  # the thinking rows
                n = b * G + g
                pr, th, cuts, lp = chains[n]
                prompts.append(pr)
                comps.append(th)
                texts.append(tok.decode(th, skip_special_tokens=True))
                info.append({"role": "think", "g": g, "cuts": cuts, "p": p})
                logps.append(lp)
                truncated.append(bool(ro.truncated_N[n]))  # it ran out of tokens while thinking
            for g in range(G):  # the summaries, chain-major
                pr, th, cuts, _ = chains[b * G + g]
                for s, c in enumerate(cuts):
                    prompts.append(pr + th[:c] + cue)
                    ans, lp = answers[(b * G + g) * S + s]
                    comps.append(ans)
                    texts.append(tok.decode(ans, skip_special_tokens=True))
                    info.append({"role": "summary", "g": g, "s": s})
                    logps.append(None if lp is None else list(lp)[: len(ans)])
                    truncated.append(not ans or ans[-1] not in eos)
        W = G * (1 + S)
        built = rollouts_from_rows(
            prompts,
            comps,
            texts=texts,
            group_size=W,
            pad_token_id=ctx.pad_token_id,
            truncated=truncated,
            # the sampler's log-probs when every row has them (vLLM, train.async)
            logps=logps if all(x is not None for x in logps) else None,
            device=ro.completion_ids_NT.device,
        )
        scored = ctx.score(batch.examples, built)
        rewards_N, rewards_NK = scored.rewards_N.clone(), scored.rewards_NK.clone()
        scores, all_zero = [], True
        for b in range(B):  # a thinking row's reward: its last summary's score (metrics)
            for g in range(G):
                last = b * W + G + g * S + S - 1
                rewards_N[b * W + g] = rewards_N[last]
                rewards_NK[b * W + g] = rewards_NK[last]
            summ = scored.rewards_N[b * W + G : (b + 1) * W].view(G, S)
            all_zero = all_zero and bool((summ == 0).all())  # a NaN (unscored) is not a 0
            scores.append(torch.nan_to_num(summ.float(), nan=0.0))
        out = replace(
            batch,
            rollouts=replace(scored.rollouts, group_size=W),
            rewards_NK=rewards_NK,
            rewards_N=rewards_N,
            extra={**scored.extra, "budget": info},
        )
        if scores and all_zero and not self._warned_all_zero:
            self._warned_all_zero = True  # once per run: it may also be a hard start
            log.warning(
                "anytime_budget: every summary of this step scored 0. A summary row is scored "
                "on its answer alone: the thinking and the cue %r are in its prompt, so a "
                "reward that looks for them (a think-end marker, a format) in the completion "
                "gives 0 to every summary",
                self.summary_cue,
            )
        by_budget = torch.stack(scores).mean(dim=(0, 1)) if scores else torch.zeros(S)
        metrics = {
            f"anytime/score_at_{b_s}": float(v) for b_s, v in zip(budgets, by_budget, strict=True)
        }
        metrics["anytime/summaries"] = float(len(contexts))
        return out, metrics
