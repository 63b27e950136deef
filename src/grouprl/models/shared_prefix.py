"""Shared-prefix packing: each prompt is encoded once for all completions of its group.

"Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward" (arXiv 2506.05433).
The repeated layout feeds G rows `[prompt; c_j]`. Here consecutive rows that share a prompt
become ONE packed row `[prompt; c_1; ...; c_G]` (only real tokens, no padding inside) with
split attention:

- a prompt token attends causally to the prompt;
- a token of completion j attends to the whole prompt and causally to completion j only;
- completion positions restart at the prompt length, as in the repeated layout.

Embeddings, norms and MLPs are per token and RoPE depends only on the position ids, so the
only change is the attention mask: it is enforced by a registered attention function
(`grouprl_packed`) that every model using the transformers attention interface calls, not
by a copy of each model's code. The prompt's keys/values exist once per packed row (never G
copies); gradients that reach them are the sum over the G completions, exactly as the
repeated layout's sum over its G prompt copies. The last prompt position predicts the first
token of every completion.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ATTN_NAME = "grouprl_packed"
_ACTIVE: contextvars.ContextVar[PackedLayout | None] = contextvars.ContextVar(
    "grouprl_packed_layout", default=None
)


@dataclass
class PackedLayout:
    """Where every token of a packed micro-batch sits.

    R packed rows of length L. segment_RL: -1 padding, 0 prompt, j >= 1 completion j of the row.
    For completion n (a row of the repeated layout) and its token t (< length_N[n]):
    target token completion_ids_NT[n, t] is predicted by the hidden state at
    (row_N[n], src_col_NT[n, t]).
    """

    input_ids_RL: Tensor
    position_ids_RL: Tensor
    segment_RL: Tensor
    row_N: Tensor
    src_col_NT: Tensor
    length_N: Tensor
    backend: str = "sdpa"  # "sdpa" (dense boolean mask) or "flex" (block-sparse FlexAttention)
    _masks: dict[Any, Any] = field(default_factory=dict)

    def attention_mask(self, sliding_window: int | None = None) -> Tensor:
        """Boolean [R, 1, L, L] mask (True = may attend), cached per sliding window."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = build_packed_mask(
                self.segment_RL, self.position_ids_RL, sliding_window
            )
        return self._masks[sliding_window]

    def block_mask(self, sliding_window: int | None = None) -> Any:
        """FlexAttention BlockMask of the same rule, built from segment ids (never [L, L] dense)."""
        key = ("flex", sliding_window)
        if key not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            seg, pos = self.segment_RL, self.position_ids_RL

            def mask_mod(b, h, q, k):
                sq, sk = seg[b, q], seg[b, k]
                ok = (k <= q) & (sk >= 0) & ((sk == 0) | (sk == sq))
                if sliding_window is not None:
                    ok = ok & (pos[b, q] - pos[b, k] < sliding_window)
                return ok

            R, L = seg.shape
            self._masks[key] = create_block_mask(
                mask_mod, B=R, H=None, Q_LEN=L, KV_LEN=L, device=seg.device
            )
        return self._masks[key]


def build_packed_mask(
    segment_RL: Tensor, position_ids_RL: Tensor, sliding_window: int | None = None
) -> Tensor:
    """Split causal attention of packed rows as a boolean [R, 1, L, L] mask.

    allowed(q, k) = k real and k <= q (causal in packing order) and
                    (segment_k == 0 (prompt) or segment_k == segment_q (same completion)).
    Since prompt tokens come first, a prompt query only ever sees prompt keys. With a sliding
    window w (Mistral-style), also position_q - position_k < w, positions being those of the
    repeated layout. A padding query sees key 0 only, so no softmax row is empty (no NaN).
    """
    L = segment_RL.shape[1]
    seg_q = segment_RL[:, :, None]
    seg_k = segment_RL[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_RL.device).tril()
    allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    if sliding_window is not None:
        dist = position_ids_RL[:, :, None] - position_ids_RL[:, None, :]
        allowed &= dist < sliding_window
    pad_q = seg_q.squeeze(-1) < 0
    allowed[pad_q] = False
    allowed[..., 0] |= pad_q
    return allowed[:, None]


def group_spans(prompt_ids_NP: Tensor, prompt_mask_NP: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive rows with the same prompt (one packed row each)."""
    N = prompt_ids_NP.shape[0]
    spans, start = [], 0
    for n in range(1, N + 1):
        if n == N or not (
            torch.equal(prompt_ids_NP[n], prompt_ids_NP[start])
            and torch.equal(prompt_mask_NP[n], prompt_mask_NP[start])
        ):
            spans.append((start, n))
            start = n
    return spans


def pack_groups(
    prompt_ids_NP: Tensor,
    prompt_mask_NP: Tensor,
    completion_ids_NT: Tensor,
    completion_mask_NT: Tensor,
    *,
    pad_token_id: int = 0,
) -> PackedLayout:
    """Pack rows that share a prompt into `[prompt; c_1; ...; c_G]` rows.

    Prompts may be left- or right-padded (their mask says which tokens are real); a
    completion's real tokens are the leading ones of its mask. Groups may have any size.
    """
    device = completion_ids_NT.device
    N, T = completion_ids_NT.shape
    length_N = completion_mask_NT.sum(dim=1).long()
    spans = group_spans(prompt_ids_NP, prompt_mask_NP)
    prompts = [prompt_ids_NP[s][prompt_mask_NP[s].bool()] for s, _ in spans]
    row_len = [len(p) + int(length_N[s:e].sum()) for p, (s, e) in zip(prompts, spans, strict=True)]
    R, L = len(spans), max(row_len)
    ids = torch.full((R, L), pad_token_id, dtype=completion_ids_NT.dtype, device=device)
    pos = torch.zeros((R, L), dtype=torch.long, device=device)
    seg = torch.full((R, L), -1, dtype=torch.long, device=device)
    row_N = torch.empty(N, dtype=torch.long, device=device)
    src_col_NT = torch.zeros((N, T), dtype=torch.long, device=device)
    t_range = torch.arange(T, device=device)
    for r, ((s, e), p) in enumerate(zip(spans, prompts, strict=True)):
        P = len(p)
        if P == 0:
            raise ValueError(
                "cannot pack an empty prompt: the first completion token has no predictor"
            )
        ids[r, :P] = p
        pos[r, :P] = torch.arange(P, device=device)
        seg[r, :P] = 0
        col = P
        for j, n in enumerate(range(s, e), start=1):
            ln = int(length_N[n])
            ids[r, col : col + ln] = completion_ids_NT[n, :ln]
            pos[r, col : col + ln] = torch.arange(P, P + ln, device=device)
            seg[r, col : col + ln] = j
            # token 0 is predicted by the last prompt position, token t by the one before it
            src = torch.where(t_range == 0, P - 1, col + t_range - 1)
            src_col_NT[n] = torch.where(t_range < ln, src, 0)  # padding positions: unused
            row_N[n] = r
            col += ln
    return PackedLayout(ids, pos, seg, row_N, src_col_NT, length_N)


def packed_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The registered attention function: SDPA under the packed layout's split mask.

    query [R, H, L, d], key/value [R, Hkv, L, d] -> output [R, L, H, d] (the interface's layout).
    """
    layout = _ACTIVE.get()
    if layout is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' called outside grouprl's packed forward")
    if kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "attention sinks / logit softcapping are not supported by the packed layout"
        )
    if layout.backend == "flex":
        out = _flex()(
            query,
            key,
            value,
            block_mask=layout.block_mask(sliding_window),
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    mask = layout.attention_mask(sliding_window)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


_FLEX_FN: Any = None


def _flex() -> Any:
    """flex_attention, compiled on GPU (dynamic shapes: packed lengths change every step).

    On CPU it runs eagerly (a reference implementation, used by the equivalence tests)."""
    global _FLEX_FN
    if _FLEX_FN is None:
        import warnings

        from torch.nn.attention.flex_attention import flex_attention

        if torch.cuda.is_available():
            _FLEX_FN = torch.compile(flex_attention, dynamic=True)
        else:

            def _eager(*args: Any, **kwargs: Any) -> Tensor:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return flex_attention(*args, **kwargs)

            _FLEX_FN = _eager
    return _FLEX_FN


def resolve_backend(name: str, device: torch.device) -> str:
    """auto -> flex on CUDA (block-sparse, no dense mask), sdpa elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name not in ("sdpa", "flex"):
        raise ValueError(
            f"unknown shared-prefix attention backend {name!r}; use auto, sdpa or flex"
        )
    return name


def register() -> None:
    """Make `grouprl_packed` a known transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, packed_attention)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Set every config's `_attn_implementation` to the registered `name`, then restore."""
    configs = {id(c): c for c in _configs(model)}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in saved:
            c._attn_implementation = name
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


@contextlib.contextmanager
def packed_attention_active(model: torch.nn.Module, layout: PackedLayout) -> Iterator[None]:
    """Route the model's attention through `grouprl_packed` for one forward."""
    register()
    token = _ACTIVE.set(layout)
    try:
        with attention_implementation(model, ATTN_NAME):
            yield
    finally:
        _ACTIVE.reset(token)


def _configs(model: torch.nn.Module) -> list:
    """Every config object whose `_attn_implementation` the model's attention reads."""
    out = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            out.append(cfg)
    return out


_RECURRENT_HINTS = ("mamba", "linear_attention", "recurrent", "conv", "gated_delta")


def check_support(model: torch.nn.Module, *, tolerance: float | None = None) -> tuple[bool, str]:
    """Can this model run the packed layout exactly? Returns (ok, one-line reason).

    Static checks first (plain LM head, attention-only layers), then a self-check: a tiny
    batch (one prompt, completions of lengths 3 and 1) must give the same log-probs packed
    as repeated, within `tolerance` (1e-4 in fp32, 2e-2 in half precision).
    """
    from grouprl.models.forward import completion_logprobs, plain_head

    cfg = getattr(model, "config", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    odd = sorted({t for t in layer_types if any(h in str(t) for h in _RECURRENT_HINTS)})
    if odd:
        return False, f"layers of type {', '.join(odd)} would carry state across packed completions"
    if not plain_head(model):
        return False, "its logits are post-processed after the LM head (scaling or softcapping)"
    param = next(model.parameters())
    vocab = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 4), generator=g).repeat(2, 1).to(param.device)
    comp = torch.randint(0, vocab, (2, 3), generator=g).to(param.device)
    pmask = torch.ones_like(prompt, dtype=torch.float32)
    cmask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], device=param.device)
    try:
        with torch.no_grad():
            a, _ = completion_logprobs(model, prompt, pmask, comp, cmask)
            b, _ = completion_logprobs(model, prompt, pmask, comp, cmask, shared_prefix=True)
    except Exception as exc:  # an attention path we cannot drive
        return (
            False,
            f"the packed forward failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        )
    tol = tolerance if tolerance is not None else (1e-4 if param.dtype == torch.float32 else 2e-2)
    err = float((a - b).abs().max())
    if not err <= tol:
        return (
            False,
            f"packed and repeated log-probs differ by {err:.2e} > {tol:.0e} on a self-check",
        )
    return True, "self-check passed"
