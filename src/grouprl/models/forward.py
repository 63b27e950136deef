"""The one policy forward: per-token log-probs (and entropy) of completion tokens.

Old log-probs, reference log-probs and the training loss all come from `PolicyLogProbs` (or
its functional face `completion_logprobs`), so the PPO ratio on the first iteration is
exactly 1. Two layouts give the same numbers:

- repeated (`repeated.py`): each completion row is `[prompt; completion]`, compacted;
- shared prefix (`packing.py`, Prefix Grouper, arXiv 2506.05433): each prompt once per
  group, split attention (`attention.py`).

Either way only the hidden states that predict real completion tokens go through the LM
head, chunk by chunk (`head.py`). Everything runs inside `PolicyLogProbs.forward`, so a
wrapper around it (DDP, FSDP2) or around its model's modules (PEFT) sees a normal forward.
A model whose logits the chunked head cannot reproduce runs its own full-logits forward
instead, after one logged warning per model class.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from functools import lru_cache

import torch
from torch import Tensor, nn

from grouprl.models.attention import head_dim_of, packed_attention_active, resolve_backend
from grouprl.models.head import (
    HeadPlan,
    UnsupportedHead,
    chunked_head_logprobs,
    plan_head,
    token_logprobs,
)
from grouprl.models.packing import pack_groups
from grouprl.models.repeated import repeated_layout

log = logging.getLogger("grouprl")
_WARNED: set[type] = set()


class PolicyLogProbs(nn.Module):
    """Per-token log π and entropy of completion tokens: decoder + chunked LM head, one forward.

    Holds the HF causal LM as the submodule `model`. `shared_prefix` packs rows that share a
    prompt (consecutive, identical prompt ids and mask) and encodes the prompt once;
    `pack_rows` lets several such groups share a packed row where they fit (off: one group
    per row); `chunk_size` is the LM-head chunk (0: automatic); `attn_backend` the packed
    attention (auto, two_part, sdpa or flex).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        shared_prefix: bool = False,
        chunk_size: int = 0,
        attn_backend: str = "auto",
        pack_rows: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.shared_prefix = shared_prefix
        self.pack_rows = pack_rows
        self.chunk_size = chunk_size
        self.attn_backend = attn_backend
        # what the second output holds: the entropy, or CAPO's head curvature (head.py)
        self.second = "entropy"

    def forward(
        self,
        prompt_ids_NP: Tensor,
        prompt_mask_NP: Tensor,
        completion_ids_NT: Tensor,
        attention_mask_NT: Tensor,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        entropy_grad: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs [N, T] of every real completion token (attention mask 1), 0 elsewhere.

        Tokens the model sees but is not trained on (tool output inside a completion) are
        scored too: the caller applies its loss mask. Prompts may be left- or right-padded.
        """
        try:
            plan = plan_head(self.model)
        except UnsupportedHead as exc:
            if self.second != "entropy":
                raise NotImplementedError(
                    f"the {self.second} of the LM head needs the chunked head, but {exc}"
                ) from None
            if self.shared_prefix:
                raise NotImplementedError(
                    f"shared-prefix forward needs the chunked LM head, but {exc}"
                ) from None
            _warn_fallback(self.model, str(exc))
            return _full_logits(
                self.model,
                prompt_ids_NP,
                prompt_mask_NP,
                completion_ids_NT,
                attention_mask_NT,
                temperature,
                with_entropy,
                entropy_grad,
            )
        real_NT = attention_mask_NT.bool()
        hidden_of = self._packed_hidden if self.shared_prefix else self._repeated_hidden
        hidden_Md = hidden_of(plan, prompt_ids_NP, prompt_mask_NP, completion_ids_NT, real_NT)
        logp_M, ent_M = chunked_head_logprobs(
            hidden_Md,
            completion_ids_NT[real_NT],
            plan.head,
            temperature=temperature,
            chunk_size=self.chunk_size,
            entropy_grad=entropy_grad,
            scaling=plan.scaling,
            second=self.second,
        )
        return _scatter_NT(logp_M, real_NT), (_scatter_NT(ent_M, real_NT) if with_entropy else None)

    def _repeated_hidden(
        self,
        plan: HeadPlan,
        prompt_ids_NP: Tensor,
        prompt_mask_NP: Tensor,
        completion_ids_NT: Tensor,
        real_NT: Tensor,
    ) -> Tensor:
        """Hidden states [M, d] that predict the real completion tokens, in the repeated layout."""
        layout = repeated_layout(prompt_ids_NP, prompt_mask_NP, completion_ids_NT, real_NT)
        hidden_NLd = plan.decoder(**layout.model_inputs()).last_hidden_state
        return hidden_NLd[_rows_like(real_NT)[real_NT], layout.src_col_NT[real_NT]]

    def _packed_hidden(
        self,
        plan: HeadPlan,
        prompt_ids_NP: Tensor,
        prompt_mask_NP: Tensor,
        completion_ids_NT: Tensor,
        real_NT: Tensor,
    ) -> Tensor:
        """Hidden states [M, d] that predict the real completion tokens, in the packed layout."""
        layout = pack_groups(
            prompt_ids_NP, prompt_mask_NP, completion_ids_NT, real_NT, pack_rows=self.pack_rows
        )
        layout.backend = resolve_backend(
            self.attn_backend, completion_ids_NT.device, head_dim_of(self.model)
        )
        with packed_attention_active(self.model, layout):
            hidden_RLd = plan.decoder(
                input_ids=layout.input_ids_RL, position_ids=layout.position_ids_RL, use_cache=False
            ).last_hidden_state
        rows_NT = layout.row_N[:, None].expand_as(real_NT)
        return hidden_RLd[rows_NT[real_NT], layout.src_col_NT[real_NT]]


def completion_logprobs(
    model: nn.Module,
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    attention_mask_NT: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    shared_prefix: bool | None = None,
    chunk_size: int | None = None,
    attn_backend: str | None = None,
    entropy_grad: bool = False,
    second: str | None = None,
    pack_rows: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [N, T] of each real completion token given its prompt, optionally entropy
    (`second="curvature"`: CAPO's head curvature in its place, `head.head_curvature`).

    The functional face of `PolicyLogProbs`: `model` is an HF causal LM (wrapped for this
    call), a `PolicyLogProbs`, or a `DistributedDataParallel` around one, which is then
    called so its hooks run. The layout arguments (`shared_prefix`, `chunk_size`,
    `attn_backend`, `pack_rows`) default to the module's settings (PolicyLogProbs' defaults
    for a bare model); given, they decide for this call. Values are 0 where attention_mask_NT is 0;
    with `shared_prefix` they equal the repeated layout's up to float rounding.
    """
    policy = _policy_of(model)
    if policy is None:
        model = policy = PolicyLogProbs(model)
    with _settings(
        policy,
        shared_prefix=shared_prefix,
        chunk_size=chunk_size,
        attn_backend=attn_backend,
        second=second,
        pack_rows=pack_rows,
    ):
        return model(
            prompt_ids_NP,
            prompt_mask_NP,
            completion_ids_NT,
            attention_mask_NT,
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )


def _policy_of(model: nn.Module) -> PolicyLogProbs | None:
    """The PolicyLogProbs that `model` is, or wraps as `.module` (DDP), else None."""
    if isinstance(model, PolicyLogProbs):
        return model
    if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(
        model.module, PolicyLogProbs
    ):
        return model.module
    return None


@contextlib.contextmanager
def _settings(policy: PolicyLogProbs, **given: bool | int | str | None) -> Iterator[None]:
    """Override the policy's layout settings that were given (not None) for one call."""
    saved = {k: getattr(policy, k) for k in given}
    try:
        for k, v in given.items():
            if v is not None:
                setattr(policy, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(policy, k, v)


def _rows_like(x_NT: Tensor) -> Tensor:
    """Row index of every element of an [N, T] tensor."""
    return torch.arange(len(x_NT), device=x_NT.device)[:, None].expand_as(x_NT)


def _scatter_NT(values_M: Tensor, real_NT: Tensor) -> Tensor:
    return values_M.new_zeros(real_NT.shape).masked_scatter(real_NT, values_M)


def _warn_fallback(model: nn.Module, reason: str) -> None:
    cls = type(model)
    if cls not in _WARNED:
        _WARNED.add(cls)
        log.warning(
            "%s: chunked LM head off, using the model's full-logits forward (%s)",
            cls.__name__,
            reason,
        )


@lru_cache(maxsize=32)
def _accepts_logits_to_keep(forward: object) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def _full_logits(
    model: nn.Module,
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    attention_mask_NT: Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """The model's own forward (repeated layout), logits kept from the first predictor on."""
    real_NT = attention_mask_NT.bool()
    layout = repeated_layout(prompt_ids_NP, prompt_mask_NP, completion_ids_NT, attention_mask_NT)
    src_M = layout.src_col_NT[real_NT]
    L = layout.input_ids_NL.shape[1]
    first = int(src_M.min()) if len(src_M) else L - 1
    if _accepts_logits_to_keep(type(model).forward):
        logits_NKV = model(**layout.model_inputs(), logits_to_keep=L - first).logits
    else:
        logits_NKV = model(**layout.model_inputs()).logits[:, first:]
    # only columns first..L-1 were kept
    logits_MV = logits_NKV[_rows_like(real_NT)[real_NT], src_M - first]
    tau = temperature if temperature > 0 else 1.0
    logp_M, ent_M = token_logprobs(logits_MV, completion_ids_NT[real_NT], tau, entropy_grad)
    return _scatter_NT(logp_M, real_NT), (_scatter_NT(ent_M, real_NT) if with_entropy else None)
