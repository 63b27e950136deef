"""HF rollout engine: G samples per prompt, EOS masks, truncation flags, seeded sampling."""

from __future__ import annotations

import pytest
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
        m = a.attention_mask_NT[i]
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


def test_shared_prefill_draws_the_same_samples():
    from grouprl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer("0123456789+=")
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    prompts = ["12+34=", "1+2=", "999+1="]  # uneven lengths: left padding in the cache
    params = SamplingParams(num_generations=4, temperature=1.0, max_new_tokens=6)
    outs = []
    for share in (False, True):
        torch.manual_seed(7)
        outs.append(
            HFEngine(model, tok, share_prefill=share, decoder="generate").generate(prompts, params)
        )
    assert torch.equal(outs[0].completion_ids_NT, outs[1].completion_ids_NT)
    assert outs[0].completions == outs[1].completions


def test_prefill_is_computed_once_per_prompt(monkeypatch):
    from grouprl.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer("0123456789+=")
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    seen = []
    real = model.forward

    def spy(*a, **kw):
        seen.append(tuple(kw["input_ids"].shape))
        return real(*a, **kw)

    monkeypatch.setattr(model, "forward", spy)
    HFEngine(model, tok, decoder="generate").generate(
        ["12+34=", "1+2="], SamplingParams(num_generations=4, max_new_tokens=3)
    )
    # one prefill of 2 prompts x (6-1) tokens, then one token per row and step
    assert seen[0] == (2, 5)
    assert all(s[1] == 1 for s in seen[1:]) and all(s[0] == 8 for s in seen[1:])


def test_colocated_vllm_is_refused_under_several_processes(tiny, monkeypatch):
    """An in-process vLLM per torchrun process is not built yet: refused at start-up with
    the way out (server mode), before vLLM is even imported."""
    from grouprl.config import ConfigError, RolloutConfig
    from grouprl.rollout import build_engine

    model, tok = tiny
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="mode: colocate is not supported.*mode: server"):
        build_engine(RolloutConfig(engine="vllm"), model, tok)
