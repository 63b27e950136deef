"""The `grouprl_packed` transformers attention function: the packed layout's split mask.

Prefix Grouper (arXiv 2506.05433) changes only the attention mask: embeddings, norms and
MLPs are per token and RoPE depends only on the position ids. So instead of a copy of each
model's code, a function registered with `transformers.AttentionInterface` applies the
packed layout's split mask (`packing.allowed`) in every attention layer of any model that
calls the interface. `packed_attention_active` routes a model to it for one forward;
transformers builds no mask for an implementation it does not know, so the model code runs
untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention
from transformers import AttentionInterface

from grouprl.models.packing import PackedLayout
from grouprl.models.two_part import two_part_attention

ATTN_NAME = "grouprl_packed"
_ACTIVE: contextvars.ContextVar[PackedLayout | None] = contextvars.ContextVar(
    "grouprl_packed_layout", default=None
)
# the configs routed to `grouprl_packed` with the active layout (for a recompute, below)
_ROUTED: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "grouprl_packed_configs", default=()
)


def packed_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The registered attention function: the active layout's split rule, by its backend
    (two-part, dense-mask SDPA or flex).

    query [R, H, L, d], key/value [R, Hkv, L, d] -> output [R, L, H, d] (the interface's layout).
    """
    layout = _ACTIVE.get()
    if layout is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' called outside grouprl's packed forward")
    if kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "attention sinks / logit softcapping are not supported by the packed layout"
        )
    gqa = key.shape[1] != query.shape[1]
    if layout.backend == "two_part":
        out = two_part_attention(
            query,
            key,
            value,
            layout.two_part_plan(sliding_window),
            scaling=scaling,
            sliding_window=sliding_window,
        )
    elif layout.backend == "flex":
        out = flex_attention_fn()(
            query,
            key,
            value,
            block_mask=layout.block_mask(sliding_window),
            scale=scaling,
            enable_gqa=gqa,
        )
    else:
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=layout.attention_mask(sliding_window),
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        )
    return out.transpose(1, 2).contiguous(), None


_FLEX_FN: Callable[..., Tensor] | None = None


def flex_attention_fn() -> Callable[..., Tensor]:
    """flex_attention, compiled on GPU (dynamic shapes: packed lengths change every step).

    On CPU it runs eagerly (a reference implementation, used by the equivalence tests)."""
    global _FLEX_FN
    if _FLEX_FN is None:
        if torch.cuda.is_available():
            _FLEX_FN = torch.compile(flex_attention, dynamic=True)
        else:

            def _eager(*args: Any, **kwargs: Any) -> Tensor:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "flex_attention is not compiled"
                    return flex_attention(*args, **kwargs)

            _FLEX_FN = _eager
    return _FLEX_FN


# flex_attention's compiled CUDA kernel needs head dims of at least 16 ("NYI: embedding
# dimension ... must be at least 16"); smaller heads (tiny test models) take SDPA.
FLEX_MIN_HEAD_DIM = 16


def head_dim_of(model: torch.nn.Module) -> int | None:
    """The attention head size from the model's (text) config, when it says."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hd = getattr(cfg, "head_dim", None)
    if not hd and getattr(cfg, "hidden_size", None) and getattr(cfg, "num_attention_heads", None):
        hd = cfg.hidden_size // cfg.num_attention_heads
    return int(hd) if hd else None


# the packed layout's attention: a dense mask (sdpa), block-sparse flex attention, or the
# two-part form (models/two_part.py)
BACKENDS = ("two_part", "sdpa", "flex")


def resolve_backend(name: str, device: torch.device, head_dim: int | None = None) -> str:
    """auto -> flex on CUDA (block-sparse, no dense mask) when the heads are large enough for
    its kernel, two_part elsewhere (prompt once + each completion on its own, no mask over
    the whole packed row)."""
    small = head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM
    if name == "auto":
        return "flex" if device.type == "cuda" and not small else "two_part"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown shared-prefix attention backend {name!r}; use auto, " + ", ".join(BACKENDS)
        )
    if name == "flex" and small and device.type == "cuda":
        raise ValueError(
            f"model.shared_prefix_backend flex: this model's attention heads have {head_dim} "
            f"dimensions; flex attention's CUDA kernel needs at least {FLEX_MIN_HEAD_DIM} "
            "(use auto or sdpa)"
        )
    return name


def register() -> None:
    """Make `grouprl_packed` a known transformers attention implementation (idempotent)."""
    AttentionInterface.register(ATTN_NAME, packed_attention)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Set every config's `_attn_implementation` to the registered `name`, then restore."""
    with _swapped(_configs(model), name):
        yield


@contextlib.contextmanager
def _swapped(configs: tuple[Any, ...], name: str) -> Iterator[None]:
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in saved:
            c._attn_implementation = name
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


@contextlib.contextmanager
def _routed(layout: PackedLayout, configs: tuple[Any, ...]) -> Iterator[None]:
    """`layout` active and `configs` routed to `grouprl_packed`, then both restored."""
    token, routed = _ACTIVE.set(layout), _ROUTED.set(configs)
    try:
        with _swapped(configs, ATTN_NAME):
            yield
    finally:
        _ROUTED.reset(routed)
        _ACTIVE.reset(token)


@contextlib.contextmanager
def packed_attention_active(model: torch.nn.Module, layout: PackedLayout) -> Iterator[None]:
    """Route the model's attention through `grouprl_packed` under `layout` for one forward."""
    register()
    with _routed(layout, _configs(model)):
        yield


def recompute_context() -> tuple[contextlib.AbstractContextManager, ...]:
    """`context_fn` for torch.utils.checkpoint (activation checkpointing, non-reentrant): a
    layer recomputed in the backward, after the packed forward's `with` has ended, runs under
    the layout and routing its forward ran under (captured here, at the forward), so the
    recompute is the same computation. Outside a packed forward: nothing to restore."""
    layout = _ACTIVE.get()
    if layout is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), _routed(layout, _ROUTED.get())


def _configs(model: torch.nn.Module) -> tuple[Any, ...]:
    """Every config object whose `_attn_implementation` the model's attention reads, once."""
    out: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)  # only HF modules carry one
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            out.setdefault(id(cfg), cfg)
    return tuple(out.values())
