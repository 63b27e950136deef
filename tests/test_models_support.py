"""Which architectures the shared prefix accepts (`check_support`) and which heads run chunked.

Each tiny model is built from its transformers 5.24 config class (random weights, CPU).
docs/shared_prefix.md's table is these tests' results.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model
from test_models_masks import assert_same_grads, context_batch, grads, naive_logprobs
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM

import grouprl.models.forward as forward_mod
import grouprl.models.packing as packing
import grouprl.models.support as support
from grouprl.models.forward import completion_logprobs
from grouprl.models.head import plan_head
from grouprl.models.support import check_support

V = 16  # the char tokenizer of tiny_model: 4 specials + "0123456789+="
ATT = {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
# name: (model_type, config overrides, attn_implementation)
ZOO = {
    "gemma3": (
        "gemma3_text",
        {
            **ATT,
            "head_dim": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "sdpa",
    ),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4}, "sdpa"),
    "cohere": ("cohere", {**ATT, "logit_scale": 0.25}, "sdpa"),
    "granite": ("granite", {**ATT, "logits_scaling": 4.0}, "sdpa"),
    "gemma2": ("gemma2", {**ATT, "head_dim": 8, "final_logit_softcapping": 3.0}, "eager"),
    "llama4": (
        "llama4_text",
        {**ATT, "intermediate_size_mlp": 64, "head_dim": 8, "num_local_experts": 2},
        "sdpa",
    ),
    "falcon_h1": (
        "falcon_h1",
        {
            **ATT,
            "head_dim": 8,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_d_state": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
        },
        "sdpa",
    ),
    "lfm2": (
        "lfm2",
        {
            **ATT,
            "layer_types": ["conv", "full_attention"],
            "block_dim": 32,
            "block_ff_dim": 64,
            "conv_L_cache": 3,
        },
        "sdpa",
    ),
    "qwen3_next": (
        "qwen3_next",
        {
            **ATT,
            "head_dim": 8,
            "full_attention_interval": 2,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        "sdpa",
    ),
    "jamba": (
        "jamba",
        {
            **ATT,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 2,
            "mamba_d_state": 8,
            "mamba_dt_rank": 4,
            "mamba_expand": 2,
        },
        "sdpa",
    ),
    "mamba": ("mamba", {"state_size": 8, "expand": 2, "conv_kernel": 4}, "eager"),
    # key biases: their gradient is 0 in exact arithmetic, rounding noise in both layouts
    "opt": ("opt", {"ffn_dim": 64, "num_attention_heads": 4, "word_embed_proj_dim": 32}, "sdpa"),
    # dynamic mask attention: a learned bias (A, dt_proj) is built into the attention mask,
    # which the packed layout replaces; at initialization A = 0, so the VALUES agree
    "doge": ("doge", {**ATT, "max_position_embeddings": 128}, "sdpa"),
}


def zoo_model(name: str) -> torch.nn.Module:
    model_type, overrides, impl = ZOO[name]
    ids = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    cfg = AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=32, num_hidden_layers=2, **ids, **overrides
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=impl)
    return model.eval()  # no dropout: GPT-2 has some


def build(name: str) -> torch.nn.Module:
    return tiny_model(name)[0] if name in ("qwen2", "llama", "mistral") else zoo_model(name)


ACCEPTED = ["qwen2", "llama", "mistral", "gemma3", "gpt2", "cohere", "granite", "opt"]
REFUSED = {
    "falcon_h1": "layer_types hybrid",
    "lfm2": "layer_types conv",
    "qwen3_next": "layer_types linear_attention",
    "jamba": "layer_types linear_attention",
    "mamba": "layer_types linear_attention",
    "gemma2": "final_logit_softcapping=3.0",
    "llama4": "get_decoder() returns the model itself",
    "doge": "self_attn.A gets a gradient in the repeated layout only",
}


def test_the_gradient_check_sees_what_equal_values_hide():
    # Doge at initialization: packed and repeated log-probs agree, the gradients do not
    model = build("doge")
    with torch.no_grad():
        a, _ = completion_logprobs(model, *support_probe_batch())
        b, _ = completion_logprobs(model, *support_probe_batch(), shared_prefix=True)
    assert float((a - b).abs().max()) < 1e-5
    ok, reason = check_support(model)
    assert not ok and "gradient" in reason, reason


def support_probe_batch():
    return support.probe_batch(V)


def test_self_check_batch_packs_two_groups_into_one_row():
    # the layout training uses: groups share a packed row where they fit
    layout = packing.pack_groups(*support_probe_batch())
    units = packing.unit_ids(layout.segment_RL)
    assert int(units.max()) + 1 == 3 and layout.segment_RL.shape[0] == 2


def test_self_check_catches_a_group_that_sees_another_of_its_row(monkeypatch):
    # completions also see the prompt of the group before theirs in the same packed row: one
    # group per row (the old self-check batch) cannot show it. The dense-mask backend: two_part
    # gathers each group's own keys only, so no rule can leak there
    import grouprl.models.forward as forward

    model, _ = tiny_model("qwen2")
    monkeypatch.setattr(forward, "resolve_backend", lambda *a: "sdpa")
    assert check_support(model)[0]
    rule = packing.allowed

    def leaky(seg_q, seg_k, q, k, pos_q, pos_k, window):
        other = packing.group_of(seg_k) == packing.group_of(seg_q) - 1
        prompt = packing.part_of(seg_k) == 0
        return rule(seg_q, seg_k, q, k, pos_q, pos_k, window) | (
            other & prompt & (k <= q) & (seg_k >= 0) & (packing.part_of(seg_q) >= 1)
        )

    monkeypatch.setattr(packing, "allowed", leaky)
    ok, reason = check_support(model)
    assert not ok and "differ by" in reason, reason


@pytest.mark.parametrize("name", ACCEPTED)
def test_check_support_accepts_attention_only_models(name):
    ok, reason = check_support(build(name))
    assert ok, reason


@pytest.mark.parametrize("name", list(REFUSED))
def test_check_support_refuses_with_a_one_line_reason(name):
    ok, reason = check_support(build(name))
    assert not ok and REFUSED[name] in reason and "\n" not in reason, reason


@pytest.mark.parametrize(
    ("name", "module"), [("falcon_h1", "(Conv1d)"), ("lfm2", "(Lfm2ShortConv)")]
)
def test_module_walk_refuses_state_the_layer_types_do_not_name(name, module, monkeypatch):
    # were the config's layer types taken for attention, the walk over the decoder still
    # finds the convolution state
    model = build(name)
    kinds = set(model.config.layer_types)
    monkeypatch.setattr(support, "ATTENTION_LAYER_TYPES", support.ATTENTION_LAYER_TYPES | kinds)
    ok, reason = check_support(model)
    assert not ok and module in reason and "keeps state" in reason, reason


def test_self_check_catches_a_completion_that_sees_another(monkeypatch):
    # the dense-mask backend: completion j also sees completion j - 1
    import grouprl.models.forward as forward

    model, _ = tiny_model("qwen2")
    monkeypatch.setattr(forward, "resolve_backend", lambda *a: "sdpa")
    assert check_support(model)[0]
    rule = packing.allowed

    def leaky(seg_q, seg_k, q, k, pos_q, pos_k, window):
        return rule(seg_q, seg_k, q, k, pos_q, pos_k, window) | ((k <= q) & (seg_k == seg_q - 1))

    monkeypatch.setattr(packing, "allowed", leaky)
    ok, reason = check_support(model)
    assert not ok and "differ by" in reason, reason


def test_self_check_catches_a_completion_that_misses_its_prompt(monkeypatch):
    # the default backend (two_part on CPU): completions do not see the first prompt token
    model, _ = tiny_model("qwen2")
    assert check_support(model)[0]
    rule = packing.allowed

    def blind(seg_q, seg_k, q, k, pos_q, pos_k, window):
        return rule(seg_q, seg_k, q, k, pos_q, pos_k, window) & ~((seg_q >= 1) & (k == 0))

    monkeypatch.setattr(packing, "allowed", blind)
    ok, reason = check_support(model)
    assert not ok and "differ by" in reason, reason


def test_one_rule_for_every_attention_backend(monkeypatch):
    # flex, sdpa and two_part read the same `allowed`: a broken rule shows in all, identically
    model, tok = tiny_model("llama")
    args, _ = context_batch(tok)
    with torch.no_grad():
        good = completion_logprobs(model, *args, shared_prefix=True, attn_backend="flex")[0]
        rule = packing.allowed
        monkeypatch.setattr(  # completions blind to the first prompt token
            packing,
            "allowed",
            lambda sq, sk, q, k, pq, pk, w: rule(sq, sk, q, k, pq, pk, w) & ~((sq >= 1) & (k == 0)),
        )
        sdpa = completion_logprobs(model, *args, shared_prefix=True, attn_backend="sdpa")[0]
        flex = completion_logprobs(model, *args, shared_prefix=True, attn_backend="flex")[0]
        two = completion_logprobs(model, *args, shared_prefix=True, attn_backend="two_part")[0]
    assert (sdpa - flex).abs().max() <= 1e-5
    assert (sdpa - two).abs().max() <= 1e-5
    assert (good - flex).abs().max() > 1e-3


def test_decoder_that_is_the_model_uses_full_logits(caplog):
    model = build("llama4")
    assert model.get_decoder() is model  # Llama4ForCausalLM in transformers 5.24
    _, tok = tiny_model()
    args, loss_mask = context_batch(tok)
    forward_mod._WARNED.discard(type(model))
    with caplog.at_level(logging.WARNING, logger="grouprl"):
        got, _ = completion_logprobs(model, *args, temperature=0.8)
        completion_logprobs(model, *args)
    warnings = [r for r in caplog.records if "full-logits" in r.getMessage()]
    assert len(warnings) == 1 and "get_decoder() returns the model itself" in warnings[0].message
    ref = naive_logprobs(model, *args, temperature=0.8)
    assert (ref - got).abs().max() <= 1e-5
    assert_same_grads(grads(model, ref, loss_mask), grads(model, got, loss_mask))
    with pytest.raises(NotImplementedError, match="returns the model itself"):
        completion_logprobs(model, *args, shared_prefix=True)


def test_softcapped_head_falls_back_with_one_warning(caplog):
    model = build("gemma2")
    _, tok = tiny_model()
    args, _ = context_batch(tok)
    forward_mod._WARNED.discard(type(model))
    with caplog.at_level(logging.WARNING, logger="grouprl"):
        got, _ = completion_logprobs(model, *args)
        completion_logprobs(model, *args)
    assert sum("final_logit_softcapping" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        assert (naive_logprobs(model, *args) - got).abs().max() <= 1e-5
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        completion_logprobs(model, *args, shared_prefix=True)


@pytest.mark.parametrize("name", ["cohere", "granite"])
def test_scaled_logits_pack_exactly(name):
    model = build(name)
    assert plan_head(model).scaling is not None  # the chunked head applies it
    _, tok = tiny_model()
    args, loss_mask = context_batch(tok)
    ref = naive_logprobs(model, *args, temperature=0.8)
    g_ref = grads(model, ref, loss_mask)
    for shared_prefix in (False, True):
        got, _ = completion_logprobs(model, *args, temperature=0.8, shared_prefix=shared_prefix)
        assert (ref - got).abs().max() <= 1e-5, shared_prefix
        assert_same_grads(g_ref, grads(model, got, loss_mask))


class _Capped(Qwen2ForCausalLM):
    """An unknown post-head transform: nothing in the config says so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out


def test_unknown_post_head_transform_is_detected(caplog):
    base, tok = tiny_model("qwen2")
    model = _Capped(base.config)
    model.load_state_dict(base.state_dict())
    ok, reason = check_support(model)
    assert not ok and "post-processed" in reason, reason
    args, _ = context_batch(tok)
    with caplog.at_level(logging.WARNING, logger="grouprl"):
        got, _ = completion_logprobs(model, *args)
    assert any("_Capped" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert (naive_logprobs(model, *args) - got).abs().max() <= 1e-5


class _LoRAHead(torch.nn.Module):
    """A LoRA-style wrapper around the LM head (what PEFT puts in place of `lm_head`)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(0.3 * torch.randn(rank, base.in_features))
        self.B = torch.nn.Parameter(0.3 * torch.randn(base.out_features, rank))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.base(h) + (h @ self.A.T) @ self.B.T


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["repeated", "shared"])
def test_head_is_called_as_a_module(shared_prefix):
    model, tok = tiny_model("qwen2")
    model.lm_head = _LoRAHead(model.lm_head)
    assert model.get_output_embeddings() is model.lm_head
    args, loss_mask = context_batch(tok)
    ref = naive_logprobs(model, *args)
    got, _ = completion_logprobs(model, *args, shared_prefix=shared_prefix, chunk_size=4)
    assert (ref - got).abs().max() <= 1e-5
    g_ref, g_got = grads(model, ref, loss_mask), grads(model, got, loss_mask)
    assert {"lm_head.A", "lm_head.B"} <= set(g_got)
    assert_same_grads(g_ref, g_got)


def test_self_check_of_a_half_precision_model_runs_on_an_fp32_copy(monkeypatch):
    model, _ = tiny_model("qwen2")
    model.to(torch.bfloat16).train()
    seen = []
    run = support.completion_logprobs

    def spy(probe, *args, **kwargs):
        seen.append((next(probe.parameters()).dtype, probe.training))
        return run(probe, *args, **kwargs)

    monkeypatch.setattr(support, "completion_logprobs", spy)
    ok, reason = check_support(model)
    assert ok, reason
    # fp32, eval mode (no dropout): values, then gradients, each in both layouts
    assert seen == [(torch.float32, False)] * 4
    assert next(model.parameters()).dtype == torch.bfloat16 and model.training


def test_values_alone_miss_a_convolution_the_gradients_do_not():
    # at this size LFM2's short convolution leaks too little into the VALUES for a 1e-4
    # comparison to see; the first layer's gradients show it (and the structural checks
    # refuse it before either)
    model = build("lfm2")
    with torch.no_grad():
        a, _ = completion_logprobs(model, *support_probe_batch())
        b, _ = completion_logprobs(model, *support_probe_batch(), shared_prefix=True)
    assert float((a - b).abs().max()) < 1e-4
    ok, reason = support._self_check(model, 1e-4)
    assert not ok and "gradients differ" in reason, reason
    assert not check_support(model)[0]


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_model_shared_prefix_setting(mode, caplog):
    from grouprl.config import ConfigError
    from grouprl.training.setup import decide_shared_prefix

    assert decide_shared_prefix(build("qwen2"), mode) == (mode != "off")
    hybrid = build("falcon_h1")
    if mode == "on":
        with pytest.raises(ConfigError, match="layer_types hybrid"):
            decide_shared_prefix(hybrid, mode)
        return
    with caplog.at_level(logging.WARNING, logger="grouprl"):
        assert decide_shared_prefix(hybrid, mode) is False
    warned = [r.getMessage() for r in caplog.records if "shared prefix off" in r.getMessage()]
    assert len(warned) == (mode == "auto") and all("layer_types hybrid" in w for w in warned)
