"""GPU-only checks (skipped without CUDA): flex-attention gradients, masks with holes, bf16."""

from __future__ import annotations

import pytest
import torch
from test_models_masks import assert_same_grads, grads, hole_batch, naive_logprobs, tiny_model

from grouprl.models.forward import completion_logprobs
from grouprl.models.support import check_support
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


@pytest.mark.parametrize("backend", ["two_part", "sdpa", "flex"])
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


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_holes_and_context_on_gpu(backend):
    model, tok = tiny_model("llama", hidden_size=64)  # head dim 16: flex's CUDA minimum
    model.cuda()
    holes, _ = hole_batch(tok)
    holes = [t.cuda() for t in holes]
    loss_mask = holes[3].clone()
    loss_mask[2, 2:4] = 0  # context tokens mid-completion
    ref = naive_logprobs(model, *holes)
    got, _ = completion_logprobs(model, *holes, shared_prefix=True, attn_backend=backend)
    assert (ref - got).abs().max() <= 1e-4
    assert_same_grads(grads(model, ref, loss_mask), grads(model, got, loss_mask), rel=1e-3)


def test_check_support_of_a_bf16_model_on_gpu():
    model, _ = tiny_model("qwen2")
    model.cuda().to(torch.bfloat16)
    ok, reason = check_support(model)  # runs on an fp32 copy, flex backend
    assert ok, reason
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name",
    [
        None,
        *[  # recipes whose reward needs the user's model or judge are run in test_recipes
            n
            for n in __import__("grouprl.config").config.recipe_names()
            if not __import__("grouprl.config").config.required_keys(
                __import__("grouprl.config").config.load_recipe(n)
            )
        ],
    ],
)
def test_every_recipe_trains_on_cuda(tmp_path, tiny_model_dir, name):
    """Two steps of every recipe with the model on the GPU: rewards, advantages and masks
    are planned on the CPU and must reach the GPU batch (a mixed-device op fails here)."""
    import math

    from conftest import arith_rows, base_config
    from test_recipes import even_first_digit, starts_with_digit

    from grouprl.training.trainer import Trainer

    cfg = base_config(tmp_path / str(name), tiny_model_dir, max_steps=2, micro_batch_size=4)
    cfg["model"]["device"] = "cuda"
    if name:
        for key in ("advantage", "loss", "regularizers"):
            cfg.pop(key)
        cfg["recipe"] = name
    cfg["rollout"]["num_generations"] = 1 if name == "single_stream" else 4
    cfg["rollout"]["num_train_samples"] = 0  # ttrl/spine sample 64 and train on 32
    rewards = [{"fn": even_first_digit, "weight": 0.5}, {"fn": starts_with_digit, "weight": 0.5}]
    res = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=rewards).train()
    assert res.steps == 2
    assert math.isfinite(res.history[-1]["loss"])


def test_lora_and_qlora_train_on_cuda(tmp_path, tiny_model_dir):
    """LoRA on CUDA; QLoRA (4-bit base through bitsandbytes) when bitsandbytes is there:
    two GRPO steps with a KL term, only adapters move, finite loss."""
    import math

    from conftest import arith_rows, base_config

    from grouprl.training.trainer import Trainer

    pytest.importorskip("peft")
    modes = [{"r": 4, "alpha": 8}]
    try:
        import bitsandbytes  # noqa: F401

        modes.append({"r": 4, "alpha": 8, "quantize": "4bit"})
    except ImportError:
        pass
    for lora in modes:
        cfg = base_config(tmp_path / str(len(lora)), tiny_model_dir, max_steps=2)
        cfg["model"].update(device="cuda", lora=lora)
        cfg["regularizers"] = [{"name": "kl", "beta": 0.1}]
        tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=["exact_match"])
        res = tr.train()
        assert math.isfinite(res.history[-1]["loss"]), lora
        assert tr.learner.ref_model is None
