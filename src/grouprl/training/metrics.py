"""The metrics of one training step: rewards per function, lengths, timing, throughput."""

from __future__ import annotations

from typing import Any

import torch

from grouprl.algorithms.advantages import group_reward_stats
from grouprl.training.collect import ScoredBatch


def reward_metrics(batch: ScoredBatch, names: list[str]) -> dict[str, float]:
    """Group statistics of the combined reward, and mean/std/errors/NaNs per function."""
    B, G = batch.num_groups, batch.rollouts.group_size
    out = dict(group_reward_stats(batch.rewards_N.view(B, G)))
    out.update(batch.reward_metrics)
    real_N = batch.rollouts.sample_N.to(batch.rewards_NK.device)
    ro = batch.rollouts
    if ro.pad_N is not None or ro.sft_N is not None or ro.fixed_adv_N is not None:
        # padding, demonstration and fixed-advantage rows' NaN
        # rewards are not unscorable ones
        r = batch.rewards_N[real_N.to(batch.rewards_N.device)]
        out["reward/nan_frac"] = float((~torch.isfinite(r)).double().mean()) if r.numel() else 0.0
    for k, name in enumerate(names):
        col = batch.rewards_NK[real_N, k]  # padding/demonstration rows are not samples
        valid = col[~torch.isnan(col)]
        out[f"rewards/{name}/mean"] = float(valid.mean()) if valid.numel() else float("nan")
        out[f"rewards/{name}/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
        out[f"rewards/{name}/errors"] = float(batch.errors.get(name, 0))
        out[f"rewards/{name}/nan_count"] = float(torch.isnan(col).sum())
    return out


def completion_metrics(batch: ScoredBatch) -> dict[str, float]:
    ro = batch.rollouts
    real_N = ro.sample_N
    lengths = ro.lengths_N[real_N]
    out = {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(ro.truncated_N[real_N].float().mean()),
    }
    if ro.pad_N is not None:  # groups of different sizes (a budget sampler)
        out["completions/real_rows"] = float(real_N.sum())
    if ro.sft_N is not None:
        out["completions/sft_rows"] = float(ro.sft_N.sum())
    if ro.meta is not None and all("turns" in m for m in ro.meta):  # multi-turn rollouts
        n = max(len(ro.meta), 1)
        out["turns/mean"] = sum(m["num_turns"] for m in ro.meta) / n
        out["tools/calls_mean"] = sum(m["tool_calls"] for m in ro.meta) / n
        out["tools/errors_mean"] = sum(m["tool_errors"] for m in ro.meta) / n
        out["completions/trained_tokens_mean"] = float(ro.loss_mask_NT.sum()) / n
    return out


def timing_metrics(batch: ScoredBatch, t_collect: float, t_plan: float, t_train: float) -> dict:
    """Seconds per stage and tokens (prompt + completion) per second over the whole step."""
    ro = batch.rollouts
    total = t_collect + t_plan + t_train
    tokens = float(ro.prompt_mask_NP.sum() + ro.attention_mask_NT.sum())
    return {
        "time/collect": t_collect,
        "time/plan": t_plan,
        "time/train": t_train,
        "time/step": total,
        "tokens_per_second": tokens / max(total, 1e-9),
    }


def completion_rows(batch: ScoredBatch, train_batch: Any, names: list[str]) -> list[dict[str, Any]]:
    """The completions table of a step, one row per sample (TRL logs the same table):
    prompt, completion, the combined reward, each function's reward, the advantage, and
    any columns the reward functions added with log_extra."""
    G = batch.rollouts.group_size
    adv = getattr(train_batch, "adv_N", None)
    rows = []
    real_N = batch.rollouts.real_N.tolist()
    for i, completion in enumerate(batch.rollouts.completions):
        if not real_N[i]:  # padding
            continue
        ex = batch.examples[i // G]
        row: dict[str, Any] = {
            "prompt": ex.text,
            "completion": completion,
            "reward": float(batch.rewards_N[i]),
        }
        for k, name in enumerate(names):
            row[name] = float(batch.rewards_NK[i, k])
        if adv is not None and i < adv.shape[0]:
            if adv.dim() == 2:  # per-token advantages (rank_grpo, dcpo): the row's mean
                m = train_batch.rollouts.loss_mask_NT[i].to(adv.dtype)
                row["advantage"] = float((adv[i] * m).sum() / m.sum().clamp(min=1.0))
            else:
                row["advantage"] = float(adv[i])
        for key, values in batch.extra.items():
            row[key] = values[i] if i < len(values) else None
        rows.append(row)
    return rows
