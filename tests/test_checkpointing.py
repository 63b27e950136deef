"""`model.gradient_checkpointing` (models/loading.py::enable_checkpointing): activation
checkpointing recomputes each decoder layer in the backward, after the packed forward's
context has ended; `attention.recompute_context` runs that recompute under the same packed
layout, so the gradient is the one without checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.models.attention import recompute_context
from grouprl.training.trainer import Trainer


def one_step_grads(
    out, model_dir, *, checkpointing: bool, backend: str, shared: str, lora: bool = False
) -> dict:
    cfg = base_config(out, model_dir, max_steps=1, learning_rate=0.0, micro_batch_size=4)
    cfg["model"].update(
        gradient_checkpointing=checkpointing, shared_prefix=shared, shared_prefix_backend=backend
    )
    if lora:  # frozen base: the checkpointed layers get their input gradients from PEFT's hook
        cfg["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    cfg["regularizers"] = [{"name": "kl", "beta": 0.1}]  # a reference forward too
    tr = Trainer(cfg, train_dataset=arith_rows())
    on = getattr(tr.model, "is_activation_checkpointing", None)  # transformers >= 5.2x
    assert (on if on is not None else tr.model.is_gradient_checkpointing) == checkpointing
    torch.manual_seed(0)
    tr.train()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    tr.close()
    return grads


@pytest.mark.parametrize(
    ("shared", "backend", "lora"),
    [
        ("on", "two_part", False),
        ("on", "sdpa", False),
        ("off", "auto", False),
        ("on", "auto", True),
    ],
)
def test_checkpointing_keeps_the_gradient(shared, backend, lora, tmp_path, tiny_model_dir):
    kw = {"backend": backend, "shared": shared, "lora": lora}
    want = one_step_grads(tmp_path / "plain", tiny_model_dir, checkpointing=False, **kw)
    got = one_step_grads(tmp_path / "ckpt", tiny_model_dir, checkpointing=True, **kw)
    assert want and want.keys() == got.keys()
    for n, g in want.items():
        assert torch.allclose(g, got[n], atol=1e-6, rtol=1e-5), n


def test_recompute_context_outside_a_packed_forward_restores_nothing():
    forward, recompute = recompute_context()
    with forward, recompute:  # both no-ops
        pass
