"""Shared fixtures: a tiny char-level model saved to a temp dir, and small prompt sets."""

from __future__ import annotations

import pytest
import torch

from grouprl.models.tiny import build_char_tokenizer, build_tiny_model, save_model

CHARS = "0123456789+-="


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    tok = build_char_tokenizer(CHARS)
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    return save_model(model, tok, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny():
    tok = build_char_tokenizer(CHARS)
    return build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0), tok


ARCHS = {"qwen2": {}, "llama": {}, "mistral": {"sliding_window": 5}}


def tiny_model(arch: str = "qwen2", **overrides):
    """A tiny model of `arch` (GQA: 4 heads, 2 KV heads; Mistral with a short sliding window)
    over the digits, `+` and `=`, and its tokenizer."""
    tok = build_char_tokenizer("0123456789+=")
    kw = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "seed": 1}
    model = build_tiny_model(tok, arch=arch, **{**kw, **ARCHS.get(arch, {}), **overrides})
    return model, tok


def arith_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 10 + (7 * i) % 80, 11 + (13 * i) % 70
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def base_config(out_dir, model_dir, **train) -> dict:
    """A 3-step GRPO config on the tiny model (no KL unless asked)."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "rollout": {"num_generations": 4, "max_new_tokens": 4, "temperature": 1.0},
        "rewards": ["exact_match"],
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "aggregation": "token_mean"},
        "regularizers": [],
        "train": {
            "output_dir": str(out_dir),
            "max_steps": 3,
            "prompts_per_step": 3,
            "micro_batch_size": 5,
            "learning_rate": 1e-2,
            "save_every": 0,
            "progress": False,
            **train,
        },
    }


def record_collections(trainer) -> list:
    """Every (batch, stats) the trainer's collector returns from now on, in order."""
    seen: list = []
    collect = trainer.collector.collect

    def recording(B, **kw):
        out = collect(B, **kw)
        seen.append(out)
        return out

    trainer.collector.collect = recording
    return seen


def text_rollouts(tok, prompts: list[str], texts: list[str], group_size: int, logp=None):
    """Rollouts of given completion texts (len(prompts)·group_size of them, prompt-major),
    each ended by EOS, for a stand-in engine; `logp`: a constant sampler log-prob per token."""
    from grouprl.rollout.base import Rollouts

    enc = tok([p for p in prompts for _ in range(group_size)], padding=True, return_tensors="pt")
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(len(x) for x in ids)
    comp = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), T)
    for i, x in enumerate(ids):
        comp[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1.0
    return Rollouts(
        prompt_ids_NP=enc["input_ids"],
        prompt_mask_NP=enc["attention_mask"].float(),
        completion_ids_NT=comp,
        attention_mask_NT=mask,
        loss_mask_NT=mask.clone(),
        truncated_N=torch.zeros(len(ids), dtype=torch.bool),
        completions=list(texts),
        group_size=group_size,
        sampling_logp_NT=None if logp is None else mask * logp,
    )


def strategy_collector(tok, rows, strategy, engine, G=3, sampler=None):
    """A real Collector over `rows` with a stand-in `engine`, exact_match rewards and a
    rollout strategy (the strategies' tests)."""
    from grouprl.data.datasets import load_prompts, prompt_renderer
    from grouprl.data.samplers import build_sampler
    from grouprl.rewards import RewardSet
    from grouprl.rollout.base import SamplingParams
    from grouprl.training.collect import Collector

    data = load_prompts(rows, tokenizer=tok)
    return Collector(
        engine=engine,
        rewards=RewardSet(["exact_match"]),
        dataset=data,
        sampler=build_sampler(sampler, len(data), seed=0, shuffle=False),
        sampling=SamplingParams(num_generations=G, max_new_tokens=8),
        pad_token_id=tok.pad_token_id,
        strategy=strategy,
        render=prompt_renderer(tok),
    )


def _weighted_grads(model, logp, mask):
    model.zero_grad(set_to_none=True)
    # a loss weighting every token differently, so mixed-up positions would show
    w = torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)
    (logp * mask * w).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_matches_repeated(model, args, backend: str) -> None:
    """Shared-prefix log-probs and entropy within 1e-5 of the repeated layout's on the batch
    `args` (prompt ids, prompt mask, completion ids, completion mask), and their gradients
    within 1e-4 relative. FlexAttention has no CPU backward: on CPU only its values."""
    from grouprl.models.forward import completion_logprobs

    with_grad = backend != "flex" or torch.cuda.is_available()
    with torch.set_grad_enabled(with_grad):
        ref, ref_h = completion_logprobs(model, *args, temperature=0.9, with_entropy=True)
        got, got_h = completion_logprobs(
            model,
            *args,
            temperature=0.9,
            with_entropy=True,
            shared_prefix=True,
            attn_backend=backend,
        )
    assert (ref - got).abs().max() <= 1e-5
    assert (ref_h - got_h).abs().max() <= 1e-5
    if not with_grad:
        return
    mask = args[3]
    g_ref, g_got = _weighted_grads(model, ref, mask), _weighted_grads(model, got, mask)
    assert set(g_ref) == set(g_got)
    for n, g in g_ref.items():
        rel = (g - g_got[n]).norm() / g.norm().clamp(min=1e-12)
        assert rel <= 1e-4, (n, float(rel))
