"""SFT warm start: completion-only loss that goes down."""

from __future__ import annotations

import torch

from grouprl.models.forward import completion_logprobs
from grouprl.training.sft import encode_pairs, sft


def test_sft_lowers_completion_loss(tiny):
    model, tok = tiny
    prompts, comps = ["12+3=", "4+5=", "7+7="], ["15", "9", "14"]
    pid, pm, cid, cm = encode_pairs(tok, prompts, comps)

    def nll():
        with torch.no_grad():
            lp, _ = completion_logprobs(model, pid, pm, cid, cm)
        return float(-(lp * cm).sum() / cm.sum())

    start = nll()
    res = sft(
        model, tok, prompts, comps, steps=40, batch_size=3, learning_rate=3e-3, progress=False
    )
    assert res.final_loss < start
    assert nll() < 0.5 * start


def test_encode_pairs_masks_completion_and_eos(tiny):
    _, tok = tiny
    pid, pm, cid, cm = encode_pairs(tok, ["1+2=", "10+20="], ["3", "30"])
    assert pm.tolist()[0][:2] == [0.0, 0.0]  # left padding of the shorter prompt
    assert cid[0].tolist()[:2] == [tok.convert_tokens_to_ids("3"), tok.eos_token_id]
    assert cm.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
