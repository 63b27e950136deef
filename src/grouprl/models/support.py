"""Whether a model can run the shared-prefix layout exactly (`check_support`), with a reason.

The packed layout of Prefix Grouper (arXiv 2506.05433) is exact only when tokens interact
through attention alone: an SSM, a convolution or any recurrent state would carry one
completion into the next one packed after it. So `check_support` accepts a model only when
(1) the chunked LM head reproduces its logits (`head.plan_head`: a separate decoder, no
softcapping), (2) every entry of its config's `layer_types` is a full or sliding attention
layer, (3) no module of its decoder looks like a state-carrying mixer (SSM, mamba,
convolution, recurrence, linear attention, gated delta rule, RWKV), and (4) a numeric
self-check in fp32 (eval mode) gives the same log-probs packed as repeated on a batch laid
out as training packs it (`probe_batch`: three groups of completions of several tokens, the
two short ones sharing a packed row, left-padded prompts), so a completion that can see
another one, or a group that can see another group of its row, shows up, and the same
gradients for the first decoder layer's parameters: a parameter the repeated layout
uses but the packed one bypasses (a learned bias built into the attention mask, as Doge's
dynamic mask, whose values agree at initialization) shows there even when values agree.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from grouprl.models.forward import completion_logprobs
from grouprl.models.head import UnsupportedHead, plan_head

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# Words (CamelCase parts of a module's class name) and phrases (lowercased class name) of
# modules that keep state across tokens.
_STATE_WORDS = frozenset({"ssm", "mamba", "conv", "recurrent", "rnn", "lstm", "rwkv", "hyena"})
_STATE_PHRASES = ("linearattention", "gateddelta", "deltanet", "lightningattention", "retention")
# Self-check batch: (prompt length, completion lengths) per group. The first group fills a
# packed row (5 + 9 = 14 tokens); the other two (5 and 6 tokens) share the second row.
_GROUPS: tuple[tuple[int, tuple[int, ...]], ...] = ((5, (3, 4, 2)), (2, (2, 1)), (3, (1, 2)))
_GRAD_RTOL = 1e-3  # fp32 gradients of the two layouts agree to ~1e-6 relative on real models


def check_support(model: nn.Module, *, tolerance: float | None = None) -> tuple[bool, str]:
    """Can this HF causal LM use the packed layout exactly? Returns (ok, one-line reason).

    `tolerance` bounds the self-check's max |packed - repeated| log-prob difference (1e-4).
    The self-check runs in fp32: on a half-precision model it runs on an fp32 copy (memory:
    one fp32 copy of the weights, for the duration of the check).
    """
    try:
        plan = plan_head(model)
    except UnsupportedHead as exc:
        return False, str(exc)
    cfg = model.config.get_text_config()
    layer_types = getattr(cfg, "layer_types", None) or ()  # configs without it: the walk decides
    odd = sorted({str(t) for t in layer_types} - ATTENTION_LAYER_TYPES)
    if odd:
        return False, (
            f"layer_types {', '.join(odd)}: only full/sliding attention layers pack exactly "
            "(a recurrent/convolution state or another attention pattern would mix completions)"
        )
    stateful = _stateful_module(plan.decoder)
    if stateful:
        return False, (
            f"module {stateful} keeps state across tokens: "
            "it would carry one packed completion into the next"
        )
    return _self_check(model, 1e-4 if tolerance is None else tolerance)


def _stateful_module(decoder: nn.Module) -> str | None:
    """'name (Class)' of the first decoder module that looks like an SSM/conv/recurrent mixer."""
    for name, m in decoder.named_modules():
        if isinstance(m, Conv1D):  # GPT-2's "Conv1D" is a linear layer
            continue
        cls = type(m).__name__
        words = {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", cls)}
        if (
            isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            or words & _STATE_WORDS
            or any(p in cls.lower() for p in _STATE_PHRASES)
        ):
            return f"{name or '<decoder>'} ({cls})"
    return None


def probe_batch(vocab: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The self-check's batch (prompt_ids_NP, prompt_mask_NP, completion_ids_NT,
    attention_mask_NT) of `_GROUPS`: random ids under `vocab` (seed 0), prompts left-padded
    to the longest, completions right-padded; distinct prompts (lengths differ), so each
    group is its own."""
    g = torch.Generator().manual_seed(0)
    P = max(p for p, _ in _GROUPS)
    T = max(max(ls) for _, ls in _GROUPS)
    prompts, pmasks, lengths = [], [], []
    for p_len, ls in _GROUPS:
        ids = torch.zeros(P, dtype=torch.long)
        ids[P - p_len :] = torch.randint(0, vocab, (p_len,), generator=g)
        mask = (torch.arange(P) >= P - p_len).float()
        prompts += [ids] * len(ls)
        pmasks += [mask] * len(ls)
        lengths += ls
    comp_NT = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask_NT = (torch.arange(T) < torch.tensor(lengths)[:, None]).float()
    out = [torch.stack(prompts), torch.stack(pmasks), comp_NT, mask_NT]
    return [t.to(device) for t in out]


def _self_check(model: nn.Module, tolerance: float) -> tuple[bool, str]:
    """Packed vs repeated log-probs in fp32 on a batch where a leak between completions, or
    between groups of a packed row, shows."""
    param = next(model.parameters())
    probe = model if param.dtype == torch.float32 else copy.deepcopy(model).float()
    vocab = probe.get_input_embeddings().weight.shape[0]
    args = probe_batch(vocab, param.device)
    mask_NT = args[3]
    modes = {m: m.training for m in probe.modules()}
    probe.eval()  # dropout would make the two layouts differ at random
    try:
        with torch.no_grad():
            want, _ = completion_logprobs(probe, *args)
            got, _ = completion_logprobs(probe, *args, shared_prefix=True, pack_rows=True)
    except Exception as exc:  # an attention path we cannot drive
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return False, f"the packed forward failed: {type(exc).__name__}: {first_line}"
    finally:
        for m, training in modes.items():
            m.training = training
    err = float((want - got).abs().max())
    if not err <= tolerance:
        return False, (
            f"packed and repeated log-probs differ by {err:.2e} > {tolerance:.0e} on a self-check"
        )
    bad = _gradient_check(probe, args, mask_NT)
    if bad:
        return False, bad
    return True, "attention-only layers, chunked LM head, self-check passed"


def _first_layer_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of the first decoder layer (every layer has the same structure),
    or of the whole model when no layer list is found; a bounded gradient to compare."""
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == n_layers:
            return [
                (f"{name}.0.{n}", p) for n, p in module[0].named_parameters() if p.requires_grad
            ]
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _gradient_check(probe: nn.Module, args: list[torch.Tensor], mask_NT: torch.Tensor) -> str:
    """'' when both layouts give the first layer the same gradient of a weighted log-prob sum,
    else the reason (a parameter only one layout uses, or gradients that differ)."""
    params = _first_layer_params(probe)
    if not params:
        return ""
    g = torch.Generator().manual_seed(1)
    w_NT = torch.randn(mask_NT.shape, generator=g).to(mask_NT.device) * mask_NT
    modes = {m: m.training for m in probe.modules()}
    probe.eval()
    grads = []
    try:
        for shared in (False, True):
            with torch.enable_grad():
                logp, _ = completion_logprobs(probe, *args, shared_prefix=shared, pack_rows=True)
                loss = (logp * w_NT).sum()
                grads.append(torch.autograd.grad(loss, [p for _, p in params], allow_unused=True))
    finally:
        for m, training in modes.items():
            m.training = training
    # relative to the layer's largest gradient: a gradient that is zero in exact arithmetic
    # (a key bias, which softmax ignores) is rounding noise in both layouts
    scale = max([float(a.abs().max()) for a in grads[0] if a is not None] + [1e-12])
    for (name, _), a, b in zip(params, grads[0], grads[1], strict=True):
        if (a is None) != (b is None):
            return (
                f"parameter {name} gets a gradient in the repeated layout only: the packed "
                "layout bypasses something it feeds (e.g. a learned attention-mask bias)"
                if b is None
                else f"parameter {name} gets a gradient in the packed layout only"
            )
        if a is not None:
            err = float((a - b).abs().max())
            if err > _GRAD_RTOL * scale:
                return (
                    f"packed and repeated gradients differ for {name} ({err:.2e}, "
                    f"{err / scale:.1e} of the layer's largest) on a self-check"
                )
    return ""
