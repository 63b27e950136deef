"""The shared-prompt decoder (rollout/decode.py): the samples of HF `generate`, less work."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model

import grouprl.rollout.decode as decode
from grouprl.config import ConfigError
from grouprl.rollout.base import SamplingParams
from grouprl.rollout.hf import HFEngine

PROMPTS = ["12+34=", "7+8=", "123+456="]  # uneven lengths: left padding


def _both(model, tok, params, seed, eos=None):
    outs = []
    for decoder in ("generate", "shared"):
        eng = HFEngine(model, tok, decoder=decoder, draw="multinomial")
        if eos is not None:
            eng.eos_ids = lambda: eos  # type: ignore[method-assign]
        torch.manual_seed(seed)
        outs.append(eng.generate(PROMPTS, params))
    return outs


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])  # mistral: sliding window
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0)])
def test_same_samples_as_generate(arch, temperature, top_k, top_p):
    model, tok = tiny_model(arch)
    params = SamplingParams(
        num_generations=4, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12
    )
    a, b = _both(model, tok, params, seed=1)
    assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)
    assert torch.equal(a.attention_mask_NT, b.attention_mask_NT)
    assert a.completions == b.completions


def test_same_samples_when_rows_finish_at_different_steps():
    # several EOS ids: rows stop early and the running rows are compacted mid-decode
    model, tok = tiny_model("mistral")
    params = SamplingParams(num_generations=4, temperature=1.0, max_new_tokens=30)
    a, b = _both(model, tok, params, seed=3, eos=[5, 9, 17, 23, 40])
    lengths = b.attention_mask_NT.sum(1)
    assert len(set(lengths.tolist())) > 3  # rows really finished at different steps
    assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)


def test_prompt_once_and_finished_rows_cost_nothing(monkeypatch):
    model, tok = tiny_model("qwen2")
    seen = []
    real = model.forward

    def spy(*a, **kw):
        seen.append(tuple(kw["input_ids"].shape))
        return real(*a, **kw)

    eng = HFEngine(model, tok, decoder="shared")
    eng.uses_shared_decoder()  # the probe runs before the spy
    monkeypatch.setattr(model, "forward", spy)
    eng.eos_ids = lambda: [5, 9, 17, 23, 40]  # type: ignore[method-assign]
    torch.manual_seed(3)
    eng.generate(PROMPTS, SamplingParams(num_generations=4, max_new_tokens=30))
    assert seen[0] == (3, 8)  # each prompt once (not 12 rows)
    rows = [s[0] for s in seen[1:]]
    assert all(s[1] == 1 for s in seen[1:])
    assert rows[0] == 12 and rows[-1] < 12 and rows == sorted(rows, reverse=True)


def test_a_model_the_decoder_gets_wrong_is_refused_or_falls_back(monkeypatch, caplog):
    model, tok = tiny_model("qwen2")
    real = decode._decode

    def wrong(st, i, q, k, v, scale, window):
        out, _ = real(st, i, q, k, v, scale, window)
        return out * 1.5, None

    monkeypatch.setattr(decode, "_decode", wrong)
    ok, reason = decode.check_decoder(model, model.get_input_embeddings().weight.shape[0])
    assert not ok and "differ" in reason
    with pytest.raises(ConfigError, match="rollout.decoder shared"):
        HFEngine(model, tok, decoder="shared").uses_shared_decoder()
    with caplog.at_level(logging.WARNING, logger="grouprl"):
        assert not HFEngine(model, tok).uses_shared_decoder()
    assert "shared-prompt decoder off" in caplog.text


def test_unknown_decoder_is_refused():
    model, tok = tiny_model("qwen2")
    with pytest.raises(ValueError, match="rollout.decoder"):
        HFEngine(model, tok, decoder="fast")


def test_neither_decoder_applies_the_models_own_generation_config():
    # a hub model's generation_config may carry processors (here a repetition penalty) that
    # the trainer's log-probs know nothing of: both decoders sample from the settings only
    model, tok = tiny_model("qwen2")
    params = SamplingParams(num_generations=4, temperature=1.0, max_new_tokens=12)
    torch.manual_seed(1)
    plain = HFEngine(model, tok, decoder="generate").generate(PROMPTS, params)
    model.generation_config.repetition_penalty = 5.0
    a, b = _both(model, tok, params, seed=1)
    assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)
    assert torch.equal(a.completion_ids_NT, plain.completion_ids_NT)


def test_inverse_cdf_draws_each_token_with_its_probability():
    # 200k draws from one row with a zero, a tiny and a large probability, against the exact
    # chances: every count within 5 standard deviations, the zero never drawn
    p_V = torch.tensor([0.0, 0.5, 1e-3, 0.2, 0.0, 0.299])
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    got = decode.draw_inverse_cdf(p_V.expand(n, -1) * 3.0, gen)  # unnormalised rows
    counts = torch.bincount(got, minlength=6).double()
    want = p_V.double() * n
    sd = (n * p_V.double() * (1 - p_V.double())).sqrt()
    assert counts[0] == 0 and counts[4] == 0
    assert bool(((counts - want).abs() <= 5 * sd + 1e-9).all()), counts


def test_inverse_cdf_rounding_up_to_the_total_takes_the_last_drawable_token(monkeypatch):
    p_nV = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(2, 1))
    assert decode.draw_inverse_cdf(p_nV).tolist() == [1, 2]


def test_default_draw_samples_the_models_distribution():
    # the decoder's first token over many seeded draws against the model's own softmax
    model, tok = tiny_model("qwen2")
    ids = torch.tensor([[3, 14, 15, 9]])
    with torch.no_grad():
        p_V = torch.softmax(model(input_ids=ids).logits[0, -1].float() / 0.5, -1)
    G = 4000
    gen = torch.Generator().manual_seed(2)
    comp = decode.sample_groups(
        model,
        ids,
        torch.ones_like(ids),
        G=G,
        max_new_tokens=1,
        eos_ids=[],
        pad_id=0,
        temperature=0.5,
        generator=gen,
    )
    counts = torch.bincount(comp[:, 0], minlength=p_V.numel()).double()
    sd = (G * p_V.double() * (1 - p_V.double())).sqrt()
    assert bool(((counts - G * p_V.double()).abs() <= 5 * sd + 1.0).all())


def test_a_seed_gives_the_same_samples_with_either_draw_and_they_differ():
    model, tok = tiny_model("qwen2")
    params = SamplingParams(num_generations=4, temperature=1.0, max_new_tokens=12, seed=5)
    runs = {
        draw: [
            HFEngine(model, tok, decoder="shared", draw=draw).generate(PROMPTS, params)
            for _ in range(2)
        ]
        for draw in decode.DRAWS
    }
    for a, b in runs.values():
        assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)
    inv, mult = runs["inverse_cdf"][0], runs["multinomial"][0]
    assert not torch.equal(inv.completion_ids_NT, mult.completion_ids_NT)


def test_unknown_draw_is_refused():
    model, tok = tiny_model("qwen2")
    with pytest.raises(ValueError, match="rollout.draw"):
        HFEngine(model, tok, draw="gumbel")


def test_inverse_cdf_never_returns_a_token_of_probability_zero(monkeypatch):
    # a cumulative sum that steps by an ulp over a zero (a GPU's float32 scan can): the zero
    # at index 1 is not returned, the last drawable token is
    p_nV = torch.tensor([[0.5, 0.0, 0.5]])
    c = torch.tensor([[0.5, 0.5 + 6e-8, 1.0]])
    monkeypatch.setattr(torch.Tensor, "cumsum", lambda self, dim: c)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((1, 1), 0.50000002))
    assert decode.draw_inverse_cdf(p_nV).tolist() == [2]


def test_inverse_cdf_refuses_a_distribution_that_is_not_finite():
    with pytest.raises(ValueError, match="rollout.draw"):
        decode.draw_inverse_cdf(torch.tensor([[float("nan")] * 4]))


def test_a_blocked_prompt_key_whose_score_overflows_stays_blocked():
    """fp16: a left-padding key whose score overflows to inf is filled with -inf, not added to
    (inf - inf would be NaN and take the whole row with it)."""
    B, G, P, d = 1, 2, 4, 8
    mask = torch.tensor([[False, True, True, True]])  # one left-padding column
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    st = decode._DecodeState(prompt_ok_BP=mask, prompt_pos_BP=pos, max_new_tokens=2)
    st.prefill = False
    g = torch.Generator().manual_seed(0)
    kp = torch.randn(B, 1, P, d, generator=g).half()
    kp[:, :, 0] = 3000.0  # 3000 x 3 x 8 overflows fp16
    st.prompt_k[0], st.prompt_v[0] = kp, torch.randn(B, 1, P, d, generator=g).half()
    grp = torch.arange(B * G) // G
    st.set_rows(grp, pos[:, -1][grp] + 1, B)
    q = torch.full((B * G, 1, 1, d), 3.0).half()
    kv = [torch.randn(B * G, 1, 1, d, generator=g).half() for _ in range(2)]
    out, _ = decode._decode(st, 0, q, *kv, 1.0, None)
    assert bool(torch.isfinite(out).all())
