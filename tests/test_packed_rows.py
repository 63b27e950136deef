"""Several groups per packed row: same log-probs and gradients as the repeated layout, groups
kept apart, fewer padded tokens, and token budgets that count the packed size."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, arith_rows, assert_packed_matches_repeated, base_config, tiny_model

import grouprl.models.forward as forward_mod
from grouprl.models import packing
from grouprl.models.forward import completion_logprobs
from grouprl.models.packing import (
    assign_rows,
    build_packed_mask,
    group_of,
    pack_groups,
    padded_tokens,
    part_of,
    segment_id,
)
from grouprl.training.batching import packed_micro_batches
from grouprl.training.trainer import Trainer

# (prompt length, completion lengths) per group; first-fit decreasing into rows of the
# longest group (42 tokens) gives rows [g0], [g1, g2, g5], [g3, g4]
UNEVEN = [(9, [12, 10, 11]), (3, [2, 4]), (5, [1, 3, 2]), (2, [5]), (4, [3, 1]), (6, [6, 2, 4])]
# equal prompts, completions longer than them: two_part's plain-causal fast path
LONG = [(3, [8, 7]), (3, [2, 1]), (3, [4, 3])]


def make_batch(groups, *, holes: bool, vocab: int, seed: int = 0):
    """Rows of the repeated layout: each group's prompt (random ids, left-padded) repeated
    per completion; with `holes`, padding inside some completions (real tokens as given)."""
    g = torch.Generator().manual_seed(seed)
    Pm = max(p for p, _ in groups)
    rows = [(p, c) for p, cs in groups for c in cs]
    T = max(c for _, c in rows) + (2 if holes else 0)
    pid = torch.zeros(len(rows), Pm, dtype=torch.long)
    pmask = torch.zeros(len(rows), Pm)
    cid = torch.randint(4, vocab, (len(rows), T), generator=g)
    amask = torch.zeros(len(rows), T)
    n = 0
    for p, cs in groups:
        prompt = torch.randint(4, vocab, (p,), generator=g)
        for c in cs:
            pid[n, Pm - p :], pmask[n, Pm - p :] = prompt, 1
            real = torch.arange(c)
            if holes and n % 3 == 1 and c >= 2:  # a hole of 1-2 tokens after the first
                real = torch.cat([real[:1], real[1:] + 1 + n % 2])
            amask[n, real] = 1
            n += 1
    return pid, pmask, cid, amask


def groups_per_row(layout) -> list[int]:
    seg = layout.segment_RL
    return [len(set(group_of(s[s >= 0]).tolist())) for s in seg]


CASES = {
    "uneven, left-padded": dict(groups=UNEVEN, holes=False),
    "uneven, holes": dict(groups=UNEVEN, holes=True),
    "long completions": dict(groups=LONG, holes=False),
}


@pytest.mark.parametrize("backend", ["two_part", "sdpa", "flex"])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", list(CASES))
def test_several_groups_per_row_match_repeated_layout(arch, case, backend):
    model, tok = tiny_model(arch)
    args = make_batch(**CASES[case], vocab=len(tok))
    assert max(groups_per_row(pack_groups(*args))) >= 2  # rows really are shared
    assert_packed_matches_repeated(model, args, backend)


def test_long_completions_take_the_two_part_fast_path():
    _, tok = tiny_model()
    plan = pack_groups(*make_batch(LONG, holes=False, vocab=len(tok))).two_part_plan()
    assert bool(plan.prompt_real_UP.all()) and plan.Cm > plan.Pm  # the fast path's condition
    assert len(plan.row_U) == 3 and plan.row_U.tolist() == [0, 1, 1]


@pytest.mark.parametrize("backend", ["two_part", "sdpa"])
def test_groups_sharing_a_row_do_not_see_each_other(backend):
    model, tok = tiny_model("llama")
    args = make_batch(UNEVEN, holes=False, vocab=len(tok))
    layout = pack_groups(*args)
    rows_N = layout.row_N
    shared_row = [r for r, k in enumerate(groups_per_row(layout)) if k >= 3][0]
    target = int((rows_N == shared_row).nonzero()[0])  # a completion of the row's first group
    same_group = (args[0] == args[0][target]).all(1)  # its group (prompts are distinct)
    others = (rows_N == shared_row) & ~same_group
    # change the group's prompt and the completion: later groups of the row would see both
    changed_p, changed_c = args[0].clone(), args[2].clone()
    changed_p[same_group] = torch.where(
        args[1][same_group].bool(), 4 + (args[0][target] - 3) % 9, 0
    )
    changed_c[target] = (changed_c[target] + 1 - 4) % (len(tok) - 4) + 4
    with torch.no_grad():
        a, _ = completion_logprobs(model, *args, shared_prefix=True, attn_backend=backend)
        b, _ = completion_logprobs(
            model, changed_p, args[1], changed_c, args[3], shared_prefix=True, attn_backend=backend
        )
    assert bool(others.any())
    assert torch.equal(a[others], b[others])  # neighbours in the row unchanged, bit for bit
    assert not torch.equal(a[target], b[target])  # (the changed one does change)


def test_rows_hold_several_groups_and_fewer_padded_tokens():
    _, tok = tiny_model()
    args = make_batch(UNEVEN, holes=True, vocab=len(tok))
    packed = pack_groups(*args)
    single = pack_groups(*args, pack_rows=False)
    lengths = [p + sum(cs) for p, cs in UNEVEN]
    assert single.input_ids_RL.shape == (6, 42) and packed.input_ids_RL.shape == (3, 42)
    assert groups_per_row(packed) == [1, 3, 2] and groups_per_row(single) == [1] * 6
    assert packed.input_ids_RL.numel() < single.input_ids_RL.numel()
    assert padded_tokens(lengths) == packed.input_ids_RL.numel() == 3 * 42
    assert padded_tokens(lengths, pack_rows=False) == single.input_ids_RL.numel()
    # each completion's predictors: its prompt's last token, then its own real tokens
    for n in range(len(args[0])):
        real = args[3][n].bool()
        want = torch.cat([args[0][n, -1:], args[2][n, real][:-1]])
        for lay in (packed, single):
            assert torch.equal(lay.input_ids_RL[lay.row_N[n], lay.src_col_NT[n, real]], want)
    # positions restart at 0 for each group, segments number the row's groups 0, 1, ...
    row = packed.segment_RL[1]
    pos = packed.position_ids_RL[1]
    starts = [c for c in range(len(row)) if row[c] >= 0 and part_of(row[c]) == 0 and pos[c] == 0]
    assert len(starts) == 3 and [int(group_of(row[c])) for c in starts] == [0, 1, 2]


def test_mask_of_a_row_with_two_groups():
    # group 0: prompt [5, 6], completions [7] and [8]; group 1: prompt [9], completion [3, 4]
    pid = torch.tensor([[5, 6], [5, 6], [0, 9]])
    pmask = torch.tensor([[1.0, 1], [1, 1], [0, 1]])
    cid = torch.tensor([[7, 0], [8, 0], [3, 4]])
    cmask = torch.tensor([[1.0, 0], [1, 0], [1, 1]])
    lay = pack_groups(pid, pmask, cid, cmask)
    assert lay.input_ids_RL.tolist() == [[5, 6, 7, 8], [9, 3, 4, 0]]  # 4 + 3 > 4: two rows
    lay = pack_groups(pid[:2], pmask[:2], cid[:2], cmask[:2])  # (one group, as before)
    assert lay.segment_RL.tolist() == [[0, 0, 1, 2]]
    # group 2 (5 tokens) sets the row length: group 0 (prompt [9], completion [3, 4]) and
    # group 1 (prompt [5, 6], an empty completion) share the second row
    pid = torch.tensor([[0, 9], [5, 6], [1, 2]])
    pmask = torch.tensor([[0.0, 1], [1, 1], [1, 1]])
    cid = torch.tensor([[3, 4, 0], [0, 0, 0], [7, 8, 3]])
    cmask = torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 1, 1]])
    lay = pack_groups(pid, pmask, cid, cmask)
    assert lay.input_ids_RL.tolist() == [[1, 2, 7, 8, 3], [9, 3, 4, 5, 6]]
    assert lay.position_ids_RL.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    g1 = segment_id(1, 0)
    assert lay.segment_RL.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, g1, g1]]
    assert lay.row_N.tolist() == [1, 1, 0]
    assert lay.src_col_NT.tolist() == [[0, 1, 0], [0, 0, 0], [1, 2, 3]]
    lay.segment_RL, lay.position_ids_RL = lay.segment_RL[1:], lay.position_ids_RL[1:]
    m = build_packed_mask(lay.segment_RL, lay.position_ids_RL)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],  # group 1's prompt starts afresh: it sees nothing of group 0
        [0, 0, 0, 1, 1],
    ]


def test_assign_rows_first_fit_decreasing():
    assert assign_rows([10, 4, 7, 3, 6]) == [[0], [2, 3], [1, 4]]
    assert assign_rows([5, 5, 5]) == [[0], [1], [2]]  # ties: in index order
    assert assign_rows([2, 9, 3], row_len=5) == [[1], [0, 2]]  # a group over the limit: alone
    assert assign_rows([0, 3, 0]) == [[0, 1, 2]]  # empty groups take no room
    assert assign_rows([]) == []
    assert padded_tokens([10, 4, 7, 3, 6]) == 30 and padded_tokens([]) == 0


def test_token_budget_counts_the_packed_size():
    # groups of 2 rows: prompt lengths 8, 2, 2, 2; completion lengths below
    pmask = torch.zeros(8, 8)
    for n, p in enumerate([8, 8, 2, 2, 2, 2, 2, 2]):
        pmask[n, 8 - p :] = 1
    pid = (torch.arange(8) // 2 + 4)[:, None] * pmask.long()  # a prompt of its own per group
    comp = [6, 6, 1, 1, 2, 1, 3, 0]  # group lengths 20, 4, 5, 5
    # one row per group would cost 4 x 20 = 80; packed, [20] [4, 5, 5] cost 2 x 20 = 40
    assert packed_micro_batches(pid, pmask, comp, 2, 40) == [slice(0, 8)]
    # [20, 4] packed is 2 x 20 > 39; [4, 5, 5] is 3 x 5
    assert packed_micro_batches(pid, pmask, comp, 2, 39) == [slice(0, 2), slice(2, 8)]
    assert packed_micro_batches(pid, pmask, comp, 2, 1) == [
        slice(2 * u, 2 * u + 2) for u in range(4)
    ]
    # the cost is what the forward gets: R x L of `pack_groups` on each micro-batch
    cid = torch.ones(8, 6, dtype=torch.long)
    amask = (torch.arange(6) < torch.tensor(comp)[:, None]).float()
    for budget in (40, 39, 25, 20, 1):
        for s in packed_micro_batches(pid, pmask, comp, 2, budget):
            size = pack_groups(pid[s], pmask[s], cid[s], amask[s]).input_ids_RL.numel()
            assert size <= budget or s.stop - s.start == 2, (budget, s, size)
    # a forward with one group per row (pack_rows off) costs 4 x 20 = 80 whole: the budget
    # reads the same layout
    assert packed_micro_batches(pid, pmask, comp, 2, 79, pack_rows=False) != [slice(0, 8)]
    for budget in (80, 40, 20):
        for s in packed_micro_batches(pid, pmask, comp, 2, budget, pack_rows=False):
            layout = pack_groups(pid[s], pmask[s], cid[s], amask[s], pack_rows=False)
            size = layout.input_ids_RL.numel()
            assert size <= budget or s.stop - s.start == 2, (budget, s, size)


def test_token_budget_cuts_runs_of_one_prompt_as_packing_does():
    # three groups of 2 rows with the same prompt form one run: whole it packs as one group
    # (3 + 6 x 4 = 27 tokens), and a micro-batch of two of them as 3 + 4 x 4 = 19
    pid = torch.full((6, 3), 5)
    pmask = torch.ones(6, 3)
    comp = [4] * 6
    assert packed_micro_batches(pid, pmask, comp, 2, 27) == [slice(0, 6)]
    assert packed_micro_batches(pid, pmask, comp, 2, 22) == [slice(0, 4), slice(4, 6)]
    cid, amask = torch.ones(6, 4, dtype=torch.long), torch.ones(6, 4)
    assert pack_groups(pid[:4], pmask[:4], cid[:4], amask[:4]).input_ids_RL.shape == (1, 19)


@pytest.mark.parametrize("pack_rows", [True, False])
def test_token_budget_keeps_the_gradient_with_shared_rows(
    pack_rows, tmp_path, tiny_model_dir, monkeypatch
):
    """A budget that splits the batch, with rows holding several groups: the same gradient
    as one forward of the whole batch. With the forward's `pack_rows` off (one group per
    row, an API setting), the budget costs that layout."""
    layouts = []
    pack = forward_mod.pack_groups

    def spy(*a, **k):
        layouts.append(pack(*a, **k))
        return layouts[-1]

    monkeypatch.setattr(forward_mod, "pack_groups", spy)
    grads, sizes = [], []
    for tokens in (0, 70):
        cfg = base_config(
            tmp_path / f"r{tokens}",
            tiny_model_dir,
            micro_batch_size=64,
            learning_rate=0.0,
            max_steps=1,
            prompts_per_step=6,
        )
        cfg["rollout"]["max_new_tokens"] = 2
        cfg["train"]["micro_batch_tokens"] = tokens
        cfg["model"]["shared_prefix"] = "on"
        cfg["regularizers"] = [{"name": "kl", "beta": 0.1}]
        rows = arith_rows()
        for i, r in enumerate(rows):  # a third of the groups long, two short ones fit beside
            r["prompt"] = "1" * (20 * (i % 3 == 0)) + r["prompt"]
        tr = Trainer(cfg, train_dataset=rows)
        tr.learner.policy.pack_rows = pack_rows
        layouts.clear()
        torch.manual_seed(0)
        tr.train()
        sizes.append([tuple(lay.input_ids_RL.shape) for lay in layouts])
        shared = [groups_per_row(lay) for lay in layouts]
        grads.append(
            {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        )
    assert len(sizes[1]) > len(sizes[0]), sizes  # the budget splits the batch
    assert all(R * L <= 70 for R, L in sizes[1]), sizes
    # micro-batches whose groups fit the budget only because rows hold several of them
    several = any(sum(k) * L > 70 for k, (_, L) in zip(shared, sizes[1], strict=True))
    assert several == pack_rows, shared
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-5), n


def test_a_rule_blind_to_groups_would_leak():
    # Control: the rule without its group check lets a completion see an earlier group's
    # prompt in the same row (dense mask), so the equality tests above can tell.
    model, tok = tiny_model("qwen2")
    args = make_batch(UNEVEN, holes=False, vocab=len(tok))
    with torch.no_grad():
        ref, _ = completion_logprobs(model, *args)
        rule = packing.allowed

        def part(seg):  # every group read as group 0
            return torch.where(seg >= 0, part_of(seg), -1)

        def blind(seg_q, seg_k, q, k, pos_q, pos_k, window):
            return rule(part(seg_q), part(seg_k), q, k, pos_q, pos_k, window)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(packing, "allowed", blind)
            got, _ = completion_logprobs(model, *args, shared_prefix=True, attn_backend="sdpa")
    assert (ref - got).abs().max() > 1e-3
