"""The chunked LM head: log π(target) and entropy from hidden states, a chunk of logits at a time.

Only the hidden states that predict real completion tokens go through the head, in chunks
whose fp32 logits are recomputed in backward (activation checkpointing), so `[N, T, V]` fp32
logits never exist at once (the StreamBP observation, arXiv 2506.03077, applied to the LM
head). The head is called as a MODULE inside each checkpointed chunk, so a LoRA-wrapped head
or an FSDP-sharded one (unsharded by its forward hooks) works.

`plan_head` decides whether a model's logits are exactly `scaling(head(decoder(x)))` — the
only form the chunked head reproduces — and returns the decoder, the head and the scalar
scaling (Cohere's `logit_scale`, Granite's `logits_scaling`), or raises `UnsupportedHead`
saying why (no separate decoder, softcapping, or a forward that does something else).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Scalar logit scalings applied after the LM head, as transformers 5.24 writes them:
# CohereForCausalLM (and Cohere2, ...): `logits * config.logit_scale`;
# GraniteForCausalLM (and GraniteMoe, ...): `logits / config.logits_scaling`.
_SCALINGS = {"logit_scale": False, "logits_scaling": True}  # config attribute -> divide?


class UnsupportedHead(ValueError):
    """The chunked head cannot reproduce this model's logits; the message says why."""


@dataclass(frozen=True)
class LogitScaling:
    """logits = head(h) * value, or head(h) / value when `divide` (the model's own op)."""

    value: float
    divide: bool

    def __call__(self, logits: Tensor) -> Tensor:
        return logits / self.value if self.divide else logits * self.value


@dataclass(frozen=True)
class HeadPlan:
    """logits = scaling(head(decoder(...).last_hidden_state)), exactly."""

    decoder: nn.Module
    head: nn.Module
    scaling: LogitScaling | None


def token_logprobs(
    logits_MV: Tensor, targets_M: Tensor, tau: float, entropy_grad: bool
) -> tuple[Tensor, Tensor]:
    """log softmax(logits/τ)[target] and the entropy, in fp32 (the naive path's ops)."""
    logp_all = torch.log_softmax(logits_MV.float() / tau, dim=-1)
    logp = logp_all.gather(-1, targets_M[:, None]).squeeze(-1)
    # An entropy the loss does not differentiate must not keep graph: under checkpointing its
    # recomputed [chunk, V] tensors would otherwise live until the whole backward ends.
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


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


def head_curvature(logits_MV: Tensor, targets_M: Tensor, hidden_Md: Tensor, tau: float) -> Tensor:
    """‖h‖²·‖onehot(target) − softmax(logits/τ)‖² per position (no grad): the squared norm
    of the LM head's weight gradient of log π(target), the curvature term CAPO's token mask
    ranks (‖onehot − p‖² = 1 − 2·p_target + Σ_v p_v²)."""
    with torch.no_grad():
        p_all = torch.softmax(logits_MV.float() / tau, dim=-1)
        p_t = p_all.gather(-1, targets_M[:, None]).squeeze(-1)
        dist = 1.0 - 2.0 * p_t + (p_all * p_all).sum(-1)
        return dist * hidden_Md.float().pow(2).sum(-1)


SECOND_OUTPUTS = ("entropy", "curvature")


def _head_chunk(
    hidden_Md: Tensor,
    targets_M: Tensor,
    head: nn.Module,
    scaling: LogitScaling | None,
    tau: float,
    entropy_grad: bool,
    second: str = "entropy",
) -> tuple[Tensor, Tensor]:
    logits_MV = head(hidden_Md)
    if scaling is not None:
        logits_MV = scaling(logits_MV)  # in the head's dtype, as the model's forward does
    logp, ent = token_logprobs(logits_MV, targets_M, tau, entropy_grad)
    if second == "curvature":
        return logp, head_curvature(logits_MV, targets_M, hidden_Md, tau)
    return logp, ent


def auto_chunk_size(vocab_size: int, budget_bytes: int = 64 * 2**20) -> int:
    """Positions per LM-head chunk so that one chunk's fp32 logits fit in `budget_bytes`."""
    return max(16, budget_bytes // (4 * max(1, vocab_size)))


def _vocab_size(head: nn.Module) -> int:
    if isinstance(head, nn.Linear):
        return head.out_features
    return int(head.weight.shape[0])  # a wrapped head (LoRA, ...) keeps the base weight


def chunked_head_logprobs(
    hidden_Md: Tensor,
    targets_M: Tensor,
    lm_head: nn.Module,
    *,
    temperature: float = 1.0,
    chunk_size: int = 0,
    entropy_grad: bool = False,
    scaling: LogitScaling | None = None,
    second: str = "entropy",
) -> tuple[Tensor, Tensor]:
    """log π(target) and entropy at M positions from their hidden states, chunk by chunk
    (`second="curvature"`: `head_curvature` instead of the entropy).

    With gradients enabled each chunk is checkpointed: its [chunk, V] fp32 logits are freed
    after the forward and recomputed in backward, so peak memory is one chunk's logits.
    chunk_size 0 picks it from the vocabulary (`auto_chunk_size`, 64 MiB of logits). The
    entropy carries gradient only with `entropy_grad` (an entropy regularizer).
    """
    tau = temperature if temperature > 0 else 1.0
    chunk_size = chunk_size or auto_chunk_size(_vocab_size(lm_head))
    head_trains = any(p.requires_grad for p in lm_head.parameters())
    use_ckpt = torch.is_grad_enabled() and (hidden_Md.requires_grad or head_trains)
    logps, ents = [], []
    for s in range(0, hidden_Md.shape[0], chunk_size):
        args = (hidden_Md[s : s + chunk_size], targets_M[s : s + chunk_size], lm_head, scaling)
        if use_ckpt:
            lp, ent = checkpoint(_head_chunk, *args, tau, entropy_grad, second, use_reentrant=False)
        else:
            lp, ent = _head_chunk(*args, tau, entropy_grad, second)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden_Md.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


# ------------------------------------------------------------------ which models it fits

_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str | None]] = weakref.WeakKeyDictionary()


def plan_head(model: nn.Module) -> HeadPlan:
    """The decoder, head and scaling that reproduce `model(...).logits`, or `UnsupportedHead`.

    Structural facts first (a separate decoder, an output embedding, no softcapping), then
    a probe of the model's own forward (two tokens), once per model, head module and scaling.
    """
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError) as exc:
        raise UnsupportedHead(f"no get_decoder()/get_output_embeddings(): {exc}") from None
    if decoder is None or decoder is model:
        raise UnsupportedHead(
            f"{type(model).__name__}.get_decoder() returns the model itself, "
            "not a decoder stack whose hidden states feed the LM head"
        )
    if head is None:
        raise UnsupportedHead(f"{type(model).__name__} has no output embedding (LM head)")
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap is not None:
        raise UnsupportedHead(
            f"its logits are post-processed after the LM head: final_logit_softcapping={softcap}"
        )
    scaling = None
    for attr, divide in _SCALINGS.items():
        value = getattr(cfg, attr, None)
        if value is not None and float(value) != 1.0:
            scaling = LogitScaling(float(value), divide)
    plan = HeadPlan(decoder, head, scaling)
    key = (id(decoder), id(head), scaling)
    cached = _PROBED.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _probe(model, plan))
        _PROBED[model] = cached
    if cached[1] is not None:
        raise UnsupportedHead(cached[1])
    return plan


def _probe(model: nn.Module, plan: HeadPlan) -> str | None:
    """Why `model(...).logits` is not `scaling(head(decoder hidden))`, or None when it is.

    The model's own forward runs on two tokens with the head's output replaced by large
    random logits z (so any post-processing, softcapping included, shows whatever the
    weights): the logits must be scaling(z), and the head's input the decoder's output.
    """
    seen: dict[str, Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def on_decoder(module: nn.Module, args: Any, out: Any) -> None:
        seen["hidden"] = out[0]

    def before_head(module: nn.Module, args: Any) -> None:
        if args:
            seen["head_in"] = args[0]

    def on_head(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        z = 30 * torch.randn(out.shape, generator=gen, dtype=torch.float32)
        seen["z"] = z.to(device=out.device, dtype=out.dtype)
        return seen["z"]

    device = next(model.parameters()).device
    hooks = [
        plan.decoder.register_forward_hook(on_decoder),
        plan.head.register_forward_pre_hook(before_head),
        plan.head.register_forward_hook(on_head),
    ]
    try:
        with torch.no_grad():
            ids = torch.zeros(1, 2, dtype=torch.long, device=device)
            logits = model(input_ids=ids, use_cache=False).logits
    except Exception as exc:  # any forward we cannot drive: the caller falls back
        return f"its forward could not be probed: {type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        for h in hooks:
            h.remove()
    name = type(model).__name__
    if "hidden" not in seen:
        return f"{name}.forward does not run its get_decoder()"
    if "z" not in seen or "head_in" not in seen:
        return f"{name}.forward does not call get_output_embeddings() on the hidden states"
    hidden, head_in = seen["hidden"], seen["head_in"]
    if not torch.equal(head_in, hidden[:, -head_in.shape[1] :]):
        return f"{name}.forward transforms the decoder's hidden states before the LM head"
    want = plan.scaling(seen["z"]) if plan.scaling is not None else seen["z"]
    if logits.shape != want.shape or not torch.allclose(
        logits.float(), want.float(), rtol=1e-2, atol=1e-2
    ):
        return f"its logits are post-processed after the LM head ({name}.forward)"
    return None
