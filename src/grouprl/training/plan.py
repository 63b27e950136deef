"""The planning stage: one scored batch in, one training batch out, on the whole batch.

Advantages and their modifiers, sample filters, the token mask and regularizer calibration
all run here ONCE over the whole optimizer batch, before micro-batching, so that group
statistics, quantiles and top-k selections never depend on how the update is split. Each
component gets the inputs it names (`grouprl.inputs`), computed on demand: the no-grad
pre-pass of the sampling policy runs only when a component asks for log-probs or entropy.

Planning runs on the CPU whatever the model's device: every input is handed over as a CPU
tensor (a few floats per completion or token), so components need no device logic and
their state (trackers, calibrated bounds) stays on the CPU with the checkpoints; the
TrainBatch moves its planned tensors to the rollouts' device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grouprl.algorithms.types import BatchNorm
from grouprl.components import Components
from grouprl.rewards.answers import extract_answer
from grouprl.rollout.base import Rollouts, rollouts_from_rows
from grouprl.training.collect import ScoredBatch

# (rollouts, with_entropy, temperature_scale=1.0) -> {"old_logp_NT": [N, T], "entropy_NT":
# [N, T] (with entropy)}; a scale != 1 re-scores the tokens at that multiple of the sampling
# temperature
PrePass = Callable[..., dict[str, Tensor]]


@dataclass
class TrainBatch:
    """What the learner trains on: rollouts, advantages, weights and exact normalizers.

    policy_mask_NT: the tokens the policy term is normalized over (the loss mask, or only
                    the selected tokens for a token mask with denominator "selected").
    policy_norm / reg_norm: whole-batch normalizers of the policy term / the regularizers.
    old_logp_NT:    the pre-pass log-probs, when one ran (reused as π_old with several
                    iterations: same forward, same micro-batches, so the ratio starts at 1).
    """

    rollouts: Rollouts
    adv_N: Tensor
    rewards_N: Tensor | None
    token_weight_NT: Tensor | None
    policy_mask_NT: Tensor
    policy_norm: BatchNorm
    reg_norm: BatchNorm
    old_logp_NT: Tensor | None = None
    item_index_NT: Tensor | None = None  # each token's item, for a `needs_items` loss

    @property
    def loss_mask_NT(self) -> Tensor:
        return self.rollouts.loss_mask_NT

    def rows(self, sl: slice) -> TrainBatch:
        """Rows `sl` (one rank's groups) with the whole batch's normalizers kept."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[sl]

        return TrainBatch(
            rollouts=self.rollouts.select(sl),
            adv_N=self.adv_N[sl],
            rewards_N=cut(self.rewards_N),
            token_weight_NT=cut(self.token_weight_NT),
            policy_mask_NT=self.policy_mask_NT[sl],
            policy_norm=self.policy_norm,
            reg_norm=self.reg_norm,
            old_logp_NT=cut(self.old_logp_NT),
            item_index_NT=cut(self.item_index_NT),
        )


class StepInputs(Mapping[str, Any]):
    """The declared inputs of one step, each computed the first time a component asks."""

    def __init__(
        self,
        batch: ScoredBatch,
        weights_K: Tensor,
        prepass: PrePass,
        *,
        with_entropy: bool,
        step: int,
        max_steps: int,
        newline_ids: Mapping[int, int] | None = None,
    ) -> None:
        self.batch, self.weights_K, self._prepass = batch, weights_K, prepass
        self.newline_ids = newline_ids  # token id -> newlines in its text (item boundaries)
        self.with_entropy = with_entropy
        self.step, self.max_steps = step, max_steps
        self.adv_BG: Tensor | None = None
        self._cache: dict[str, Any] = {}
        self._old: dict[str, Tensor] | None = None

    @property
    def B(self) -> int:
        return self.batch.num_groups

    @property
    def G(self) -> int:
        return self.batch.rollouts.group_size

    def prepass(self) -> dict[str, Tensor]:
        if self._old is None:
            self._old = self._prepass(self.batch.rollouts, self.with_entropy)
        return self._old

    @property
    def prepass_ran(self) -> bool:
        return self._old is not None

    def __getitem__(self, name: str) -> Any:
        if name not in PROVIDERS:
            raise KeyError(name)
        if name not in self._cache:
            value = PROVIDERS[name](self)
            if isinstance(value, Tensor):  # whole-batch planning runs on the CPU (see below)
                value = value.cpu()
            if name in _FIXED:  # values that change during planning are never cached
                self._cache[name] = value
            return value
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(PROVIDERS)

    def __len__(self) -> int:
        return len(PROVIDERS)


def _answers_BG(s: StepInputs) -> list[list[str | None]]:
    ans = [extract_answer(c) for c in s.batch.rollouts.completions]
    return [ans[b * s.G : (b + 1) * s.G] for b in range(s.B)]


def _adv_N(s: StepInputs) -> Tensor | None:
    return None if s.adv_BG is None else s.adv_BG.reshape(-1)


def _ro(s: StepInputs) -> Rollouts:
    return s.batch.rollouts


def _item_rel_BGK(s: StepInputs) -> Tensor:
    """The `item_rel` column a reward logged (one list of relevances per completion),
    padded with NaN to the longest list."""
    rows = s.batch.extra.get("item_rel")
    if rows is None:
        raise ValueError(
            "item_rel_BGK: no reward logged an `item_rel` column (one relevance per line of "
            "each completion); add the rank_relevance reward or log_extra('item_rel', ...)"
        )
    lists = [list(r) if isinstance(r, (list, tuple)) else [] for r in rows]
    K = max((len(r) for r in lists), default=0)
    out = torch.full((len(lists), K), float("nan"))
    for i, r in enumerate(lists):
        if r:
            out[i, : len(r)] = torch.tensor([float(x) for x in r])
    return out.view(s.B, s.G, K)


def _segment_values(s: StepInputs) -> list[Any]:
    rows = s.batch.extra.get("segment_values")
    if rows is None:
        raise ValueError(
            "segment_values_N: no segment values in the batch; the segment advantage needs "
            "rollout.strategy segment_mc"
        )
    return rows


def _budget_rows(s: StepInputs) -> list[Any]:
    rows = s.batch.extra.get("budget")
    if rows is None:
        raise ValueError(
            "budget_rows_N: no budget rows in the batch; the brpo advantage needs "
            "rollout.strategy anytime_budget"
        )
    return rows


def _rescorer(s: StepInputs) -> Callable[[float], Tensor]:
    """scale -> the sampled tokens' log-probs at scale × the sampling temperature (CPU),
    one no-grad forward per call: the component pays only for the scales it asks for."""
    return lambda scale: s._prepass(_ro(s), False, temperature_scale=scale)["old_logp_NT"].cpu()


def _row_tokens(s: StepInputs) -> list[tuple[list[int], list[int], list[float]]]:
    """Each row's prompt ids (no padding), real completion ids and their loss mask."""
    ro = _ro(s)
    out = []
    for n in range(ro.num_rollouts):
        real = ro.attention_mask_NT[n].bool()
        out.append(
            (
                ro.prompt_ids_NP[n][ro.prompt_mask_NP[n].bool()].tolist(),
                ro.completion_ids_NT[n][real].tolist(),
                ro.loss_mask_NT[n][real].float().tolist(),
            )
        )
    return out


def _token_scorer(s: StepInputs) -> Callable[[list[tuple[list[int], list[int]]]], list]:
    """rows -> the sampling policy's log-prob of each of their completion tokens: one no-grad
    forward per call over just those rows (single_stream's log-prob drift)."""

    def score(rows: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        if not rows:
            return []
        ro = rollouts_from_rows(
            [list(p) for p, _ in rows],
            [list(c) for _, c in rows],
            texts=[""] * len(rows),
            group_size=1,
            pad_token_id=0,  # masked everywhere
            truncated=[False] * len(rows),
            device=_ro(s).prompt_ids_NP.device,
        )
        lp = s._prepass(ro, False)["old_logp_NT"].cpu()
        return [lp[i, : len(c)].tolist() for i, (_, c) in enumerate(rows)]

    return score


def _item_index_NT(s: StepInputs) -> Tensor:
    from grouprl.algorithms.segments import item_index_from_tokens

    if s.newline_ids is None:
        raise ValueError("item_index_NT: the trainer gave no newline token ids")
    ro = _ro(s)
    return item_index_from_tokens(ro.completion_ids_NT, ro.attention_mask_NT.bool(), s.newline_ids)


def _turns_BG(s: StepInputs) -> Tensor:
    """Model turns per trajectory, from the multi-turn rollout's meta; 1 for single-turn."""
    meta = _ro(s).meta
    if meta is None or not all("num_turns" in m for m in meta):
        return torch.ones(s.B, s.G)
    return torch.tensor([float(m["num_turns"]) for m in meta]).view(s.B, s.G)


# One provider per name declared in grouprl.inputs (tests/test_inputs.py checks the match).
PROVIDERS: dict[str, Callable[[StepInputs], Any]] = {
    "rewards_BG": lambda s: s.batch.rewards_N.view(s.B, s.G),
    "rewards_BGK": lambda s: s.batch.rewards_NK.view(s.B, s.G, -1),
    "weights_K": lambda s: s.weights_K,
    "lengths_BG": lambda s: _ro(s).lengths_N.view(s.B, s.G),
    "truncated_BG": lambda s: _ro(s).truncated_N.view(s.B, s.G),
    "turns_BG": lambda s: _turns_BG(s),
    "prompt_keys_B": lambda s: [str(i) for i in s.batch.indices],
    "baseline_B": lambda s: s.batch.baseline_B,
    "answers_BG": _answers_BG,
    "item_rel_BGK": _item_rel_BGK,
    "segment_values_N": lambda s: _segment_values(s),
    "budget_rows_N": lambda s: _budget_rows(s),
    "item_index_NT": _item_index_NT,
    "seq_logp_BG": lambda s: (
        (s.prepass()["old_logp_NT"] * _ro(s).loss_mask_NT).sum(1).view(s.B, s.G)
    ),
    "entropy_NT": lambda s: s.prepass().get("entropy_NT"),
    "capo_curvature_NT": lambda s: s._prepass(_ro(s), True, second="curvature")["entropy_NT"],
    "rescore_NT": lambda s: _rescorer(s),
    "row_tokens_N": lambda s: _row_tokens(s),
    "token_scorer": lambda s: _token_scorer(s),
    "old_logp_NT": lambda s: s.prepass()["old_logp_NT"],
    "adv_BG": lambda s: s.adv_BG,
    "adv_N": _adv_N,
    "adv_NT": lambda s: (
        None if s.adv_BG is None else s.adv_BG.reshape(-1, 1).expand_as(_ro(s).loss_mask_NT)
    ),
    "mask_NT": lambda s: _ro(s).loss_mask_NT,
    "completion_ids_NT": lambda s: _ro(s).completion_ids_NT,
    "group_N": lambda s: (
        torch.arange(_ro(s).num_rollouts, device=_ro(s).loss_mask_NT.device) // s.G
    ),
    "step": lambda s: s.step,
    "max_steps": lambda s: s.max_steps,
}
_FIXED = frozenset(PROVIDERS) - {"adv_BG", "adv_N", "adv_NT"}


def make_train_batch(
    ro: Rollouts,
    adv_N: Tensor,
    *,
    rewards_N: Tensor | None = None,
    token_weight_NT: Tensor | None = None,
    denominator: str = "all",
    max_new_tokens: int,
    old_logp_NT: Tensor | None = None,
) -> TrainBatch:
    """A TrainBatch with its whole-batch normalizers: the policy term over the loss mask (or
    only the selected tokens, denominator "selected"), the regularizers over the loss mask.
    Planned tensors (advantages, rewards, token weights) move to the rollouts' device."""
    loss_mask = ro.loss_mask_NT
    dev = loss_mask.device
    adv_N = adv_N.to(dev)
    rewards_N = None if rewards_N is None else rewards_N.to(dev)
    token_weight_NT = None if token_weight_NT is None else token_weight_NT.to(dev)
    policy_mask = (
        loss_mask
        if token_weight_NT is None or denominator == "all"
        else loss_mask * (token_weight_NT > 0)
    )
    if ro.sft_N is not None:  # demonstration rows: no policy term (the sft_rows regularizer)
        policy_mask = policy_mask * (~ro.sft_N.to(dev))[:, None].to(policy_mask.dtype)
        sft = ro.sft_N.to(dev)
        adv_N = torch.where(
            sft[:, None] if adv_N.dim() == 2 else sft, torch.zeros_like(adv_N), adv_N
        )
    num_groups = ro.num_rollouts // ro.group_size
    # padding and demonstration rows are no samples
    trained_N = ro.real_N if ro.sft_N is None else ro.real_N & ~ro.sft_N.to(ro.real_N.device)
    num_seqs = int(trained_N.sum()) if ro.pad_N is not None or ro.sft_N is not None else None
    return TrainBatch(
        rollouts=ro,
        adv_N=adv_N,
        rewards_N=rewards_N,
        token_weight_NT=token_weight_NT,
        policy_mask_NT=policy_mask,
        policy_norm=BatchNorm.of(policy_mask, max_new_tokens, num_groups, num_seqs),
        reg_norm=BatchNorm.of(loss_mask, max_new_tokens, num_groups, num_seqs),
        old_logp_NT=old_logp_NT,
    )


def plan_batch(
    batch: ScoredBatch,
    comps: Components,
    *,
    weights_K: Tensor,
    prepass: PrePass,
    step: int,
    max_steps: int,
    max_new_tokens: int,
    newline_ids: Mapping[int, int] | None = None,
) -> tuple[TrainBatch, dict[str, float]]:
    """Advantages, filters, token mask and calibration over the whole batch (in that order).
    `newline_ids` (token id -> newlines in its text): where the items of a completion end,
    for components that ask for `item_index_NT`."""
    ro = batch.rollouts
    calibrating = [r for r in comps.calibrating if r.needs_calibration]
    wanted = comps.wanted_inputs()
    inputs = StepInputs(
        batch,
        weights_K,
        prepass,
        with_entropy="entropy_NT" in wanted or bool(calibrating),
        step=step,
        max_steps=max_steps,
        newline_ids=newline_ids,
    )
    metrics: dict[str, float] = {}
    adv_BG = comps.advantage(inputs)
    if comps.advantage.caps.token_level:  # [N, T] (Rank-GRPO); modifiers are refused
        adv_N = adv_BG.float()
        mask = ro.loss_mask_NT.to(adv_N.dtype).cpu()
        row_mean = (adv_N * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        inputs.adv_BG = row_mean.view(inputs.B, inputs.G)  # for filters and metrics
    else:
        for mod in comps.modifiers:
            inputs.adv_BG = adv_BG
            adv_BG = mod(inputs)
        adv_N = adv_BG.reshape(-1).float()
        inputs.adv_BG = adv_N.view(inputs.B, inputs.G)

    loss_mask = inputs["mask_NT"]
    token_weight, denominator = None, "all"
    for flt in comps.sample_filters:
        if flt.caps.refills:  # already applied by the collector
            continue
        out = flt(inputs)
        row_w = out.keep_BG.reshape(-1, 1).to(loss_mask.dtype)
        token_weight = row_w * loss_mask if token_weight is None else token_weight * row_w
        metrics.update(out.stats)
    if comps.token_mask is not None:
        sel = comps.token_mask(inputs)
        token_weight = (
            sel.token_weight_NT if token_weight is None else token_weight * sel.token_weight_NT
        )
        denominator = sel.denominator
        if sel.adv_N is not None:
            adv_N = sel.adv_N.float()
        metrics.update(sel.stats)
    if ro.fixed_adv_N is not None:  # a strategy's rows outside the group statistics (AEPO)
        fixed = ro.fixed_adv_N.cpu().to(adv_N.dtype)
        fixed = fixed[:, None].expand_as(adv_N) if adv_N.dim() == 2 else fixed
        adv_N = torch.where(torch.isnan(fixed), adv_N, fixed)
    for reg in calibrating:  # e.g. entropy-band bounds from the first batch's distribution
        reg.calibrate(inputs["entropy_NT"], loss_mask, token_weight)

    real = ro.sample_N.cpu()  # padding rows (ragged groups) and demonstrations are no samples
    metrics["advantage/abs_mean"] = float(adv_N[real].abs().mean()) if bool(real.any()) else 0.0
    if token_weight is not None:
        kept = (token_weight > 0).float() * loss_mask
        metrics["selection/kept_token_frac"] = float(kept.sum() / loss_mask.sum().clamp(min=1))
    train_batch = make_train_batch(
        ro,
        adv_N,
        rewards_N=batch.rewards_N,
        token_weight_NT=token_weight,
        denominator=denominator,
        max_new_tokens=max_new_tokens,
        old_logp_NT=inputs.prepass()["old_logp_NT"] if inputs.prepass_ran else None,
    )
    if comps.loss_caps.needs_items:
        train_batch.item_index_NT = inputs["item_index_NT"].to(ro.loss_mask_NT.device)
    return train_batch, metrics
