"""Supervised warm start: next-token loss on completion tokens only.

A policy needs some competence before RL helps (GRPO only reweights what it samples), so
`grouprl sft` fits prompt->completion pairs first. It reuses the policy forward, so the
loss is exactly -mean log π(completion token | prompt, past).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from grouprl.models.forward import completion_logprobs
from grouprl.monitor.progress import ProgressBar
from grouprl.monitor.sinks import MetricsLogger

log = logging.getLogger("grouprl")


@dataclass
class SFTResult:
    steps: int
    final_loss: float
    history: list[dict[str, float]]


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str]):
    """Left-padded prompt ids/mask and right-padded completion ids (+EOS)/mask."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        p = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    eos = tokenizer.eos_token_id
    comp = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
    T = max(len(c) for c in comp)
    ids = torch.full((len(comp), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(comp), T))
    for i, c in enumerate(comp):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1.0
    return p["input_ids"], p["attention_mask"].float(), ids, mask


def sft(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> SFTResult:
    """Fit `completions` given `prompts` for `steps` AdamW steps on random mini-batches."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError("sft: prompts and completions must be non-empty lists of equal length")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=learning_rate,
        weight_decay=weight_decay,
    )
    g = torch.Generator().manual_seed(seed)
    logger = MetricsLogger(output_dir) if output_dir else None
    history: list[dict[str, float]] = []
    model.train()
    loss_val = float("nan")
    with ProgressBar(steps, description="sft", enabled=progress) as bar:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            idx = torch.randint(
                len(prompts), (min(batch_size, len(prompts)),), generator=g
            ).tolist()
            pid, pmask, cid, cmask = (
                t.to(device)
                for t in encode_pairs(
                    tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx]
                )
            )
            logp, _ = completion_logprobs(model, pid, pmask, cid, cmask)
            loss = -(logp * cmask).sum() / cmask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            loss_val = float(loss.detach())
            m = {"loss": loss_val, "time/step": time.perf_counter() - t0}
            history.append({"step": step, **m})
            if logger:
                logger.log(step, m)
            bar.update(step, m)
    if logger:
        logger.close()
    model.eval()
    return SFTResult(steps, loss_val, history)
