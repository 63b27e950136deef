"""Data parallelism for real: `torchrun --nproc_per_node=2` (gloo, 2 CPU processes) against
one process on the same global batch (tests/dist_run.py scripts the sampling so both see the
same completions). Slow: each case starts three Python processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grouprl.models.tiny import build_char_tokenizer, build_tiny_model, save_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_run.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A rank process that aborts in C++ at start-up ("terminate called without an active
# exception", SIGABRT) was seen once in ~10 CI runs of the LoRA + fsdp2 case and never
# reproduced (8 runs in a row passed): such a run is started once more. A crash that
# happens again, or any other failure, still fails the test.
ABORT = "terminate called without an active exception"


def _run(args: list[str], ranks: int, **env_vars: str) -> subprocess.CompletedProcess:
    res = _run_once(args, ranks, **env_vars)
    if res.returncode != 0 and ABORT in res.stderr and "exitcode  : -6" in res.stderr:
        if "resume" not in args:  # a fresh run starts in an empty run folder again
            shutil.rmtree(Path(args[1]) / "run", ignore_errors=True)
        res = _run_once(args, ranks, **env_vars)
    return res


def _run_once(args: list[str], ranks: int, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **env_vars}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(SCRIPT), *args]
    if ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1",
            f"--master_port={_port()}",
            str(SCRIPT),
            *args,
        ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_char_tokenizer("0123456789+-=")
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    return save_model(model, tok, tmp_path_factory.mktemp("dist") / "model")


def _params(d: Path) -> dict[str, torch.Tensor]:
    return torch.load(d / "params.pt")


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# grpo; dapo: dynamic sampling refills (all ranks agree on the rounds); gdpo: per-reward
# normalization; spine: entropy quantiles and forking-token selection; disco: whole-group loss
@pytest.mark.parametrize("recipe", ["grpo", "dapo", "gdpo", "spine", "disco"])
def test_two_ranks_make_the_update_of_one(tmp_path, model_dir, recipe):
    """1 process, 2 with ddp, 2 with fsdp2 (sharded weights): the same parameters."""
    out = {}
    for name, ranks, strategy in (("one", 1, "auto"), ("ddp", 2, "ddp"), ("fsdp2", 2, "fsdp2")):
        d = tmp_path / name
        d.mkdir()
        res = _run([str(model_dir), str(d), recipe], ranks, DIST_RUN_STRATEGY=strategy)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = _params(d)
    for name in ("ddp", "fsdp2"):
        diff = _diff(out["one"], out[name])
        assert diff <= 1e-5, (name, diff)
    from safetensors.torch import load_file

    init = load_file(str(Path(model_dir) / "model.safetensors"))
    moved = max(float((out["one"][k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-4, moved  # the runs trained


def test_fsdp2_with_uneven_shares_makes_the_update_of_one(tmp_path, model_dir):
    """3 prompts on 2 processes: one has two groups (two micro-batches), the other one, and
    runs a zero-weight forward/backward for the collective it lacks; dapo's refill rounds
    may leave a process no prompt at all."""
    out = {}
    for name, ranks in (("one", 1), ("fsdp2", 2)):
        d = tmp_path / name
        d.mkdir()
        res = _run(
            [str(model_dir), str(d), "dapo"],
            ranks,
            DIST_RUN_STRATEGY="fsdp2",
            DIST_RUN_PROMPTS="3",
        )
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = _params(d)
    assert _diff(out["one"], out["fsdp2"]) <= 1e-5


@pytest.mark.parametrize("recipe", ["grpo", "dapo"])
def test_async_on_two_ranks_makes_the_updates_of_one_synchronous_process(
    tmp_path, model_dir, recipe
):
    """train.async one_step on 2 ranks: the collection thread gathers (and dapo agrees on
    refill rounds) over its own process group while the main threads all-reduce gradients.
    The scripted sampler ignores the weights, so sampling ahead changes nothing: 3 steps
    equal one synchronous process's."""
    out = {}
    for name, ranks, mode in (("one", 1, "off"), ("async", 2, "one_step")):
        d = tmp_path / name
        d.mkdir()
        res = _run(
            [str(model_dir), str(d), recipe, "3"],
            ranks,
            DIST_RUN_STRATEGY="ddp" if ranks > 1 else "auto",
            DIST_RUN_ASYNC=mode,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = _params(d)
    lines = (tmp_path / "async" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["async/staleness"] for x in lines] == [0.0, 1.0, 1.0]
    assert _diff(out["one"], out["async"]) <= 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, model_dir, strategy):
    """Step 1 on 2 ranks, then step 2 resumed on 1 rank: the parameters of 2 steps on 1
    (the checkpoint holds whole tensors whatever the layout)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    res = _run([str(model_dir), str(one), "dapo", "2"], 1)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([str(model_dir), str(two), "dapo", "1"], 2, DIST_RUN_STRATEGY=strategy)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([str(model_dir), str(two), "dapo", "2", "resume"], 1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _diff(_params(one), _params(two)) <= 1e-5


def test_fsdp2_resume_on_two_ranks_samples_and_trains_as_uninterrupted(tmp_path, model_dir):
    """Real sampling (HF generate on the gathered fsdp2 policy, each process its own RNG
    stream): 3 steps straight, against 1 step + resume for 2 more, both on 2 processes.
    Each process's RNG state is in the checkpoint (rng_rank1.pt), so the resumed run samples
    the same completions and ends with the same parameters."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    env = {"DIST_RUN_STRATEGY": "fsdp2", "DIST_RUN_ENGINE": "hf"}
    res = _run([str(model_dir), str(straight), "grpo", "3"], 2, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([str(model_dir), str(resumed), "grpo", "1"], 2, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (resumed / "run" / "checkpoints" / "step_0000001" / "rng_rank1.pt").is_file()
    res = _run([str(model_dir), str(resumed), "grpo", "3", "resume"], 2, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _diff(_params(straight), _params(resumed)) <= 1e-6
    a = torch.load(straight / "loss.pt")
    b = torch.load(resumed / "loss.pt")
    assert a[-2:] == pytest.approx(b, abs=1e-6)  # the resumed run's 2 steps


def test_checkpointing_on_two_ranks_makes_the_update_of_one(tmp_path, model_dir):
    """Activation checkpointing (with the packed layout's recompute context) under ddp and
    fsdp2 (fully_shard per decoder layer, recomputed with its all-gather): the parameters of
    one process without checkpointing."""
    out = {}
    for name, ranks, env in (
        ("plain", 1, {}),
        ("one", 1, {"DIST_RUN_CHECKPOINTING": "1"}),
        ("ddp", 2, {"DIST_RUN_CHECKPOINTING": "1", "DIST_RUN_STRATEGY": "ddp"}),
        ("fsdp2", 2, {"DIST_RUN_CHECKPOINTING": "1", "DIST_RUN_STRATEGY": "fsdp2"}),
    ):
        d = tmp_path / name
        d.mkdir()
        res = _run([str(model_dir), str(d), "grpo"], ranks, **env)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = _params(d)
    for name in ("one", "ddp", "fsdp2"):
        assert _diff(out["plain"], out[name]) <= 1e-5, name


def test_lora_on_two_ranks_makes_the_update_of_one_and_resumes(tmp_path, model_dir):
    """LoRA adapters (PEFT) with a KL term against the adapter-off base: 2 steps on 2
    processes with ddp, and with fsdp2 as 1 step + a resume, give 1 process's adapters
    (the sharded adapter is saved whole in PEFT's format and cut back on load)."""
    lora = {"DIST_RUN_LORA": "4"}
    out = {}
    d = tmp_path / "one"
    d.mkdir()
    res = _run([str(model_dir), str(d), "grpo"], 1, **lora)
    assert res.returncode == 0, res.stderr[-3000:]
    out["one"] = _params(d)
    d = tmp_path / "ddp"
    d.mkdir()
    res = _run([str(model_dir), str(d), "grpo"], 2, DIST_RUN_STRATEGY="ddp", **lora)
    assert res.returncode == 0, res.stderr[-3000:]
    out["ddp"] = _params(d)
    d = tmp_path / "fsdp2"
    d.mkdir()
    for args in (["1"], ["2", "resume"]):
        res = _run([str(model_dir), str(d), "grpo", *args], 2, DIST_RUN_STRATEGY="fsdp2", **lora)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (d / "run" / "checkpoints" / "step_0000001" / "adapter_model.safetensors").is_file()
    out["fsdp2"] = _params(d)
    assert any("lora_B" in k for k in out["one"])
    for name in ("ddp", "fsdp2"):
        assert _diff(out["one"], out[name]) <= 1e-5, name


def test_accelerate_launch_makes_the_update_of_one(tmp_path, model_dir):
    """`accelerate launch --multi_gpu --num_processes 2` (it starts torchrun's workers; on a
    CPU machine the processes use gloo) with fsdp2: the parameters of one process."""
    pytest.importorskip("accelerate")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    res = _run([str(model_dir), str(one), "grpo"], 1)
    assert res.returncode == 0, res.stderr[-3000:]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "DIST_RUN_STRATEGY": "fsdp2",
    }
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_port()}",
        str(SCRIPT),
        str(model_dir),
        str(two),
        "grpo",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (two / "world.txt").read_text() == "2"
    assert _diff(_params(one), _params(two)) <= 1e-5


def test_a_rank_that_raises_ends_the_run_with_its_message(tmp_path, model_dir):
    """Rank 1's sampling raises: torchrun stops rank 0 too (no hang in the next collective)
    and reports the failed rank with its message."""
    import time

    env_fail = {"DIST_RUN_FAIL_RANK": "1"}
    os.environ.update(env_fail)
    try:
        t0 = time.monotonic()
        res = _run([str(model_dir), str(tmp_path), "grpo"], 2)
    finally:
        os.environ.pop("DIST_RUN_FAIL_RANK")
    assert res.returncode != 0
    assert time.monotonic() - t0 < 120
    log = res.stdout + res.stderr
    assert "injected failure on rank 1" in log
    assert "rank: 1" in log or "local_rank: 1" in log


def test_a_rank_killed_outright_ends_the_run_naming_it(tmp_path, model_dir):
    """Rank 1 is SIGKILLed mid-step (no exception, no message of its own): torchrun ends
    rank 0 instead of leaving it in the next collective, and names rank 1 and the signal."""
    import time

    t0 = time.monotonic()
    res = _run([str(model_dir), str(tmp_path), "grpo"], 2, DIST_RUN_KILL_RANK="1")
    assert res.returncode != 0
    assert time.monotonic() - t0 < 120
    log = res.stdout + res.stderr
    assert "rank      : 1" in log or "local_rank: 1" in log, log[-2000:]
    assert "SIGKILL" in log or "Signal 9" in log, log[-2000:]


def test_a_reward_failing_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, model_dir):
    """The reward fails on rank 1 only (its samples): the failure limit trips there, every
    rank agrees to stop after the same step, the checkpoint is written, and rank 0 reports
    the same error, rebuilt from rank 1's."""
    res = _run([str(model_dir), str(tmp_path), "grpo", "3"], 2, DIST_RUN_REWARD_FAIL_RANK="1")
    assert res.returncode != 0
    log = res.stdout + res.stderr
    rank0 = [ln for ln in log.splitlines() if ln.startswith("[rank0]")]
    assert any("RewardFailureError: reward 'has_seven' failed on 100%" in ln for ln in rank0)
    assert "judge unreachable from this rank" in log
    assert (tmp_path / "run" / "checkpoints" / "step_0000001").is_dir()


def test_two_nodes_on_localhost_make_the_update_of_one(tmp_path, model_dir):
    """`torchrun --nnodes=2` with two agents (one process each) meeting at a c10d
    rendezvous on localhost: the multi-machine launch, simulated on one machine."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    res = _run([str(model_dir), str(one), "grpo"], 1)
    assert res.returncode == 0, res.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    port = _port()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=grouprl-test",
                str(SCRIPT),
                str(model_dir),
                str(two),
                "grpo",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outs[0][-2000:] + outs[1][-2000:]
    assert _diff(_params(one), _params(two)) <= 1e-5


def test_two_ranks_match_one_with_ragged_groups(tmp_path, model_dir):
    """knapsack gives prompts different numbers of rollouts (groups padded to the largest):
    2 processes (ddp) make the update of one. Prompts come back (24 rows, 3 a step,
    10 steps)."""
    out = {}
    for name, ranks, strategy in (("one", 1, "auto"), ("ddp", 2, "ddp")):
        d = tmp_path / name
        d.mkdir()
        res = _run(
            [str(model_dir), str(d), "knapsack", "10"],
            ranks,
            DIST_RUN_STRATEGY=strategy,
            DIST_RUN_PROMPTS="3",
        )
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = _params(d)
    assert _diff(out["one"], out["ddp"]) <= 1e-5


# guide_hints: rows sampled with a hint train with the plain prompt, π_old from an extra
# forward in the hinted context; expo: demonstration rows (sft_rows) in groups of G + 1
@pytest.mark.parametrize(
    "recipe,strategy",
    [
        ("guide_hints", {"name": "guide_hints", "hint_template": "{hint}", "replace_num": 2}),
        ("expo", {"name": "expo", "explain_template": "{answer}", "require_correct": False}),
    ],
)
def test_two_ranks_match_one_with_off_policy_rows(tmp_path, model_dir, recipe, strategy):
    """...and every completion, the strategy's included, is scored by one process only."""
    out, scored = {}, {}
    for name, ranks, strat in (("one", 1, "auto"), ("ddp", 2, "ddp"), ("fsdp2", 2, "fsdp2")):
        d = tmp_path / name
        d.mkdir()
        res = _run(
            [str(model_dir), str(d), recipe, "2"],
            ranks,
            DIST_RUN_STRATEGY=strat,
            DIST_RUN_ROLLOUT_STRATEGY=json.dumps(strategy),
            DIST_RUN_COUNT_DIR=str(d),
        )
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = _params(d)
        scored[name] = sum(int(x) for f in d.glob("rank*") for x in f.read_text().split())
    lines = (tmp_path / "one" / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [m for m in map(json.loads, lines) if "loss" in m]
    key = "hint/rescued_groups" if recipe == "guide_hints" else "completions/sft_rows"
    assert sum(m.get(key, 0.0) for m in steps) >= 1  # the rows under test were there
    assert scored["ddp"] == scored["fsdp2"] == scored["one"], scored
    assert _diff(out["one"], out["ddp"]) <= 1e-5
    assert _diff(out["one"], out["fsdp2"]) <= 1e-5
