"""Completion masks that are not a prefix of ones: context tokens mid-completion, holes, padding.

The reference (`naive_logprobs`) is the model's own forward on the repeated rows
`[prompt; completion]` with the attention mask and cumsum positions, log-softmax of its
logits, each real completion token read at the real token before it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_model

from grouprl.models.forward import completion_logprobs
from grouprl.models.packing import pack_groups


def naive_logprobs(model, pid_NP, pmask_NP, cid_NT, amask_NT, temperature: float = 1.0):
    """The model's own logits on rows [prompt; completion]; 0 where the attention mask is 0."""
    ids = torch.cat([pid_NP, cid_NT], 1)
    mask = torch.cat([pmask_NP, amask_NT], 1).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    lsm = torch.log_softmax(logits.float() / temperature, -1)
    P, (N, T) = pid_NP.shape[1], cid_NT.shape
    prev = torch.zeros(N, T, dtype=torch.long, device=ids.device)
    for n in range(N):
        real = [j for j in range(P + T) if mask[n, j]]
        for t in range(T):
            if amask_NT[n, t]:
                prev[n, t] = max(j for j in real if j < P + t)  # the real token before it
    rows = torch.arange(N, device=ids.device)[:, None].expand(N, T)
    return torch.where(amask_NT.bool(), lsm[rows, prev, cid_NT], 0.0)


def prompts(tok, texts: list[str], pad_side: str = "left"):
    tok.padding_side = pad_side
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "left"
    return enc["input_ids"], enc["attention_mask"].float()


def context_batch(tok):
    """Two groups (3 + 2 rows); completions of real tokens (a prefix of ones) whose loss mask
    has 0s in the middle: tokens the model sees but is not trained on (tool output)."""
    pid, pmask = prompts(tok, ["12+34="] * 3 + ["7+8="] * 2)
    g = torch.Generator().manual_seed(3)
    cid = torch.randint(4, len(tok), (5, 7), generator=g)
    lengths = torch.tensor([7, 5, 6, 7, 3])
    amask = (torch.arange(7) < lengths[:, None]).float()
    loss_mask = amask.clone()
    loss_mask[0, 2:4] = 0  # context in the middle
    loss_mask[2, 1:5] = 0
    loss_mask[3, 3] = 0
    return (pid, pmask, cid, amask), loss_mask


def grads(model, logp, loss_mask):
    model.zero_grad(set_to_none=True)
    # every token weighted differently, so mixed-up positions would show
    w = torch.linspace(0.5, 1.5, logp.numel(), device=logp.device).view_as(logp)
    (logp * loss_mask * w).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(g_ref, g_got, rel=1e-4):
    assert set(g_ref) == set(g_got)
    for n, g in g_ref.items():
        err = (g - g_got[n]).norm() / g.norm().clamp(min=1e-12)
        assert err <= rel, (n, float(err))


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["repeated", "shared"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_context_tokens_mid_completion_match_naive(arch, shared_prefix):
    model, tok = tiny_model(arch)
    args, loss_mask = context_batch(tok)
    amask = args[3]
    ref = naive_logprobs(model, *args, temperature=0.8)
    got, ent = completion_logprobs(
        model, *args, temperature=0.8, with_entropy=True, shared_prefix=shared_prefix
    )
    assert (ref - got).abs().max() <= 1e-5
    # every real token is scored (context ones too), everything else is exactly 0
    assert bool((got[(amask == 1) & (loss_mask == 0)] != 0).all())
    assert bool((got[amask == 0] == 0).all()) and bool((ent[amask == 0] == 0).all())
    assert_same_grads(grads(model, ref, loss_mask), grads(model, got, loss_mask))


def hole_batch(tok, hole_token: int = 5):
    """Completions whose attention mask has holes (padding between real tokens), and the same
    completions with the holes removed."""
    pid, pmask = prompts(tok, ["12+34="] * 3 + ["9+9="] * 2)
    g = torch.Generator().manual_seed(4)
    cid = torch.randint(4, len(tok), (5, 8), generator=g)
    amask = torch.ones(5, 8)
    amask[0, 2] = 0
    amask[1, 3:5] = 0
    amask[1, 7] = 0
    amask[3, 1] = 0
    amask[4, 6:] = 0
    cid = torch.where(amask.bool(), cid, hole_token)
    compact_ids = torch.zeros_like(cid)
    compact_mask = torch.zeros_like(amask)
    for n in range(5):
        real = cid[n][amask[n].bool()]
        compact_ids[n, : len(real)] = real
        compact_mask[n, : len(real)] = 1
    return (pid, pmask, cid, amask), (pid, pmask, compact_ids, compact_mask)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_holes_in_the_attention_mask(arch):
    model, tok = tiny_model(arch)
    holes, compact = hole_batch(tok)
    amask = holes[3]
    want_c, _ = completion_logprobs(model, *compact)
    for shared_prefix in (False, True):
        got = completion_logprobs(model, *holes, shared_prefix=shared_prefix)[0]
        # a hole is not there: the real tokens score as in the completion without it
        for n in range(len(amask)):
            k = int(amask[n].sum())
            assert (got[n][amask[n].bool()] - want_c[n, :k]).abs().max() <= 1e-5, (n, arch)
        assert bool((got[amask == 0] == 0).all())
        # what sits in a hole does not matter
        other = completion_logprobs(model, *hole_batch(tok, 7)[0], shared_prefix=shared_prefix)[0]
        assert (got - other).abs().max() <= 1e-6
    if arch != "mistral":  # (HF's own sliding window counts columns, holes included)
        assert (naive_logprobs(model, *holes) - got).abs().max() <= 1e-5


def test_holes_gradients_equal_in_both_layouts():
    model, tok = tiny_model("llama")
    holes, _ = hole_batch(tok)
    loss_mask = holes[3].clone()
    loss_mask[2, 2:4] = 0
    ref = naive_logprobs(model, *holes)
    rep, _ = completion_logprobs(model, *holes)
    shared, _ = completion_logprobs(model, *holes, shared_prefix=True)
    g_ref = grads(model, ref, loss_mask)
    assert_same_grads(g_ref, grads(model, rep, loss_mask))
    assert_same_grads(g_ref, grads(model, shared, loss_mask))


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["repeated", "shared"])
def test_right_padded_prompts_match_left_padded(shared_prefix):
    model, tok = tiny_model("mistral")  # a window short enough to notice pads counted in it
    texts = ["1+1="] * 2 + ["123+456="] * 2
    g = torch.Generator().manual_seed(5)
    cid = torch.randint(4, len(tok), (4, 4), generator=g)
    amask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    left = (*prompts(tok, texts, "left"), cid, amask)
    right = (*prompts(tok, texts, "right"), cid, amask)
    assert not torch.equal(left[1], right[1])
    a, _ = completion_logprobs(model, *left, shared_prefix=shared_prefix)
    b, _ = completion_logprobs(model, *right, shared_prefix=shared_prefix)
    assert (a - b).abs().max() <= 1e-5


def test_pack_groups_selects_real_tokens_by_mask():
    # prompt [5, 6] (left-padded to 3); completion 1 = [7, (hole), 8], completion 2 = [9]
    pid = torch.tensor([[0, 5, 6], [0, 5, 6]])
    pmask = torch.tensor([[0.0, 1, 1], [0, 1, 1]])
    cid = torch.tensor([[7, 3, 8], [9, 0, 0]])
    amask = torch.tensor([[1.0, 0, 1], [1, 0, 0]])
    lay = pack_groups(pid, pmask, cid, amask)
    assert lay.input_ids_RL.tolist() == [[5, 6, 7, 8, 9]]
    assert lay.position_ids_RL.tolist() == [[0, 1, 2, 3, 2]]
    assert lay.segment_RL.tolist() == [[0, 0, 1, 1, 2]]
    # 7 is predicted by the last prompt token (col 1), 8 by 7 (col 2); holes point at 0
    assert lay.src_col_NT.tolist() == [[1, 0, 2], [1, 0, 0]]
    assert lay.length_N.tolist() == [2, 1]


def test_empty_prompt_is_refused_in_both_layouts():
    model, _ = tiny_model()
    args = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), torch.tensor([[4, 5]]))
    for shared_prefix in (False, True):
        with pytest.raises(ValueError, match="empty prompt"):
            completion_logprobs(model, *args, torch.ones(1, 2), shared_prefix=shared_prefix)
