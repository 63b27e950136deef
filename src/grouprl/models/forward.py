"""The one policy forward: per-token log-probs (and entropy) of completion tokens.

Old log-probs, reference log-probs and the training loss all come from this function, so
the PPO ratio on the first iteration is exactly 1. Only completion positions go through the
LM head (`logits_to_keep`), and log-softmax runs in fp32 over chunks of positions so that
fp32 `[N, T, V]` logits are never held at once.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=32)
def _accepts_logits_to_keep(forward) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def position_ids_from_mask(mask_NL: Tensor) -> Tensor:
    """Positions that skip left padding (as HF generate does): cumsum(mask) - 1, pads at 0."""
    return (mask_NL.long().cumsum(dim=1) - 1).clamp(min=0)


def logprobs_and_entropy(
    logits_NTV: Tensor,
    targets_NT: Tensor,
    temperature: float,
    *,
    with_entropy: bool,
    chunk: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits/τ)[target] and the entropy of softmax(logits/τ), chunked over T.

    logits_NTV may be bf16; each chunk is upcast to fp32 before the softmax.
    """
    tau = temperature if temperature > 0 else 1.0
    logps, ents = [], []
    for s in range(0, logits_NTV.shape[1], chunk):
        lg = logits_NTV[:, s : s + chunk].float() / tau
        logp_all = torch.log_softmax(lg, dim=-1)
        logps.append(logp_all.gather(-1, targets_NT[:, s : s + chunk, None]).squeeze(-1))
        if with_entropy:
            ents.append(-(logp_all.exp() * logp_all).sum(-1))
    logp = torch.cat(logps, dim=1)
    return logp, (torch.cat(ents, dim=1) if with_entropy else None)


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    completion_mask_NT: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N, T] of each completion token given its prompt, and optionally entropy [N, T].

    The sequence is [left-padded prompt; right-padded completion]; the logit at column
    P-1+t predicts completion token t.
    """
    T = completion_ids_NT.shape[1]
    ids = torch.cat([prompt_ids_NP, completion_ids_NT], dim=1)
    mask = torch.cat([prompt_mask_NP, completion_mask_NT], dim=1)
    # Completion padding stays visible to nothing after it, so attending to it is harmless;
    # but keeping it masked mirrors generation exactly.
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    )
    if _accepts_logits_to_keep(type(model).forward):
        out = model(**kwargs, logits_to_keep=T + 1)
        logits = out.logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, -(T + 1) : -1]
    return logprobs_and_entropy(logits, completion_ids_NT, temperature, with_entropy=with_entropy)
