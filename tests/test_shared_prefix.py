"""Shared-prefix (Prefix Grouper) forward: same log-probs and gradients as the repeated layout."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, arith_rows, assert_packed_matches_repeated, base_config, tiny_model

from grouprl.models.forward import completion_logprobs
from grouprl.models.head import chunked_head_logprobs
from grouprl.models.packing import build_packed_mask, pack_groups
from grouprl.models.support import check_support
from grouprl.training.trainer import Trainer


def batch(tok, prompts: list[str], completions: list[list[str]], pad_side: str = "left"):
    """Rows of the repeated layout: each prompt repeated once per completion, groups contiguous."""
    tok.padding_side = pad_side
    flat_p = [p for p, cs in zip(prompts, completions, strict=True) for _ in cs]
    enc = tok(flat_p, return_tensors="pt", padding=True, add_special_tokens=False)
    comps = [tok(c, add_special_tokens=False)["input_ids"] for cs in completions for c in cs]
    T = max(len(c) for c in comps)
    cid = torch.full((len(comps), T), tok.pad_token_id)
    cmask = torch.zeros(len(comps), T)
    for i, c in enumerate(comps):
        cid[i, : len(c)] = torch.tensor(c)
        cmask[i, : len(c)] = 1
    tok.padding_side = "left"
    return enc["input_ids"], enc["attention_mask"].float(), cid, cmask


CASES = {
    "G=1": (["12+34="], [["46"]]),
    "uneven lengths": (["12+34=", "7+8="], [["4", "46", "4611", "46="], ["15", "1", "150"]]),
    "one-token completions": (["9+9="], [["1", "8", "="]]),
    "completions longer than the prompt": (["9+9="], [["18=18=18=", "1", "181818"]]),
    "several groups, left padding": (
        ["1+1=", "123+456=", "55+5="],
        [["2", "22"], ["579", "5", "57"], ["60", "6"]],
    ),
    # 7 + 7 tokens fit beside 18: the two short groups share a packed row
    "two groups in one row": (
        ["1+1=", "123+456=", "5+5="],
        [["2", "22"], ["579", "5", "57", "5791"], ["10", "1"]],
    ),
}


@pytest.mark.parametrize("backend", ["two_part", "sdpa", "flex"])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_and_gradients_match_repeated_layout(arch, case, backend):
    model, tok = tiny_model(arch)
    args = batch(tok, *CASES[case])
    if case == "two groups in one row":
        assert pack_groups(*args).input_ids_RL.shape == (2, 18)
    assert_packed_matches_repeated(model, args, backend)


def test_right_padded_prompts_pack_the_same():
    model, tok = tiny_model("qwen2")
    prompts, comps = CASES["several groups, left padding"]
    left = batch(tok, prompts, comps, "left")
    right = batch(tok, prompts, comps, "right")
    assert not torch.equal(left[1], right[1])
    a, _ = completion_logprobs(model, *left, shared_prefix=True)
    b, _ = completion_logprobs(model, *right, shared_prefix=True)
    assert (a - b).abs().max() <= 1e-6


def test_isolation_between_completions():
    model, tok = tiny_model("llama")
    base = batch(tok, ["12+34="], [["4612", "999", "1"]])
    changed = batch(tok, ["12+34="], [["4612", "000", "1"]])
    a, _ = completion_logprobs(model, *base, shared_prefix=True)
    b, _ = completion_logprobs(model, *changed, shared_prefix=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # neighbours unchanged, bit for bit
    assert not torch.equal(a[1], b[1])  # (the changed one does change)


def test_pack_layout_and_mask():
    # prompt [5, 6] (left-padded to 3), completions [7, 8] and [9]
    pid = torch.tensor([[0, 5, 6], [0, 5, 6]])
    pmask = torch.tensor([[0.0, 1, 1], [0, 1, 1]])
    cid = torch.tensor([[7, 8], [9, 0]])
    cmask = torch.tensor([[1.0, 1], [1, 0]])
    lay = pack_groups(pid, pmask, cid, cmask)
    assert lay.input_ids_RL.tolist() == [[5, 6, 7, 8, 9]]
    assert lay.position_ids_RL.tolist() == [[0, 1, 2, 3, 2]]
    assert lay.segment_RL.tolist() == [[0, 0, 1, 1, 2]]
    # token 0 of each completion is predicted from the last prompt position (col 1);
    # completion 2 has one token, its padding position points nowhere (0)
    assert lay.src_col_NT.tolist() == [[1, 2], [1, 0]]
    m = build_packed_mask(lay.segment_RL, lay.position_ids_RL)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # completion 2 sees the prompt and itself, not completion 1
    ]


def test_self_check_accepts_tiny_models_and_rejects_softcapping():
    for arch in ARCHS:
        ok, reason = check_support(tiny_model(arch)[0])
        assert ok, (arch, reason)
    model, _ = tiny_model("qwen2")
    model.config.final_logit_softcapping = 30.0
    ok, reason = check_support(model)
    assert not ok and "post-processed" in reason


def test_chunked_head_equals_naive_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    lp, ent = chunked_head_logprobs(h, y, head, temperature=0.7, chunk_size=8, entropy_grad=True)
    (lp.sum() + 0.3 * ent.sum()).backward()
    g_h, g_w = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    logits = head(h) / 0.7
    lsm = torch.log_softmax(logits, -1)
    ref_lp = lsm.gather(-1, y[:, None]).squeeze(-1)
    ref_ent = -(lsm.exp() * lsm).sum(-1)
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    assert torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6)
    assert torch.allclose(g_h, h.grad, atol=1e-6) and torch.allclose(
        g_w, head.weight.grad, atol=1e-6
    )


def test_trainer_same_parameters_with_and_without_shared_prefix(tmp_path, tiny_model_dir):
    def length_reward(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    finals = []
    for mode in ("on", "off"):
        cfg = base_config(tmp_path / mode, tiny_model_dir, micro_batch_size=5)
        cfg["model"]["shared_prefix"] = mode
        cfg["regularizers"] = [{"name": "kl", "beta": 0.1}]
        tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[length_reward])
        assert tr.shared_prefix == (mode == "on")
        # SGD, not Adam: a key-projection bias has an exactly-zero gradient in exact
        # arithmetic (softmax ignores a shift shared by all keys), so both layouts see only
        # rounding noise there, which Adam's normalization would turn into full-size steps.
        tr.learner.optimizer = torch.optim.SGD(tr.model.parameters(), lr=0.1)
        tr.learner.scheduler = torch.optim.lr_scheduler.LambdaLR(
            tr.learner.optimizer, lambda s: 1.0
        )
        tr.train()
        finals.append({k: v.clone() for k, v in tr.model.state_dict().items()})
    for k in finals[0]:
        assert torch.allclose(finals[0][k], finals[1][k], atol=1e-5, rtol=0), k


def test_entropy_without_grad_keeps_no_graph():
    # the trainer logs entropy but only an entropy regularizer differentiates it
    head = torch.nn.Linear(8, 20, bias=False)
    h = torch.randn(5, 8, requires_grad=True)
    lp, ent = chunked_head_logprobs(h, torch.zeros(5, dtype=torch.long), head, chunk_size=2)
    assert lp.requires_grad and not ent.requires_grad
