"""GPU-only checks (skipped without CUDA): flex-attention gradients and bf16 shared prefix."""

from __future__ import annotations

import pytest
import torch

from grouprl.models.forward import completion_logprobs
from grouprl.models.tiny import build_char_tokenizer, build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _batch(tok):
    tok.padding_side = "left"
    enc = tok(
        ["12+34=", "12+34=", "7+8=", "7+8="],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    cid = torch.tensor([[4, 6, 1], [4, 1, 0], [1, 5, 1], [9, 9, 9]])
    cmask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    return [t.cuda() for t in (enc["input_ids"], enc["attention_mask"].float(), cid, cmask)]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_shared_prefix_gradients_on_gpu(backend):
    tok = build_char_tokenizer("0123456789+=")
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4).cuda()
    args = _batch(tok)
    ref, _ = completion_logprobs(model, *args)
    model.zero_grad()
    (ref * args[3]).sum().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    got, _ = completion_logprobs(model, *args, shared_prefix=True, attn_backend=backend)
    model.zero_grad()
    (got * args[3]).sum().backward()
    assert (ref - got).abs().max() <= 1e-4
    for n, p in model.named_parameters():
        assert (p.grad - g_ref[n]).norm() <= 1e-3 * g_ref[n].norm().clamp(min=1e-8), n


def test_bf16_shared_prefix_close_to_repeated():
    tok = build_char_tokenizer("0123456789+=")
    model = (
        build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4).cuda().to(torch.bfloat16)
    )
    args = _batch(tok)
    with torch.no_grad():
        ref, _ = completion_logprobs(model, *args)
        got, _ = completion_logprobs(model, *args, shared_prefix=True)
    assert (ref - got).abs().max() <= 5e-2
