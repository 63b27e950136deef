"""HF rollout engine: G samples per prompt, EOS masks, truncation flags, seeded sampling."""

from __future__ import annotations

import torch

from grouprl.rollout.base import SamplingParams, completion_mask_from_eos
from grouprl.rollout.hf import HFEngine


def test_mask_through_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, trunc = completion_mask_from_eos(ids, [1])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert trunc.tolist() == [False, True, False]


def test_generate_groups_and_determinism(tiny):
    model, tok = tiny
    eng = HFEngine(model, tok)
    params = SamplingParams(num_generations=3, temperature=1.0, max_new_tokens=5)
    torch.manual_seed(1)
    a = eng.generate(["12+3=", "1+2="], params)
    torch.manual_seed(1)
    b = eng.generate(["12+3=", "1+2="], params)
    assert a.num_rollouts == 6 and a.group_size == 3
    assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)
    # prompts are repeated per group and left-padded
    assert torch.equal(a.prompt_ids_NP[0], a.prompt_ids_NP[2])
    assert a.prompt_mask_NP[3, 0] == 0 and a.prompt_mask_NP[0, 0] == 1
    # masks: ones up to and including EOS, then zeros; a row without EOS is flagged truncated
    for i in range(6):
        m = a.completion_mask_NT[i]
        n = int(m.sum())
        assert torch.all(m[:n] == 1) and torch.all(m[n:] == 0)
        eos_at = (a.completion_ids_NT[i, :n] == tok.eos_token_id).nonzero()
        assert bool(a.truncated_N[i]) == (len(eos_at) == 0)
        if len(eos_at):
            assert int(eos_at[0]) == n - 1


def test_greedy_is_repeatable(tiny):
    model, tok = tiny
    eng = HFEngine(model, tok)
    params = SamplingParams(num_generations=2, temperature=0.0, max_new_tokens=4)
    ro = eng.generate(["7+8="], params)
    assert torch.equal(ro.completion_ids_NT[0], ro.completion_ids_NT[1])
