"""Supervised warm start: next-token loss on completion tokens only.

A policy needs some competence before RL helps (GRPO only reweights what it samples), so
`grouprl sft` fits prompt->completion pairs first. It reuses the policy forward, so the
loss is exactly -mean log π(completion token | prompt, past).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grouprl.models.forward import completion_logprobs
from grouprl.monitor.progress import ProgressBar
from grouprl.monitor.sinks import MetricsLogger
from grouprl.training.sft_transforms import apply_sft_transforms

log = logging.getLogger("grouprl")


@dataclass
class SFTResult:
    steps: int
    final_loss: float
    history: list[dict[str, float]]


# A completion: a string, or a multi-turn trace of (text, trained) segments, e.g. a tool
# call (trained), its tool response (context only: read, not fitted), the final answer
Completion = str | Sequence[tuple[str, bool]]


def _segments(c: Completion) -> list[tuple[str, bool]]:
    return [(c, True)] if isinstance(c, str) else [(str(t), bool(k)) for t, k in c]


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[Completion]):
    """Left-padded prompt ids/mask and right-padded completion ids (+EOS)/mask."""
    return encode_traces(tokenizer, prompts, completions)[:4]


def encode_traces(tokenizer, prompts: Sequence[str], completions: Sequence[Completion]):
    """`encode_pairs`, and the loss mask (0 on the untrained segments of a trace)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        p = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    eos = tokenizer.eos_token_id
    comp, trained = [], []
    for c in completions:
        ids_c: list[int] = []
        keep: list[int] = []
        for text, fit in _segments(c):
            seg = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids_c += seg
            keep += [int(fit)] * len(seg)
        comp.append(ids_c + [eos])
        trained.append(keep + [1])
    T = max(len(c) for c in comp)
    ids = torch.full((len(comp), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(comp), T))
    loss = torch.zeros((len(comp), T))
    for i, c in enumerate(comp):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1.0
        loss[i, : len(c)] = torch.tensor(trained[i], dtype=torch.float32)
    return p["input_ids"], p["attention_mask"].float(), ids, mask, loss


def sft(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[Completion],
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    output_dir: str | Path | None = None,
    progress: bool = True,
    eval_pairs: tuple[Sequence[str], Sequence[str]] | None = None,
    eval_every: int = 0,
    save_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = False,
    transforms: Sequence[str | Mapping[str, Any]] = (),
) -> SFTResult:
    """Fit `completions` given `prompts` for `steps` AdamW steps on random mini-batches.
    A completion may be a multi-turn trace of (text, trained) segments: the untrained ones
    (tool responses) are read as context and get no loss.

    With `output_dir`: metrics.jsonl, and a checkpoint every `save_every` steps and at the
    end (weights, optimizer, RNG and the batch sampler's state), from which `resume`
    continues exactly. `eval_pairs` (prompts, completions): the held-out completion loss
    (`eval/loss`) every `eval_every` steps and at the end.

    `transforms`: SFT row transforms (`sft_transforms.SFT_TRANSFORMS`, e.g.
    `[{"name": "thought_dropout", "ratio": 0.5}]`), applied once, in order, to the training
    pairs (not to `eval_pairs`); deterministic per row, so `resume` sees the same data.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError("sft: prompts and completions must be non-empty lists of equal length")
    if transforms:
        prompts, completions = apply_sft_transforms(prompts, completions, transforms)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=learning_rate,
        weight_decay=weight_decay,
    )
    g = torch.Generator().manual_seed(seed)
    start = _resume(output_dir, model, opt, g) if resume and output_dir else 0
    logger = MetricsLogger(output_dir, resume_step=start) if output_dir else None
    history: list[dict[str, float]] = []
    model.train()
    loss_val = float("nan")
    with ProgressBar(steps, description="sft", enabled=progress, initial=start) as bar:
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            idx = torch.randint(
                len(prompts), (min(batch_size, len(prompts)),), generator=g
            ).tolist()
            loss = _loss(
                model, tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx], device
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            loss_val = float(loss.detach())
            m = {"loss": loss_val, "time/step": time.perf_counter() - t0}
            if eval_pairs and ((eval_every and step % eval_every == 0) or step == steps):
                m["eval/loss"] = held_out_loss(model, tokenizer, *eval_pairs, batch_size, device)
                bar.note(f"step {step}: held-out loss {m['eval/loss']:.4f}")
            history.append({"step": step, **m})
            if logger:
                logger.log(step, m)
            bar.update(step, m)
            if output_dir and ((save_every and step % save_every == 0) or step == steps):
                _save(output_dir, step, model, tokenizer, opt, g, keep_checkpoints)
    if logger:
        logger.close()
    model.eval()
    return SFTResult(steps, loss_val, history)


def _loss(model, tokenizer, prompts, completions, device) -> torch.Tensor:
    """-mean log π(completion token | prompt, past) over the batch's completion tokens."""
    pid, pmask, cid, cmask, lmask = (
        t.to(device) for t in encode_traces(tokenizer, prompts, completions)
    )
    logp, _ = completion_logprobs(model, pid, pmask, cid, cmask)
    return -(logp * lmask).sum() / lmask.sum()


@torch.no_grad()
def held_out_loss(model, tokenizer, prompts, completions, batch_size, device) -> float:
    """The completion loss over held-out pairs (token-weighted), without dropout."""
    was = model.training
    model.eval()
    total, tokens = 0.0, 0.0
    for i in range(0, len(prompts), batch_size):
        P, C = list(prompts[i : i + batch_size]), list(completions[i : i + batch_size])
        pid, pmask, cid, cmask, lmask = (t.to(device) for t in encode_traces(tokenizer, P, C))
        logp, _ = completion_logprobs(model, pid, pmask, cid, cmask)
        total += float(-(logp * lmask).sum())
        tokens += float(lmask.sum())
    model.train(was)
    return total / max(tokens, 1.0)


def _save(out, step, model, tokenizer, opt, g, keep) -> None:
    from grouprl.training.checkpoint import rng_state, save_checkpoint

    save_checkpoint(
        out,
        step,
        model=model,
        tokenizer=tokenizer,
        optimizer=opt,
        scheduler=None,
        trainer_state={"kind": "sft"},
        keep=keep,
        rng={**rng_state(), "sft_batches": g.get_state()},
    )


def _resume(out, model, opt, g) -> int:
    """Continue from the newest checkpoint in `out` (0 when there is none)."""
    from grouprl.training.checkpoint import apply_checkpoint, read_latest

    data = read_latest(out, with_optimizer=True, with_scheduler=False)
    if data is None:
        log.warning("sft: resume asked, but %s has no checkpoint: starting at step 0", out)
        return 0
    state = apply_checkpoint(data, model=model, optimizer=opt, scheduler=None)
    g.set_state(data["rng"]["sft_batches"])
    log.info("sft: resumed from %s at step %d", data["path"], state["step"])
    return int(state["step"])
