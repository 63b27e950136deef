"""Sampling G completions per prompt with one copy of the prompt's KV and a preallocated cache.

HF `generate` on G repeated prompts keeps G copies of each prompt's keys and values and
re-copies the whole cache every token (a concatenation per layer per step). Here the model's
own modules run, with a registered attention function (`grouprl_decode`) that holds:

- the prompt's keys/values once per prompt (prefilled once, never expanded to G rows);
- each sample's own keys/values in a buffer preallocated for `max_new_tokens` (written in
  place, one column per step);
- attention of a new token = one softmax over [its prompt's keys; its own past keys].

Rows that finished (EOS) stop costing compute: the rows still running are compacted to the
front of the buffers whenever a quarter of them has finished. Sampling follows HF's sampler
step for step (temperature, top-k, top-p warpers in HF's order, finished rows forced to the
pad token). How a token is drawn from the warped distribution is `draw`:

- `multinomial`: one `torch.multinomial` over all rows per step, as HF does, so a seeded run
  draws the same samples as `generate` (tests check it);
- `inverse_cdf` (the default): one uniform number per running row, looked up in the
  cumulative distribution. The same distribution (tested), far less work on a CPU:
  `torch.multinomial` there draws one exponential variate per vocabulary entry, 2.2 ms per
  step for 32 rows of 4,096 and 88 ms for a 151,936 vocabulary (`benchmarks/decoder.py
  --draw-only`), against 0.11 and 6.2 ms (medians).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grouprl.models.attention import attention_implementation
from grouprl.models.forward import _accepts_logits_to_keep

ATTN_NAME = "grouprl_decode"
DRAWS = ("inverse_cdf", "multinomial")
_STATE: contextvars.ContextVar[_DecodeState | None] = contextvars.ContextVar(
    "grouprl_decode_state", default=None
)


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The sampling warpers HF `generate` builds for these settings, in its order."""
    out = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p))
    return out


@dataclass
class _DecodeState:
    """What the attention function needs: per layer, the prompts' K/V [B, Hkv, P, d] and the
    samples' K/V buffers [N, Hkv, T, d]; which group each running row belongs to."""

    prompt_ok_BP: Tensor  # real prompt tokens (left padding is False)
    prompt_pos_BP: Tensor
    max_new_tokens: int
    prefill: bool = True
    t: int = 0  # column of the token being decoded
    prompt_k: dict[int, Tensor] = field(default_factory=dict)
    prompt_v: dict[int, Tensor] = field(default_factory=dict)
    k_buf: dict[int, Tensor] = field(default_factory=dict)
    v_buf: dict[int, Tensor] = field(default_factory=dict)
    # running rows (the first n rows of the buffers): their group, position of the current
    # token, and the [B, Gp] grid that lays them out by group for the prompt part
    grp_n: Tensor | None = None
    pos_n: Tensor | None = None
    grid_BG: Tensor | None = None  # row index per (group, slot); n (a spare) where empty
    flat_n: Tensor | None = None  # each row's flat index into the grid
    # per sliding window: [n, 1, 1, P], True where a running row may not see its prompt's
    # key, for this step (every layer reads the same one)
    blocked: dict[int | None, Tensor] = field(default_factory=dict)

    def set_rows(self, grp_n: Tensor, pos_n: Tensor, B: int) -> None:
        """Lay the running rows (sorted by group) out in the per-group grid."""
        self.blocked.clear()
        self.grp_n, self.pos_n = grp_n, pos_n
        n = len(grp_n)
        counts = torch.bincount(grp_n, minlength=B)
        Gp = max(int(counts.max()) if n else 1, 1)
        first = torch.cumsum(counts, 0) - counts
        slot_n = torch.arange(n, device=grp_n.device) - first[grp_n]
        self.flat_n = grp_n * Gp + slot_n
        grid = torch.full((B * Gp,), n, dtype=torch.long, device=grp_n.device)
        grid[self.flat_n] = torch.arange(n, device=grp_n.device)
        self.grid_BG = grid.view(B, Gp)

    def prompt_blocked(self, window: int | None) -> Tensor:
        """[n, 1, 1, P] bool: True where a running row may not attend to its prompt's key (a
        padding token, or one outside `window` of the row's position)."""
        if window not in self.blocked:
            assert self.grp_n is not None and self.pos_n is not None
            ok_nP = self.prompt_ok_BP[self.grp_n]
            if window is not None:
                ok_nP = ok_nP & (self.pos_n[:, None] - self.prompt_pos_BP[self.grp_n] < window)
            self.blocked[window] = ~ok_nP[:, None, None, :]
        return self.blocked[window]


def draw_inverse_cdf(probs_nV: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row [n] from probabilities [n, V] (rows need not sum to 1; zeros are
    never drawn): a uniform u in [0, total) per row, the first index whose cumulative sum
    exceeds it. float32 throughout (a CPU cumsum accumulates in float64 and rounds each
    entry once), so a token's chance is its probability to within ~1e-7."""
    c_nV = probs_nV.float().cumsum(-1)
    total_n1 = c_nV[:, -1:].contiguous()
    if not bool((torch.isfinite(total_n1) & (total_n1 > 0)).all()):
        raise ValueError("rollout.draw: a row's sampling distribution is not finite (NaN logits?)")
    u_n1 = torch.rand((c_nV.shape[0], 1), device=c_nV.device, generator=generator)
    idx_n = torch.searchsorted(c_nV, u_n1 * total_n1, right=True).squeeze(1)
    # u * total can round up to total, and a GPU's float32 cumsum may step by an ulp over a
    # zero: then the last drawable token (a token of probability 0 is never returned)
    last_n = torch.searchsorted(c_nV, total_n1).squeeze(1)
    idx_n = idx_n.clamp(max=c_nV.shape[1] - 1)
    drawable_n = probs_nV.gather(1, idx_n[:, None]).squeeze(1) > 0
    return torch.where(drawable_n, idx_n, last_n)


def _step_multinomial(
    procs: LogitsProcessorList,
    seq_NL: Tensor,
    L: int,
    logits_nV: Tensor,
    slot_n: Tensor,
    greedy: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """HF's sampler step: every row of the batch [N], finished ones included (their logits
    zero), one `torch.multinomial` over all of them."""
    full_NV = logits_nV.new_zeros((seq_NL.shape[0], logits_nV.shape[1]))
    full_NV[slot_n] = logits_nV
    scores_NV = procs(seq_NL[:, :L], full_NV)
    if greedy:
        return scores_NV.argmax(-1)
    return torch.multinomial(F.softmax(scores_NV, dim=-1), 1, generator=generator).squeeze(1)


def _step_inverse_cdf(
    procs: LogitsProcessorList,
    seq_NL: Tensor,
    L: int,
    logits_nV: Tensor,
    slot_n: Tensor,
    greedy: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """The running rows only, one uniform each (`draw_inverse_cdf`); [N], the rows not
    running hold 0 (the caller forces finished rows to the pad token)."""
    scores_nV = procs(seq_NL[slot_n, :L], logits_nV)
    nxt_N = torch.zeros(seq_NL.shape[0], dtype=seq_NL.dtype, device=seq_NL.device)
    if greedy:
        nxt_N[slot_n] = scores_nV.argmax(-1)
    else:
        nxt_N[slot_n] = draw_inverse_cdf(F.softmax(scores_nV, dim=-1), generator)
    return nxt_N


# rollout.draw: how one decode step draws its tokens
_DRAW_STEPS = {"inverse_cdf": _step_inverse_cdf, "multinomial": _step_multinomial}
assert set(_DRAW_STEPS) == set(DRAWS)


def _layer(module: torch.nn.Module) -> int:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        raise NotImplementedError(f"{type(module).__name__} has no layer_idx")
    return int(idx)


def decode_attention(
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
    """The registered attention function. Prefill: causal attention over the prompts, whose
    K/V are kept. Decode: one new token per running row against [prompt K/V; own K/V].

    query [R, H, L, d], key/value [R, Hkv, L, d] -> output [R, L, H, d]."""
    st = _STATE.get()
    if st is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' called outside grouprl's decoder")
    if kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("attention sinks / logit softcapping")
    i = _layer(module)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if st.prefill:
        return _prefill(st, i, query, key, value, scale, sliding_window)
    return _decode(st, i, query, key, value, scale, sliding_window)


def _prefill(
    st: _DecodeState, i: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None
) -> tuple[Tensor, None]:
    st.prompt_k[i], st.prompt_v[i] = k, v
    P = q.shape[2]
    idx = torch.arange(P, device=q.device)
    ok = (idx[None, :] <= idx[:, None])[None] & st.prompt_ok_BP[:, None, :]
    if window is not None:
        pos = st.prompt_pos_BP
        ok = ok & (pos[:, :, None] - pos[:, None, :] < window)
    ok = ok | torch.eye(P, dtype=torch.bool, device=q.device)[None]  # a pad query sees itself
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=ok[:, None], scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def _decode(
    st: _DecodeState, i: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None
) -> tuple[Tensor, None]:
    n, H, _, d = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    t = st.t
    if i not in st.k_buf:
        shape = (n, Hkv, st.max_new_tokens, d)
        st.k_buf[i] = k.new_empty(shape)
        st.v_buf[i] = v.new_empty(shape)
    st.k_buf[i][:n, :, t] = k[:, :, 0]
    st.v_buf[i][:n, :, t] = v[:, :, 0]
    k_own, v_own = st.k_buf[i][:n, :, : t + 1], st.v_buf[i][:n, :, : t + 1]
    q_n = q[:, :, 0].reshape(n, Hkv, rep, d) * scale
    assert st.grid_BG is not None and st.flat_n is not None and st.pos_n is not None
    B, Gp = st.grid_BG.shape
    kp, vp = st.prompt_k[i], st.prompt_v[i]  # [B, Hkv, P, d]
    P = kp.shape[2]

    full = n == B * Gp  # every group has Gp running rows: the grid is the rows in order

    def to_grid(x: Tensor) -> Tensor:  # [n, Hkv, rep, k] -> [B, Hkv, Gp*rep, k]
        if not full:  # empty slots read a spare row of zeros
            x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[st.grid_BG.reshape(-1)]
        return x.view(B, Gp, Hkv, rep, -1).permute(0, 2, 1, 3, 4).reshape(B, Hkv, Gp * rep, -1)

    def from_grid(x: Tensor) -> Tensor:  # [B, Hkv, Gp*rep, k] -> [n, Hkv, rep, k]
        x = x.view(B, Hkv, Gp, rep, -1).permute(0, 2, 1, 3, 4).reshape(B * Gp, Hkv, rep, -1)
        return x if full else x[st.flat_n]

    # scores against the prompt, computed per group on the [B, Gp] grid of running rows
    s_p = from_grid(to_grid(q_n) @ kp.transpose(-1, -2))  # [n, Hkv, rep, P]
    # scores against its own past tokens
    s_o = q_n @ k_own.transpose(-1, -2)  # [n, Hkv, rep, t+1]
    if window is not None and t + 1 > window:
        s_o[..., : t + 1 - window] = float("-inf")
    # one softmax over [prompt; own past], in fp32 whatever the model's dtype (a row always
    # sees its own current token, so no row is all -inf); blocked keys are filled, not
    # added to: a score that overflowed to inf in half precision would make the sum NaN
    s_p = s_p.float().masked_fill(st.prompt_blocked(window), float("-inf"))
    s = torch.cat([s_p, s_o.float()], dim=-1)
    w = torch.softmax(s, dim=-1).to(v.dtype)
    e_p, e_o = w[..., :P], w[..., P:]
    out_o = e_o @ v_own  # [n, Hkv, rep, d]
    out = from_grid(to_grid(e_p) @ vp) + out_o
    return out.reshape(n, 1, H, d), None


def register() -> None:
    AttentionInterface.register(ATTN_NAME, decode_attention)


def _logits(model: torch.nn.Module, ids: Tensor, pos: Tensor) -> Tensor:
    """The model's next-token logits [R, V] (fp32) at the last column."""
    kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(model).forward) else {}
    out = model(input_ids=ids, position_ids=pos, use_cache=False, **kw)
    return out.logits[:, -1].float()


@torch.no_grad()
def sample_groups(
    model: torch.nn.Module,
    ids_BP: Tensor,
    mask_BP: Tensor,
    *,
    G: int,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    logits_out: list[tuple[Tensor, Tensor]] | None = None,
    generator: torch.Generator | None = None,
    logp_out_NT: Tensor | None = None,
    draw: str = "inverse_cdf",
) -> Tensor:
    """Completion ids [B*G, T] (T <= max_new_tokens; pad after EOS) for left-padded prompts
    [B, P], the G samples of prompt b in rows b*G..b*G+G-1. `logits_out` (for checks)
    receives (rows, logits) of every step: the logits that chose column t of those rows.
    `generator` draws the samples instead of torch's global RNG. `logp_out_NT` ([B*G,
    max_new_tokens], float32) receives log softmax(logits / temperature) of each sampled
    token: the sampler's log-probs as the trainer's forward defines them (temperature only,
    no top-k / top-p truncation). `draw`: how a token is drawn (`DRAWS`, module docstring)."""
    if draw not in DRAWS:
        raise ValueError(f"rollout.draw: {draw!r} is not one of {', '.join(DRAWS)}")
    B, _ = ids_BP.shape
    N, dev = B * G, ids_BP.device
    register()
    pos_BP = (mask_BP.long().cumsum(1) - 1).clamp(min=0)
    st = _DecodeState(
        prompt_ok_BP=mask_BP.bool(), prompt_pos_BP=pos_BP, max_new_tokens=max(max_new_tokens, 1)
    )
    procs = warpers(temperature, top_k, top_p)
    greedy = temperature == 0
    eos = torch.tensor(eos_ids, device=dev)
    out_NT = torch.full((N, max_new_tokens), pad_id, dtype=ids_BP.dtype, device=dev)
    # the sequences so far, for the warpers (HF passes them; these ones do not read them)
    seq = torch.cat([ids_BP.repeat_interleave(G, 0), out_NT], dim=1)
    P = ids_BP.shape[1]
    token = _STATE.set(st)
    try:
        with attention_implementation(model, ATTN_NAME):
            logits = _logits(model, ids_BP, pos_BP).repeat_interleave(G, 0)  # [N, V]
            if logits_out is not None:
                logits_out.append((torch.arange(N, device=dev), logits))
            st.prefill = False
            slot_n = torch.arange(N, device=dev)  # the sample each running row is
            unfinished_N = torch.ones(N, dtype=torch.bool, device=dev)
            last_pos_B = pos_BP[:, -1]
            T = 0
            for t in range(max_new_tokens):
                nxt = _DRAW_STEPS[draw](procs, seq, P + t, logits, slot_n, greedy, generator)
                if logp_out_NT is not None:
                    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
                    logp_out_NT[slot_n, t] = (
                        F.log_softmax(scaled, dim=-1).gather(1, nxt[slot_n, None]).squeeze(1)
                    )
                nxt = torch.where(unfinished_N, nxt, pad_id)
                out_NT[:, t] = nxt
                seq[:, P + t] = nxt
                T = t + 1
                unfinished_N = unfinished_N & ~torch.isin(nxt, eos)
                if not bool(unfinished_N.any()) or t + 1 == max_new_tokens:
                    break
                # the next forward runs token t of each running row (written at column t)
                slot_n = _compact(st, slot_n, unfinished_N, t)
                st.t = t
                grp_n = slot_n // G
                st.set_rows(grp_n, last_pos_B[grp_n] + t + 1, B)
                logits = _logits(model, out_NT[slot_n, t : t + 1], st.pos_n[:, None])
                if logits_out is not None:
                    logits_out.append((slot_n.clone(), logits))
    finally:
        _STATE.reset(token)
    return out_NT[:, : max(T, 1)]


def _compact(st: _DecodeState, slot_n: Tensor, unfinished_N: Tensor, t: int) -> Tensor:
    """Drop finished rows from the running set once a quarter of them has finished: the
    buffers' running rows move to the front (columns 0..t-1, the ones written so far)."""
    running = unfinished_N[slot_n]
    n = len(slot_n)
    if bool(running.all()) or int(running.sum()) > 0.75 * n:
        return slot_n
    keep = running.nonzero().squeeze(1)
    for bufs in (st.k_buf, st.v_buf):
        for buf in bufs.values():
            buf[: len(keep), :, :t] = buf[keep, :, :t]
    return slot_n[keep]


@torch.no_grad()
def check_decoder(model: torch.nn.Module, vocab_size: int) -> tuple[bool, str]:
    """Can `sample_groups` run this model? (ok, one-line reason). A probe: two left-padded
    random prompts, 2 samples each, 4 greedy tokens; the logits of every step must equal the
    model's own forward on [prompt; tokens so far] (within 1e-3 of their scale)."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 6), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    steps: list[tuple[Tensor, Tensor]] = []
    try:
        comp = sample_groups(
            model,
            ids,
            mask,
            G=2,
            max_new_tokens=4,
            eos_ids=[],
            pad_id=0,
            temperature=0.0,
            logits_out=steps,
        )
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    full_ids = torch.cat([ids.repeat_interleave(2, 0), comp], 1)
    full_mask = torch.cat([mask.repeat_interleave(2, 0), torch.ones_like(comp)], 1)
    pos = (full_mask.cumsum(1) - 1).clamp(min=0)
    ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits.float()
    P = ids.shape[1]
    worst = 0.0
    for t, (rows, logits) in enumerate(steps):
        want = ref[rows, P - 1 + t]
        scale = float(want.abs().max()) or 1.0
        worst = max(worst, float((logits - want).abs().max()) / scale)
    if worst > 1e-3:
        return False, f"decoder logits differ from the model's forward by {worst:.1e} (relative)"
    return True, "ok"
