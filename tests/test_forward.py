"""The policy forward: completion log-probs match a direct computation, padding-invariant."""

from __future__ import annotations

import torch

from grouprl.models.forward import completion_logprobs
from grouprl.models.head import logprobs_and_entropy
from grouprl.training.sft import encode_pairs


def test_matches_unpadded_reference(tiny):
    model, tok = tiny
    model.eval()
    prompts, comps = ["12+34=", "5+6="], ["46", "11"]
    pid, pmask, cid, cmask = encode_pairs(tok, prompts, comps)
    with torch.no_grad():
        logp, ent = completion_logprobs(
            model, pid, pmask, cid, cmask, temperature=0.7, with_entropy=True
        )
    for i, (p, c) in enumerate(zip(prompts, comps, strict=False)):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float() / 0.7
        lsm = torch.log_softmax(logits, -1)
        for t, tok_id in enumerate(c_ids):
            want = lsm[len(p_ids) - 1 + t, tok_id]
            assert abs(float(logp[i, t]) - float(want)) < 1e-5
            want_h = -(lsm[len(p_ids) - 1 + t].exp() * lsm[len(p_ids) - 1 + t]).sum()
            assert abs(float(ent[i, t]) - float(want_h)) < 1e-5


def test_chunking_is_exact():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 7)
    targets = torch.randint(0, 7, (3, 10))
    a, ha = logprobs_and_entropy(logits, targets, 1.3, with_entropy=True, chunk=3)
    b, hb = logprobs_and_entropy(logits, targets, 1.3, with_entropy=True, chunk=100)
    assert torch.equal(a, b) and torch.equal(ha, hb)
    ref = torch.log_softmax(logits / 1.3, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(a, ref, atol=1e-6)


def test_shared_prefix_backend_choice_by_device_and_head_size(tiny):
    """auto: flex on CUDA when the heads are >= 16 wide (its kernel's minimum), SDPA else;
    an explicit flex on heads too small for it is refused with the key to change."""
    import pytest

    from grouprl.models.attention import head_dim_of, resolve_backend

    model, _ = tiny  # hidden 32, 2 heads
    assert head_dim_of(model) == 16
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cuda, 16) == "flex"
    assert resolve_backend("auto", cuda, 8) == "two_part"
    assert resolve_backend("auto", cpu, 64) == "two_part"
    assert resolve_backend("flex", cpu, 8) == "flex"  # eager flex on CPU has no minimum
    with pytest.raises(ValueError, match="shared_prefix_backend flex.*8 dimensions"):
        resolve_backend("flex", cuda, 8)
