"""Continuation: strategies that sample from a partial completion (a solution prefix, an
early exit of a chain, a segment cut point) with the engine's `sample_token_ids`."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from grouprl.rollout.base import rollouts_from_rows
from grouprl.training.collect import ScoredBatch, StrategyContext
from grouprl.training.strategies.base import (
    ROLLOUT_STRATEGIES,
    Strategy,
    _hint_levels,
    replace_rows,
    require_continuation,
    thinking_length,
)


def _eos_ids(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@ROLLOUT_STRATEGIES.register("dataset_reset")
class DatasetReset(Strategy):
    """Dataset Reset Policy Optimization: some rollouts start from a prefix of a reference
    solution instead of the bare prompt.

    "Dataset Reset Policy Optimization for RLHF" (DR-PO), arXiv 2404.08495 (abstract: the
    policy is reset to states of the offline data; the rule below is a reading). For each
    group, the last `reset_num` rollouts are replaced: h ~ U{1, ..., ⌊max_frac·L⌋} tokens of
    the row's `solution_column` (L its length in tokens) are appended to the prompt, and
    the policy continues from there. The prefix is context (in the row's prompt, never
    trained); the rewards read prefix + continuation. Rows without a solution keep their
    rollouts. Needs an engine that continues token ids (hf, vllm).
    """

    needs_continuation = True

    def __init__(
        self,
        *,
        solution_column: str = "solution",
        reset_num: int = 4,
        max_frac: float = 0.5,
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        if reset_num < 1:
            raise ValueError(f"rollout.strategy.reset_num: must be >= 1, got {reset_num}")
        if not 0.0 < max_frac < 1.0:
            raise ValueError(f"rollout.strategy.max_frac: must be in (0, 1), got {max_frac}")
        self.solution_column, self.reset_num = solution_column, reset_num
        self.max_frac, self.warmup_steps, self.seed = max_frac, warmup_steps, seed

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        B, G = batch.num_groups, batch.rollouts.group_size
        if ctx.step < self.warmup_steps:
            return batch, {}
        require_continuation(ctx, "dataset_reset")
        tok = ctx.tokenizer
        k = min(self.reset_num, G)
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        todo, contexts, prefixes, prompts = [], [], [], []
        for g in range(B):
            sol = batch.examples[g].columns.get(self.solution_column)
            if not isinstance(sol, str) or not sol:
                continue
            sol_ids = tok(sol, add_special_tokens=False)["input_ids"]
            cap = int(self.max_frac * len(sol_ids))
            if cap < 1:
                continue
            row = g * G  # the group's prompt ids, unpadded
            p_mask = batch.rollouts.prompt_mask_NP[row].bool()
            prompt = batch.rollouts.prompt_ids_NP[row][p_mask].tolist()
            for _ in range(k):
                h = int(torch.randint(1, cap + 1, (1,), generator=rng))
                prefixes.append(sol_ids[:h])
                contexts.append(prompt + sol_ids[:h])
                prompts.append(prompt)
            todo.append(g)
        metrics: dict[str, float] = {"reset/groups": float(len(todo))}
        if not todo:
            return batch, metrics
        outs = ctx.continue_ids(contexts, 1)
        texts = [
            tok.decode(pre, skip_special_tokens=True) + tok.decode(ids, skip_special_tokens=True)
            for pre, (ids, _) in zip(prefixes, outs, strict=True)
        ]
        ro = rollouts_from_rows(
            contexts,  # the prefix is context: in the row's prompt
            [ids for ids, _ in outs],
            texts=texts,
            group_size=k,
            pad_token_id=ctx.pad_token_id,
            eos_ids=_eos_ids(tok),
        )
        new = ctx.score([batch.examples[g] for g in todo], ro)
        rows = [g * G + G - k + j for g in todo for j in range(k)]
        batch = replace_rows(batch, new, rows, list(range(len(rows))), ctx.pad_token_id)
        levels = _hint_levels(batch)
        for r in rows:
            levels[r] = 1
        batch.extra["hint_level"] = levels
        metrics["reset/prefix_tokens_mean"] = sum(map(len, prefixes)) / len(prefixes)
        ok = new.rewards_N[torch.isfinite(new.rewards_N)]
        metrics["reset/reward_mean"] = float(ok.mean()) if ok.numel() else 0.0
        return batch, metrics


def decay_exit_rewards(correct_G: list[bool]) -> list[float]:
    """S-GRPO's serial reward, the group ordered from the earliest exit to the full answer:
    walking early -> late and counting the correct answers so far (N_right), a correct
    answer gets 1 / 2^(N_right − 1), a wrong one 0."""
    out, n_right = [], 0
    for ok in correct_G:
        if ok:
            n_right += 1
            out.append(1.0 / 2 ** (n_right - 1))
        else:
            out.append(0.0)
    return out


EXIT_TEXT = "Time is limited, stop thinking and start answering.\n</think>\n\n"


@ROLLOUT_STRATEGIES.register("serial_exit")
class SerialExit(Strategy):
    """S-GRPO: a serial group of early exits from one chain of thought, rewarded more for
    answering correctly earlier.

    "S-GRPO: Early Exit via Reinforcement Learning in Reasoning Models", arXiv 2505.07686
    (the form of a secondary analysis; no code: a reading). For each prompt, one sampled
    rollout is the full chain of thought; G − 1 exit
    positions P_j are drawn without repeats from the thinking tokens (those before
    `think_end`, else the whole completion); at each, `exit_text` is appended and the
    policy writes the answer. The group, ordered from the earliest exit to the full
    answer, is rewarded by `decay_exit_rewards` on the correctness the rewards give
    (combined reward >= success_at): 1, 1/2, 1/4, ... for the correct answers in that
    order, 0 for wrong ones. Trained tokens: the thinking prefix and the answer (the
    injected exit text is context). Pair it with `advantage: {name: grpo, scale: none}`
    (the paper's A = r − mean). Needs an engine that continues token ids (hf, vllm).
    Only one completion per prompt is sampled first (`samples_per_prompt`); the group of
    G = rollout.num_generations rows is built from it.
    """

    needs_continuation = True
    samples_per_prompt = 1

    def __init__(
        self,
        *,
        exit_text: str = EXIT_TEXT,
        think_end: str = "</think>",
        answer_tokens: int = 0,
        success_at: float = 1.0,
        seed: int = 0,
    ) -> None:
        if answer_tokens < 0:
            raise ValueError(f"rollout.strategy.answer_tokens: must be >= 0, got {answer_tokens}")
        self.exit_text, self.think_end = exit_text, think_end
        self.answer_tokens, self.success_at, self.seed = answer_tokens, success_at, seed

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        require_continuation(ctx, "serial_exit")
        tok, ro = ctx.tokenizer, batch.rollouts
        B, first = batch.num_groups, ro.group_size  # first: the chains sampled per prompt
        G = ctx.group_size or first
        exit_ids = tok(self.exit_text, add_special_tokens=False)["input_ids"]
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        plan: list[tuple[int, list[int], list[int], list[int]]] = []  # (g, prompt, cot, exits)
        for g in range(B):
            row = g * first
            prompt = ro.prompt_ids_NP[row][ro.prompt_mask_NP[row].bool()].tolist()
            cot = ro.completion_ids_NT[row][ro.attention_mask_NT[row].bool()].tolist()
            n_think = thinking_length(cot, tok.decode, self.think_end)
            m = min(G - 1, max(n_think - 1, 0))
            cand = torch.randperm(max(n_think - 1, 0), generator=rng)[:m] + 1  # P in 1..n−1
            plan.append((g, prompt, cot, sorted(int(x) for x in cand)))
        contexts = [pr + cot[:pj] + exit_ids for _, pr, cot, exits in plan for pj in exits]
        answers = ctx.continue_ids(contexts, 1, self.answer_tokens or None) if contexts else []
        # rows per group: the exits, then the full answer; groups short of exits (thinking
        # too short) repeat the full answer, counted once in the reward walk
        prompts, comps, masks, texts, sources = [], [], [], [], []
        it = iter(answers)
        for g, pr, cot, exits in plan:
            for pj in exits:
                ans = next(it)[0]
                ids = cot[:pj] + exit_ids + ans
                prompts.append(pr)
                comps.append(ids)
                masks.append([1.0] * pj + [0.0] * len(exit_ids) + [1.0] * len(ans))
                texts.append(tok.decode(ids, skip_special_tokens=True))
                sources.append(("exit", g))
            for _ in range(G - len(exits)):
                prompts.append(pr)
                comps.append(cot)
                masks.append([1.0] * len(cot))
                texts.append(ro.completions[g * first])
                sources.append(("full", g))
        new = ctx.score(
            batch.examples,
            rollouts_from_rows(
                prompts,
                comps,
                texts=texts,
                loss_masks=masks,
                group_size=G,
                pad_token_id=ctx.pad_token_id,
                eos_ids=_eos_ids(tok),
            ),
        )
        correct = (new.rewards_N >= self.success_at).tolist()
        decayed: list[float] = []
        for g, (_, _, _, exits) in enumerate(plan):
            rows = correct[g * G : (g + 1) * G]
            walk = decay_exit_rewards(rows[: len(exits) + 1])
            # repeats of the full answer (a short chain of thought) share its reward
            decayed += walk + [walk[-1]] * (G - len(exits) - 1)
        rewards_N = torch.tensor(decayed, dtype=new.rewards_N.dtype)
        rewards_N = torch.where(torch.isnan(new.rewards_N), new.rewards_N, rewards_N)
        out = replace(
            batch,
            rollouts=new.rollouts,
            rewards_NK=new.rewards_NK,
            rewards_N=rewards_N,
            extra={**new.extra, "exit": [kind == "exit" for kind, _ in sources]},
        )
        n_exits = sum(len(e) for *_, e in plan)
        metrics = {
            "serial_exit/exits_per_group": n_exits / max(B, 1),
            "serial_exit/correct_exit_frac": sum(
                c for c, (kind, _) in zip(correct, sources, strict=True) if kind == "exit"
            )
            / max(n_exits, 1),
        }
        return out, metrics


@ROLLOUT_STRATEGIES.register("segment_mc")
class SegmentMC(Strategy):
    """Segment Policy Optimization (SPO-chain): Monte-Carlo values at cut points of each
    completion, for the `segment` advantage.

    "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large
    Language Models", arXiv 2505.23564 (authors' code: AIFrameResearch/SPO,
    `math_episode_generator_with_mc_advantages.py`). Cut points: the positions t − 1 whose
    sampled token had probability < `prob_cut` under the sampler (every `every`-th of
    them), when the engine reports its log-probs; otherwise every `interval` tokens (ours).
    V(cut) = the mean reward of `mc_rollouts` continuations of prompt + completion[:cut]
    (scored on prefix + continuation); V at the end is the completion's own reward; V at
    the start is its group's mean reward (ours: the code values the prompt only when it has
    a prompt value). Each row gets `extra["segment_values"]`: [[position, value], ...].
    Needs an engine that continues token ids (hf, vllm).
    """

    needs_continuation = True

    def __init__(
        self,
        *,
        mc_rollouts: int = 9,
        interval: int = 5,
        prob_cut: float = 0.9,
        every: int = 5,
        max_cuts: int = 16,
    ) -> None:
        for key, v in (
            ("mc_rollouts", mc_rollouts),
            ("interval", interval),
            ("every", every),
            ("max_cuts", max_cuts),
        ):
            if v < 1:
                raise ValueError(f"rollout.strategy.{key}: must be >= 1, got {v}")
        if not 0.0 < prob_cut <= 1.0:
            raise ValueError(f"rollout.strategy.prob_cut: must be in (0, 1], got {prob_cut}")
        self.mc, self.interval, self.prob_cut = mc_rollouts, interval, prob_cut
        self.every, self.max_cuts = every, max_cuts

    def cut_points(self, n: int, logp_T: list[float] | None) -> list[int]:
        """Cut positions in 1..n−1 (a prefix of that many tokens is valued)."""
        if logp_T is not None:
            low = [t for t in range(1, n) if math.exp(logp_T[t - 1]) < self.prob_cut]
            cuts = low[self.every - 1 :: self.every]
        else:
            cuts = list(range(self.interval, n, self.interval))
        return cuts[: self.max_cuts]

    def __call__(self, batch: ScoredBatch, ctx: StrategyContext) -> tuple[ScoredBatch, dict]:
        require_continuation(ctx, "segment_mc")
        tok, ro = ctx.tokenizer, batch.rollouts
        B, G = batch.num_groups, ro.group_size
        r_BG = batch.rewards_N.view(B, G).double()
        contexts, owners, prefixes = [], [], []
        cuts_N: list[list[int]] = []
        for i in range(ro.num_rollouts):
            real = ro.attention_mask_NT[i].bool()
            comp = ro.completion_ids_NT[i][real].tolist()
            logp = None
            if ro.sampling_logp_NT is not None:
                logp = ro.sampling_logp_NT[i][real].tolist()
            cuts = self.cut_points(len(comp), logp)
            cuts_N.append(cuts)
            prompt = ro.prompt_ids_NP[i][ro.prompt_mask_NP[i].bool()].tolist()
            for c in cuts:
                contexts.append(prompt + comp[:c])
                prefixes.append(comp[:c])
                owners.append(i)
        values: dict[tuple[int, int], float] = {}
        if contexts:
            outs = ctx.continue_ids(contexts, self.mc)
            K = len(contexts)
            texts = [
                tok.decode(prefixes[k] + outs[k * self.mc + j][0], skip_special_tokens=True)
                for k in range(K)
                for j in range(self.mc)
            ]
            examples = [batch.examples[owners[k] // G] for k in range(K)]
            mc = ctx.score(
                examples,
                rollouts_from_rows(
                    [contexts[k] for k in range(K) for _ in range(self.mc)],
                    [outs[k * self.mc + j][0] for k in range(K) for j in range(self.mc)],
                    texts=texts,
                    group_size=self.mc,
                    pad_token_id=ctx.pad_token_id,
                    eos_ids=_eos_ids(tok),
                ),
            )
            v_K = torch.nanmean(mc.rewards_N.view(K, self.mc).double(), dim=1)
            k = 0
            for i, cuts in enumerate(cuts_N):
                for c in cuts:
                    values[(i, c)] = float(v_K[k])
                    k += 1
        seg: list[list[list[float]]] = []
        for i, cuts in enumerate(cuts_N):
            g = i // G
            v0 = float(torch.nanmean(r_BG[g])) if bool(torch.isfinite(r_BG[g]).any()) else 0.0
            n = int(ro.attention_mask_NT[i].sum())
            row = [[0.0, v0]] + [[float(c), values[(i, c)]] for c in cuts]
            r = float(batch.rewards_N[i])
            row.append([float(n), r if math.isfinite(r) else v0])
            seg.append(row)
        batch.extra["segment_values"] = seg
        n_cuts = sum(map(len, cuts_N))
        return batch, {
            "segment/cuts_per_row": n_cuts / max(ro.num_rollouts, 1),
            "segment/mc_rollouts": float(n_cuts * self.mc),
        }
