"""The collector: the only caller of the rollout engine and the reward functions.

It samples B prompt groups, scores them, and (for a filter registered with `refills`, DAPO's
dynamic sampling, arXiv 2503.14476) drops groups that carry no signal and samples new
prompts until the batch is full again, bounded by the filter's `max_tries`. It also draws
ReMax's greedy baseline (arXiv 2310.10505) when the estimator asks for `baseline_B`, and
keeps the first `rollout.num_train_samples` completions of each group for the update
(TTRL votes with all G samples and trains on k, arXiv 2504.16084). What it returns is
final: the planning stage never calls back into generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from grouprl.algorithms.advantages import combine_rewards
from grouprl.data.datasets import PromptDataset, PromptExample
from grouprl.registry import BoundComponent
from grouprl.rewards.base import RewardSet
from grouprl.rewards.scoring import score_rollouts
from grouprl.rollout.base import RolloutEngine, Rollouts, SamplingParams
from grouprl.training.distributed import Dist


@dataclass
class ScoredBatch:
    """B prompt groups of G completions with their rewards (rows of a group contiguous)."""

    examples: list[PromptExample]
    indices: list[int]  # dataset indices of the prompts (stable prompt keys)
    rollouts: Rollouts
    rewards_NK: Tensor
    rewards_N: Tensor  # combined with the reward weights (NaN if a weighted reward is NaN)
    errors: dict[str, int] = field(default_factory=dict)
    reward_metrics: dict[str, float] = field(default_factory=dict)  # e.g. ttrl/majority_ratio
    baseline_B: Tensor | None = None  # ReMax: combined reward of one greedy completion
    # columns reward functions added with log_extra (N values each), for the completions table
    extra: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.examples)

    def select_groups(self, groups: list[int]) -> ScoredBatch:
        G = self.rollouts.group_size
        rows = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long)
        return replace(
            self,
            examples=[self.examples[g] for g in groups],
            indices=[self.indices[g] for g in groups],
            rollouts=self.rollouts.select(rows),
            rewards_NK=self.rewards_NK[rows],
            rewards_N=self.rewards_N[rows],
            errors=dict(self.errors),
            reward_metrics=dict(self.reward_metrics),
            baseline_B=None if self.baseline_B is None else self.baseline_B[groups],
            extra=_rows_of(self.extra, rows.tolist()),
        )


def _rows_of(extra: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
    return {k: [v[i] if i < len(v) else None for i in rows] for k, v in extra.items()}


def first_per_group(batch: ScoredBatch, k: int) -> ScoredBatch:
    """Keep the first k completions of every group (TTRL trains on the first N_train of the
    N_vote samples that voted); the group size becomes k."""
    G = batch.rollouts.group_size
    rows = torch.tensor(
        [g * G + j for g in range(batch.num_groups) for j in range(k)], dtype=torch.long
    )
    return replace(
        batch,
        rollouts=replace(batch.rollouts.select(rows), group_size=k),
        rewards_NK=batch.rewards_NK[rows],
        rewards_N=batch.rewards_N[rows],
        extra=_rows_of(batch.extra, rows.tolist()),
    )


def _pad_to(x: Tensor, width: int, value: float, left: bool) -> Tensor:
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Stack rollouts of different widths: prompts stay left-padded, completions right-padded."""
    P = max(r.prompt_ids_NP.shape[1] for r in parts)
    T = max(r.completion_ids_NT.shape[1] for r in parts)
    sampled = [r.sampling_logp_NT for r in parts]
    return Rollouts(
        prompt_ids_NP=torch.cat([_pad_to(r.prompt_ids_NP, P, pad_token_id, True) for r in parts]),
        prompt_mask_NP=torch.cat([_pad_to(r.prompt_mask_NP, P, 0.0, True) for r in parts]),
        completion_ids_NT=torch.cat(
            [_pad_to(r.completion_ids_NT, T, pad_token_id, False) for r in parts]
        ),
        attention_mask_NT=torch.cat([_pad_to(r.attention_mask_NT, T, 0.0, False) for r in parts]),
        loss_mask_NT=torch.cat([_pad_to(r.loss_mask_NT, T, 0.0, False) for r in parts]),
        truncated_N=torch.cat([r.truncated_N for r in parts]),
        completions=[c for r in parts for c in r.completions],
        group_size=parts[0].group_size,
        sampling_logp_NT=None
        if any(x is None for x in sampled)
        else torch.cat([_pad_to(x, T, 0.0, False) for x in sampled]),  # type: ignore[arg-type]
        meta=None if any(r.meta is None for r in parts) else [m for r in parts for m in r.meta],  # type: ignore[union-attr]
        pad_N=_flags(parts, "pad_N"),
        sft_N=_flags(parts, "sft_N"),
        offpolicy_N=_flags(parts, "offpolicy_N"),
        fixed_adv_N=_flags(parts, "fixed_adv_N", fill=float("nan")),
        **_behavior_prompts(parts, pad_token_id),
    )


def _flags(parts: list[Rollouts], name: str, fill: bool | float = False) -> Tensor | None:
    """The parts' [N] row values `name` joined (`fill` where a part has none: False for the
    bool flags, NaN for fixed advantages)."""
    if all(getattr(r, name) is None for r in parts):
        return None
    dtype = torch.bool if isinstance(fill, bool) else torch.float32
    return torch.cat(
        [
            getattr(r, name).cpu()
            if getattr(r, name) is not None
            else torch.full((r.num_rollouts,), fill, dtype=dtype)
            for r in parts
        ]
    )


def _behavior_prompts(parts: list[Rollouts], pad_token_id: int) -> dict[str, Tensor | None]:
    """The parts' sampling prompts joined (a part without them: its own prompts)."""
    if all(r.behavior_prompt_ids_NP is None for r in parts):
        return {"behavior_prompt_ids_NP": None, "behavior_prompt_mask_NP": None}
    views = [r.behavior_view() for r in parts]
    P = max(v.prompt_ids_NP.shape[1] for v in views)
    return {
        "behavior_prompt_ids_NP": torch.cat(
            [_pad_to(v.prompt_ids_NP, P, pad_token_id, True) for v in views]
        ),
        "behavior_prompt_mask_NP": torch.cat(
            [_pad_to(v.prompt_mask_NP, P, 0.0, True) for v in views]
        ),
    }


# per-call counters of RewardSet that add up across refill rounds; other metrics (e.g.
# ttrl/majority_ratio) describe the batch's last round
_SUMMED = ("/timeouts", "/crashes", "/seconds")


def _merge_reward_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    out = dict(parts[-1])
    for key in {k for p in parts for k in p if k.endswith(_SUMMED)}:
        out[key] = float(sum(p.get(key, 0.0) for p in parts))
    return out


def concat_batches(parts: list[ScoredBatch], pad_token_id: int) -> ScoredBatch:
    if len(parts) == 1:
        return parts[0]
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p.errors.items():
            errors[k] = errors.get(k, 0) + v
    baselines = [p.baseline_B for p in parts]
    return ScoredBatch(
        examples=[e for p in parts for e in p.examples],
        indices=[i for p in parts for i in p.indices],
        rollouts=concat_rollouts([p.rollouts for p in parts], pad_token_id),
        rewards_NK=torch.cat([p.rewards_NK for p in parts]),
        rewards_N=torch.cat([p.rewards_N for p in parts]),
        errors=errors,
        reward_metrics=_merge_reward_metrics([p.reward_metrics for p in parts]),
        baseline_B=None if any(b is None for b in baselines) else torch.cat(baselines),  # type: ignore[arg-type]
        extra={
            key: [v for p in parts for v in p.extra.get(key, [None] * p.rollouts.num_rollouts)]
            for key in dict.fromkeys(k for p in parts for k in p.extra)
        },
    )


def pad_group(group: ScoredBatch, width: int, pad_token_id: int) -> ScoredBatch:
    """One group's rows followed by padding rows up to `width`: the group's prompt, an empty
    completion (masks 0), NaN rewards, `pad_N` True; `group_size` becomes `width`."""
    ro, n = group.rollouts, group.rollouts.num_rollouts
    k = width - n
    if k < 0:
        raise ValueError(f"pad_group: {n} rows do not fit in {width}")
    pad_N = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(k, dtype=torch.bool)])
    if k == 0:
        return replace(group, rollouts=replace(ro, group_size=width, pad_N=pad_N))
    first = torch.zeros(k, dtype=torch.long)
    T = ro.completion_ids_NT.shape[1]
    like = ro.completion_ids_NT
    blank = Rollouts(
        prompt_ids_NP=ro.prompt_ids_NP[first],
        prompt_mask_NP=ro.prompt_mask_NP[first],
        completion_ids_NT=torch.full((k, T), pad_token_id, dtype=like.dtype, device=like.device),
        attention_mask_NT=ro.attention_mask_NT.new_zeros(k, T),
        loss_mask_NT=ro.loss_mask_NT.new_zeros(k, T),
        truncated_N=torch.zeros(k, dtype=torch.bool, device=ro.truncated_N.device),
        completions=[""] * k,
        group_size=width,
        sampling_logp_NT=None
        if ro.sampling_logp_NT is None
        else ro.sampling_logp_NT.new_zeros(k, T),
    )
    both = concat_rollouts([replace(ro, pad_N=None), blank], pad_token_id)
    nan_K = torch.full((k, group.rewards_NK.shape[1]), float("nan"), dtype=group.rewards_NK.dtype)
    return replace(
        group,
        rollouts=replace(both, group_size=width, pad_N=pad_N),
        rewards_NK=torch.cat([group.rewards_NK, nan_K.to(group.rewards_NK.device)]),
        rewards_N=torch.cat(
            [
                group.rewards_N,
                torch.full(
                    (k,), float("nan"), dtype=group.rewards_N.dtype, device=group.rewards_N.device
                ),
            ]
        ),
        extra={key: list(v) + [None] * k for key, v in group.extra.items()},
    )


def collect_inputs(batch: ScoredBatch, weights_K: Tensor) -> dict[str, Any]:
    """The `collect`-stage inputs (grouprl.inputs) of a scored batch, for a refilling filter."""
    B, G = batch.num_groups, batch.rollouts.group_size
    return {
        "rewards_BG": batch.rewards_N.view(B, G),
        "rewards_BGK": batch.rewards_NK.view(B, G, -1),
        "weights_K": weights_K,
        "lengths_BG": batch.rollouts.lengths_N.view(B, G),
        "truncated_BG": batch.rollouts.truncated_N.view(B, G),
        "prompt_keys_B": [str(i) for i in batch.indices],
    }


@dataclass
class StrategyContext:
    """What a rollout strategy (training/strategies/) may use: the step, more
    sampling, prompt rendering."""

    step: int
    # (plain examples, generation texts, completions per text[, temperature=]) -> scored
    # batch of them; temperature: this call's own sampling temperature (default: the run's)
    sample: Callable[..., ScoredBatch]
    render: Callable[[Any], str]  # prompt (string or messages) -> model text
    pad_token_id: int
    # (token-id contexts, continuations per context[, max new tokens]) -> [(ids, sampler
    # log-probs or None)], through each one's first EOS or the cap (default and upper bound:
    # rollout.max_new_tokens; engines that declare `multi_turn`); None otherwise
    continue_ids: Callable[..., list[tuple[list[int], Any]]] | None = None
    # (plain examples, rollouts of them, G per example) -> scored batch
    score: Callable[[list[PromptExample], Rollouts], ScoredBatch] | None = None
    tokenizer: Any = None
    group_size: int = 0  # rollout.num_generations (a strategy may sample fewer first)
    # (texts, max new tokens) -> one completion of each, as text (e.g. SAGE's hints)
    write: Callable[[list[str], int], list[str]] | None = None
    max_new_tokens: int = 0  # rollout.max_new_tokens (a strategy's budgets are shares of it)


class Collector:
    """Samples and scores the groups of one step (see the module docstring)."""

    def __init__(
        self,
        *,
        engine: RolloutEngine,
        rewards: RewardSet,
        dataset: PromptDataset,
        sampler: Any,  # data/samplers.py: next(n), update(indices, rewards_BG)
        sampling: SamplingParams,
        pad_token_id: int,
        refill: BoundComponent | None = None,
        want_baseline: bool = False,
        num_train_samples: int = 0,
        dist: Dist | None = None,
        device: torch.device | str = "cpu",
        missing_rewards: str = "skip",
        multi_turn: Any = None,
        strategy: Any = None,
        render: Any = None,
        row_columns: Any = None,
    ) -> None:
        self.engine, self.rewards, self.dataset = engine, rewards, dataset
        self.sampler, self.sampling = sampler, sampling
        self.pad_token_id = pad_token_id
        self.refill = refill
        self.want_baseline = want_baseline
        self.num_train_samples = num_train_samples
        self.dist = dist or Dist()
        self.device = device  # where a gathered batch's rollouts go (the policy's device)
        self.missing_rewards = missing_rewards  # combine_rewards' rule (train.missing_rewards)
        self.multi_turn = multi_turn  # data.environment: rollout/multiturn.py's MultiTurn
        # rollout.strategy (training/strategies/): None = sample once
        self.strategy = strategy
        self.render = render  # prompt -> model text, for prompts a strategy writes
        # Rollouts -> {column: N values} given to the rewards (the EMA reference's scores)
        self.row_columns = row_columns
        self._seed: int | None = None
        self._calls = 0
        self._step = 0
        self._strategy_metrics: dict[str, float] = {}
        self._sampled = 0  # completions generated this collection (all processes)

    def state_dict(self) -> dict[str, Any]:
        """The data cursor a checkpoint keeps: the prompt sampler's state, plus the rollout
        strategy's (`rollout_strategy`) when it has any (e.g. icl_seed's corpus)."""
        state = dict(self.sampler.state_dict())
        if self.strategy is not None and hasattr(self.strategy, "state_dict"):
            state["rollout_strategy"] = self.strategy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        saved = state.get("rollout_strategy")
        if (
            saved is not None
            and self.strategy is not None
            and hasattr(self.strategy, "load_state_dict")
        ):
            self.strategy.load_state_dict(saved)

    def begin(self) -> None:
        """In the training thread, right before a collection starts (see Strategy.begin)."""
        if self.strategy is not None:
            self.strategy.begin()

    def collect(
        self, B: int, *, seed: int | None = None, step: int = 0
    ) -> tuple[ScoredBatch, dict[str, float]]:
        """B scored groups ready for planning, and the collector's metrics. With `seed`, every
        sampling call of this collection draws from a seed of (seed, call, rank) instead of
        the global RNG (train.async: training/pipeline.py). `step`: the step it is for."""
        self._seed, self._calls, self._step = seed, 0, step
        self._strategy_metrics = {}
        self._sampled = 0
        batch, stats = self._fill(B) if self.refill is not None else (self._sample(B), {})
        if self.want_baseline:
            batch.baseline_B = self._greedy_baseline(batch)
        k = self.num_train_samples
        if 0 < k < batch.rollouts.group_size:
            batch = first_per_group(batch, k)
        out = {**stats, **self.sampler.metrics(), **self._strategy_metrics}
        out["rollouts/sampled"] = float(self._sampled)  # refills, hints, exits included
        return batch, out

    def _params(self, params: SamplingParams) -> SamplingParams:
        """This call's sampling parameters: its own seed when the collection has one."""
        if self._seed is None:
            return params
        self._calls += 1
        mixed = (self._seed + self._calls * 0x94D049BB133111EB + self.dist.rank * 7919) % 2**62
        return replace(params, seed=mixed)

    def _score(self, examples: list[PromptExample], ro: Rollouts) -> tuple[Tensor, Any]:
        extra = self.row_columns(ro) if self.row_columns is not None else None
        res = score_rollouts(self.rewards, examples, ro, self.sampling.max_new_tokens, extra)
        combined = combine_rewards(
            res.rewards_NK, self.rewards.weights_K, missing=self.missing_rewards
        )
        return combined, res

    def _sample(self, n_prompts: int) -> ScoredBatch:
        """n prompts' groups, sampled and scored. With several ranks every rank draws the same
        n prompts, samples and scores its share, and the shares are all-gathered: every rank
        returns the same global batch (training/distributed.py)."""
        indices = self.sampler.next(n_prompts)
        # a budget sampler (knapsack) gives each prompt its own number of rollouts; groups
        # are then padded to the largest (Rollouts.pad_N)
        budget = getattr(self.sampler, "budget", None)
        counts = budget(indices, self.sampling.num_generations) if budget is not None else None
        width = max(counts) if counts else None
        if not self.dist.active or counts is not None:
            # ragged groups: every process walks the same count buckets; each bucket's
            # texts are split over the processes and gathered there (_generate)
            batch = self._sample_these(indices, counts, width)
        else:
            shard = list(self.dist.shard(len(indices)))
            mine = [indices[i] for i in shard]
            mine_counts = [counts[i] for i in shard] if counts is not None else None
            part = self._sample_these(mine, mine_counts, width) if mine else None
            if part is not None:
                part = replace(part, rollouts=part.rollouts.to("cpu"))
            parts = [p for p in self.dist.gather(part) if p is not None]
            batch = concat_batches(parts, self.pad_token_id)
            batch = replace(batch, rollouts=batch.rollouts.to(self.device))
        if counts is None:  # ragged groups were counted as they were sampled (_sample_texts)
            self._sampled += int(batch.rollouts.real_N.sum())
        # every process sees the whole batch, so every sampler's state stays the same
        self.sampler.update(batch.indices, batch.rewards_N.view(batch.num_groups, -1))
        if self.strategy is not None:
            ctx = StrategyContext(
                step=self._step,
                sample=self._sample_texts,
                render=self.render,
                pad_token_id=self.pad_token_id,
                continue_ids=self._continue_ids
                if getattr(self.engine, "multi_turn", False)
                else None,
                score=self._scored,
                tokenizer=getattr(self.engine, "tokenizer", None),
                group_size=self.sampling.num_generations,
                write=self._write,
                max_new_tokens=self.sampling.max_new_tokens,
            )
            batch, metrics = self.strategy(batch, ctx)
            for k, v in metrics.items():  # counts add up over refill rounds; shares and
                # means are the last round's
                shared = any(w in k for w in ("frac", "mean", "used_level"))
                self._strategy_metrics[k] = v if shared else self._strategy_metrics.get(k, 0.0) + v
        return batch

    def _generate(self, texts: list[str], params: SamplingParams) -> Rollouts:
        """Completions of `texts` (params.num_generations each); with several processes each
        samples its share and all get all of them, in order."""
        if not self.dist.active:
            return self.engine.generate(texts, params).to(self.device)
        mine = [texts[i] for i in self.dist.shard(len(texts))]
        part = self.engine.generate(mine, params).to("cpu") if mine else None
        parts = [p for p in self.dist.gather(part) if p is not None]
        return concat_rollouts(parts, self.pad_token_id).to(self.device)

    def _sample_ragged(
        self, indices: list[int], examples: list[PromptExample], counts: list[int], width: int
    ) -> ScoredBatch:
        """counts[b] rollouts of prompt b, each group padded to `width` rows (padding rows:
        the group's prompt, no completion, NaN rewards, `pad_N` True). Prompts with the same
        count are sampled (and scored) together."""
        by_count: dict[int, list[int]] = {}
        for b, n in enumerate(counts):
            by_count.setdefault(n, []).append(b)
        groups: dict[int, ScoredBatch] = {}
        errors: dict[str, int] = {}
        metrics: list[dict[str, float]] = []
        for n, bs in sorted(by_count.items()):
            part = self._sample_texts([examples[b] for b in bs], [examples[b].text for b in bs], n)
            for key, v in part.errors.items():
                errors[key] = errors.get(key, 0) + v
            metrics.append(part.reward_metrics)
            part = replace(part, errors={}, reward_metrics={})
            for j, b in enumerate(bs):
                rows = torch.arange(j * n, (j + 1) * n)
                groups[b] = replace(
                    part,
                    examples=[examples[b]],
                    rollouts=part.rollouts.select(rows),
                    rewards_NK=part.rewards_NK[rows],
                    rewards_N=part.rewards_N[rows],
                    extra=_rows_of(part.extra, rows.tolist()),
                )
        padded = [pad_group(groups[b], width, self.pad_token_id) for b in range(len(examples))]
        batch = concat_batches(padded, self.pad_token_id)
        return replace(
            batch,
            indices=list(indices),
            rollouts=replace(batch.rollouts, group_size=width),
            errors=errors,
            reward_metrics=_merge_reward_metrics(metrics),
        )

    def _sample_texts(
        self,
        examples: list[PromptExample],
        texts: list[str],
        n: int,
        *,
        temperature: float | None = None,
    ) -> ScoredBatch:
        """n completions of each text, scored against the plain `examples` (a strategy's
        hinted prompts: the rewards see the example's own prompt and columns)."""
        params = replace(self.sampling, num_generations=n)
        if temperature is not None:
            params = replace(params, temperature=temperature)
        ro = self._generate(texts, self._params(params))
        self._sampled += ro.num_rollouts
        return self._scored(examples, ro)

    def _continue_ids(
        self, contexts: list[list[int]], n: int, max_tokens: int | None = None
    ) -> list[tuple[list[int], Any]]:
        """n continuations of each token-id context (all processes get all, in order), of at
        most `max_tokens` (within rollout.max_new_tokens): a short answer is not generated
        long and then cut."""
        cap = self.sampling.max_new_tokens
        if max_tokens is not None:
            cap = max(min(cap, int(max_tokens)), 1)
        params = self._params(replace(self.sampling, num_generations=n, max_new_tokens=cap))
        self._sampled += len(contexts) * n
        if not self.dist.active:
            return self.engine.sample_token_ids(contexts, params)
        idx = list(self.dist.shard(len(contexts)))
        mine = self.engine.sample_token_ids([contexts[i] for i in idx], params) if idx else []
        return [x for part in self.dist.gather(mine) for x in part]

    def _scored(self, examples: list[PromptExample], ro: Rollouts) -> ScoredBatch:
        """`ro` (G rows per example) scored against `examples`, as a batch of no dataset
        index (a strategy's extra rollouts); on the policy's device. With several processes
        each scores its share of the examples' groups and all get every score (the same
        rows everywhere: the same decisions), so a judge is paid once per row."""
        if not self.dist.active or not examples:
            return self._scored_here(examples, ro)
        G = ro.num_rollouts // len(examples)
        mine = self.dist.shard(len(examples))
        part = None
        if len(mine):
            rows = torch.arange(mine.start * G, mine.stop * G)
            part = self._scored_here([examples[i] for i in mine], ro.select(rows))
            part = replace(
                part,
                rollouts=part.rollouts.to("cpu"),
                rewards_NK=part.rewards_NK.cpu(),
                rewards_N=part.rewards_N.cpu(),
            )
        parts = [p for p in self.dist.gather(part) if p is not None]
        batch = concat_batches(parts, self.pad_token_id)
        # rewards stay where scoring put them (the CPU), as on one process
        return replace(
            batch, rollouts=replace(batch.rollouts.to(self.device), group_size=ro.group_size)
        )

    def _scored_here(self, examples: list[PromptExample], ro: Rollouts) -> ScoredBatch:
        """`_scored` in this process alone."""
        ro = ro.to(self.device)
        rewards_N, res = self._score(examples, ro)
        return ScoredBatch(
            examples=examples,
            indices=[-1] * len(examples),
            rollouts=ro,
            rewards_NK=res.rewards_NK,
            rewards_N=rewards_N,
            errors=dict(res.errors),
            reward_metrics=dict(res.metrics),
            extra=dict(res.extra),
        )

    def _write(self, texts: list[str], max_tokens: int) -> list[str]:
        """One completion of each text, as text (a strategy's own writing, e.g. hints)."""
        params = replace(self.sampling, num_generations=1, max_new_tokens=max_tokens)
        self._sampled += len(texts)
        return self._generate(texts, self._params(params)).completions

    def _sample_these(
        self, indices: list[int], counts: list[int] | None = None, width: int | None = None
    ) -> ScoredBatch:
        examples = [self.dataset[i] for i in indices]
        if counts is not None:
            return self._sample_ragged(indices, examples, counts, width or max(counts))
        params = self._params(self.sampling)
        first = self.strategy.samples_per_prompt if self.strategy is not None else None
        if first:
            params = replace(params, num_generations=int(first))
        if self.multi_turn is not None:
            ro = self.multi_turn.generate(self.engine, examples, params).to(self.device)
        else:
            ro = self.engine.generate([ex.text for ex in examples], params)
        rewards_N, res = self._score(examples, ro)
        return ScoredBatch(
            examples=examples,
            indices=indices,
            rollouts=ro,
            rewards_NK=res.rewards_NK,
            rewards_N=rewards_N,
            errors=dict(res.errors),
            reward_metrics=dict(res.metrics),
            extra=dict(res.extra),
        )

    def _fill(self, B: int) -> tuple[ScoredBatch, dict[str, float]]:
        """B groups that the refilling filter keeps, within its `max_tries` extra rounds."""
        refill = self.refill
        assert refill is not None
        parts, kept, dropped, tries = [], 0, 0, 0
        while True:
            batch = self._sample(B - kept)
            tries += 1
            out = refill(collect_inputs(batch, self.rewards.weights_K))
            keep = [g for g in range(batch.num_groups) if not bool(out.drop_groups_B[g])]
            dropped += batch.num_groups - len(keep)
            if keep:
                parts.append(batch.select_groups(keep))
                kept += len(keep)
            if kept >= B or tries > out.max_tries:
                break
        stats = {
            f"{refill.name}/dropped_groups": float(dropped),
            f"{refill.name}/sampling_rounds": float(tries),
            f"{refill.name}/kept_groups": float(kept),
        }
        if not parts:  # every group was dropped: train on the last batch (its advantages are 0)
            return batch, stats
        return concat_batches(parts, self.pad_token_id), stats

    def probe(
        self, n: int, *, chunk: int = 64, progress: Callable[[int, int], None] | None = None
    ) -> tuple[list[str], list[float]]:
        """n samples of every training prompt with the current policy, scored: each prompt's
        key and its number of successes (reward > 0, NaN is none), for an estimator's
        offline start (SPO). Prompts go `chunk` at a time; `progress(done, total)`."""
        keys: list[str] = []
        wins: list[float] = []
        total = len(self.dataset)
        for start in range(0, total, chunk):
            idx = list(range(start, min(start + chunk, total)))
            examples = [self.dataset[i] for i in idx]
            params = self._params(replace(self.sampling, num_generations=n))
            ro = self._generate([ex.text for ex in examples], params)
            self._sampled += ro.num_rollouts
            rewards_N, _ = self._score(examples, ro)
            ok_BN = (rewards_N.view(len(idx), n) > 0).float()  # NaN > 0 is False
            keys += [str(i) for i in idx]
            wins += ok_BN.sum(dim=1).tolist()
            if progress is not None:
                progress(idx[-1] + 1, total)
        return keys, wins

    def _greedy_baseline(self, batch: ScoredBatch) -> Tensor:
        """ReMax's baseline: the combined reward of one greedy completion per prompt."""
        params = replace(self.sampling, num_generations=1, temperature=0.0)
        ro = self.engine.generate([ex.text for ex in batch.examples], self._params(params))
        self._sampled += ro.num_rollouts
        return self._score(batch.examples, ro)[0]
