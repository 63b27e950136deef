"""The one policy forward: per-token log-probs (and entropy) of completion tokens.

Old log-probs, reference log-probs and the training loss all come from `completion_logprobs`,
so the PPO ratio on the first iteration is exactly 1. Two layouts give the same numbers:

- repeated: each completion row is `[left-padded prompt; completion]`;
- shared prefix (`shared_prefix.py`): each prompt once per group, split attention.

Either way only the hidden states that predict real completion tokens go through the LM
head, in chunks of `chunk_size` positions whose fp32 logits are recomputed in backward
(activation checkpointing), so `[N, T, V]` fp32 logits never exist at once (the StreamBP
observation, arXiv 2506.03077, applied to the LM head).
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from grouprl.models.shared_prefix import pack_groups, packed_attention_active, resolve_backend

# Config attributes that change logits after the LM head; such models use the plain forward.
_HEAD_EXTRAS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


@lru_cache(maxsize=32)
def _accepts_logits_to_keep(forward) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def position_ids_from_mask(mask_NL: Tensor) -> Tensor:
    """Positions that skip left padding (as HF generate does): cumsum(mask) - 1, pads at 0."""
    return (mask_NL.long().cumsum(dim=1) - 1).clamp(min=0)


def repeated_inputs(
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    completion_mask_NT: Tensor,
) -> dict[str, Tensor | bool]:
    """Model kwargs of the repeated layout: rows [left-padded prompt; completion], positions
    from the mask (as HF generate computes them)."""
    mask = torch.cat([prompt_mask_NP, completion_mask_NT], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids_NP, completion_ids_NT], dim=1),
        "attention_mask": mask.long(),
        "position_ids": position_ids_from_mask(mask),
        "use_cache": False,
    }


def plain_head(model: torch.nn.Module) -> bool:
    """True when logits = lm_head(decoder hidden states), with nothing applied after."""
    cfg = getattr(model, "config", None)
    for attr in _HEAD_EXTRAS:
        val = getattr(cfg, attr, None)
        if val not in (None, 1, 1.0):
            return False
    try:
        return model.get_output_embeddings() is not None and model.get_decoder() is not None
    except (AttributeError, ValueError, NotImplementedError):
        return False


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


def _head_chunk(
    hidden_Md: Tensor,
    targets_M: Tensor,
    weight_Vd: Tensor,
    bias_V: Tensor | None,
    tau: float,
    entropy_grad: bool,
) -> tuple[Tensor, Tensor]:
    logits = torch.nn.functional.linear(hidden_Md, weight_Vd, bias_V).float() / tau
    logp_all = torch.log_softmax(logits, dim=-1)  # the same op as the naive path: equal values
    logp = logp_all.gather(-1, targets_M[:, None]).squeeze(-1)
    # An entropy the loss does not differentiate must not keep graph: under checkpointing its
    # recomputed [chunk, V] tensors would otherwise live until the whole backward ends.
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def auto_chunk_size(vocab_size: int, budget_bytes: int = 64 * 2**20) -> int:
    """Positions per LM-head chunk so that one chunk's fp32 logits fit in `budget_bytes`."""
    return max(16, budget_bytes // (4 * max(1, vocab_size)))


def chunked_head_logprobs(
    hidden_Md: Tensor,
    targets_M: Tensor,
    lm_head: torch.nn.Module,
    *,
    temperature: float = 1.0,
    chunk_size: int = 0,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """log π(target) and entropy at M positions from their hidden states, chunk by chunk.

    With gradients enabled each chunk is checkpointed: its [chunk, V] fp32 logits are freed
    after the forward and recomputed in backward, so peak memory is one chunk's logits.
    chunk_size 0 picks it from the vocabulary (`auto_chunk_size`, 64 MiB of logits). The
    entropy carries gradient only with `entropy_grad` (an entropy regularizer).
    """
    tau = temperature if temperature > 0 else 1.0
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    logps, ents = [], []
    use_ckpt = torch.is_grad_enabled() and (hidden_Md.requires_grad or weight.requires_grad)
    for s in range(0, hidden_Md.shape[0], chunk_size):
        h, y = hidden_Md[s : s + chunk_size], targets_M[s : s + chunk_size]
        if use_ckpt:
            lp, ent = checkpoint(
                _head_chunk, h, y, weight, bias, tau, entropy_grad, use_reentrant=False
            )
        else:
            lp, ent = _head_chunk(h, y, weight, bias, tau, entropy_grad)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden_Md.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


def _scatter_NT(values_M: Tensor, valid_NT: Tensor) -> Tensor:
    out = values_M.new_zeros(valid_NT.shape)
    return out.masked_scatter(valid_NT, values_M)


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    completion_mask_NT: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    shared_prefix: bool = False,
    chunk_size: int = 0,
    attn_backend: str = "auto",
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N, T] of each completion token given its prompt, and optionally entropy [N, T].

    Positions past a completion's length (its mask) hold 0. With `shared_prefix`, rows that
    share a prompt (consecutive, identical prompt ids and mask) are packed and the prompt is
    encoded once; the values equal the repeated layout's up to float rounding.
    """
    if not plain_head(model):
        if shared_prefix:
            raise NotImplementedError(
                "shared-prefix forward needs a plain LM head (no logit scaling/softcapping)"
            )
        return _full_logits_path(
            model,
            prompt_ids_NP,
            prompt_mask_NP,
            completion_ids_NT,
            completion_mask_NT,
            temperature,
            with_entropy,
        )
    T = completion_ids_NT.shape[1]
    valid_NT = completion_mask_NT.bool() & (
        torch.arange(T, device=completion_ids_NT.device) < completion_mask_NT.sum(1, keepdim=True)
    )
    decoder = model.get_decoder()
    if shared_prefix:
        layout = pack_groups(prompt_ids_NP, prompt_mask_NP, completion_ids_NT, completion_mask_NT)
        layout.backend = resolve_backend(attn_backend, completion_ids_NT.device)
        with packed_attention_active(model, layout):
            hidden = decoder(
                input_ids=layout.input_ids_RL, position_ids=layout.position_ids_RL, use_cache=False
            ).last_hidden_state
        rows = layout.row_N[:, None].expand(-1, T)[valid_NT]
        cols = layout.src_col_NT[valid_NT]
        hidden_Md = hidden[rows, cols]
    else:
        P = prompt_ids_NP.shape[1]
        inputs = repeated_inputs(
            prompt_ids_NP, prompt_mask_NP, completion_ids_NT, completion_mask_NT
        )
        hidden = decoder(**inputs).last_hidden_state
        hidden_Md = hidden[:, P - 1 : P - 1 + T][valid_NT]
    logp_M, ent_M = chunked_head_logprobs(
        hidden_Md,
        completion_ids_NT[valid_NT],
        model.get_output_embeddings(),
        temperature=temperature,
        chunk_size=chunk_size,
        entropy_grad=entropy_grad,
    )
    return _scatter_NT(logp_M, valid_NT), (_scatter_NT(ent_M, valid_NT) if with_entropy else None)


def _full_logits_path(
    model,
    prompt_ids_NP,
    prompt_mask_NP,
    completion_ids_NT,
    completion_mask_NT,
    temperature,
    with_entropy,
):
    """Models whose logits are post-processed: the model's own forward, completion positions only."""
    T = completion_ids_NT.shape[1]
    kwargs = repeated_inputs(prompt_ids_NP, prompt_mask_NP, completion_ids_NT, completion_mask_NT)
    if _accepts_logits_to_keep(type(model).forward):
        logits = model(**kwargs, logits_to_keep=T + 1).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, -(T + 1) : -1]
    logp, ent = logprobs_and_entropy(
        logits, completion_ids_NT, temperature, with_entropy=with_entropy
    )
    keep = completion_mask_NT.bool()
    return logp.masked_fill(~keep, 0.0), (ent.masked_fill(~keep, 0.0) if ent is not None else None)
