"""The policy forward under DistributedDataParallel: its hooks run, its gradients are the same."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from test_models_masks import assert_same_grads, context_batch, grads, tiny_model
from torch.nn.parallel import DistributedDataParallel

import grouprl.models.forward as forward_mod
from grouprl.models.forward import PolicyLogProbs, completion_logprobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}"
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["repeated", "shared"])
def test_ddp_runs_the_policy_forward_and_keeps_gradients(gloo_group, shared_prefix):
    model, tok = tiny_model("qwen2")
    plain = copy.deepcopy(model)
    ddp = DistributedDataParallel(PolicyLogProbs(model, shared_prefix=shared_prefix))
    calls, inside, head_calls = [], [False], []
    ddp.module.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    ddp.module.register_forward_pre_hook(lambda module, args: inside.__setitem__(0, True))
    ddp.module.register_forward_hook(lambda module, args, out: inside.__setitem__(0, False))
    model.lm_head.register_forward_hook(lambda module, args, out: head_calls.append(inside[0]))
    args, loss_mask = context_batch(tok)

    got, _ = completion_logprobs(ddp, *args, temperature=0.7)
    assert calls == [4]  # the wrapped module's forward ran ...
    assert head_calls and all(head_calls)  # ... and the LM head ran inside it, as a module
    ref, _ = completion_logprobs(plain, *args, temperature=0.7, shared_prefix=shared_prefix)
    assert (ref - got).abs().max() <= 1e-6
    g_ref = grads(plain, ref, loss_mask)
    g_got = grads(ddp.module.model, got, loss_mask)
    assert_same_grads(g_ref, g_got, rel=1e-6)


def test_module_settings_decide_unless_given(monkeypatch):
    model, tok = tiny_model("llama")
    args, _ = context_batch(tok)
    backends = []  # the packed layouts' attention backends, one per packed forward
    pack = forward_mod.pack_groups

    def spy(*a, **k):
        layout = pack(*a, **k)
        backends.append(layout)
        return layout

    monkeypatch.setattr(forward_mod, "pack_groups", spy)
    policy = PolicyLogProbs(model, shared_prefix=True, attn_backend="flex")
    with torch.no_grad():
        packed_flex = completion_logprobs(policy, *args)[0]
        repeated = completion_logprobs(policy, *args, shared_prefix=False)[0]
        packed_sdpa = completion_logprobs(policy, *args, attn_backend="sdpa")[0]
    assert [lay.backend for lay in backends] == ["flex", "sdpa"]
    assert policy.shared_prefix and policy.attn_backend == "flex"  # restored after each call
    assert (packed_flex - repeated).abs().max() <= 1e-5
    assert (packed_flex - packed_sdpa).abs().max() <= 1e-5


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["repeated", "shared"])
def test_fsdp2_sharded_policy_gives_the_same_values_and_gradients(gloo_group, shared_prefix):
    # parameters become DTensor shards, gathered by FSDP2's hooks around each module's
    # forward: the LM head, called as a module inside the policy's forward (and again in
    # each checkpointed chunk's recompute), sees them whole
    from torch.distributed.fsdp import fully_shard

    model, tok = tiny_model("qwen2")
    plain = copy.deepcopy(model)
    policy = PolicyLogProbs(model, shared_prefix=shared_prefix, chunk_size=8)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    args, loss_mask = context_batch(tok)

    got, _ = completion_logprobs(policy, *args)
    ref, _ = completion_logprobs(plain, *args, shared_prefix=shared_prefix, chunk_size=8)
    assert (ref - got).abs().max() <= 1e-6
    g_ref = grads(plain, ref, loss_mask)
    g_got = {n: g.full_tensor() for n, g in grads(policy.model, got, loss_mask).items()}
    assert_same_grads(g_ref, g_got, rel=1e-6)
