"""Data parallelism for real: `torchrun --nproc_per_node=2` (gloo, 2 CPU processes) against
one process on the same global batch (tests/dist_run.py scripts the sampling so both see the
same completions). Slow: each case starts three Python processes."""

from __future__ import annotations

import os
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


def _run(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
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


# grpo; dapo: dynamic sampling refills (all ranks agree on the rounds); gdpo: per-reward
# normalization; spine: entropy quantiles and forking-token selection; disco: whole-group loss
@pytest.mark.parametrize("recipe", ["grpo", "dapo", "gdpo", "spine", "disco"])
def test_two_ranks_make_the_update_of_one(tmp_path, model_dir, recipe):
    out = {}
    for ranks in (1, 2):
        d = tmp_path / f"r{ranks}"
        d.mkdir()
        res = _run([str(model_dir), str(d), recipe], ranks)
        assert res.returncode == 0, res.stderr[-3000:]
        out[ranks] = torch.load(d / "params.pt")
    diff = max(float((out[1][k] - out[2][k]).abs().max()) for k in out[1])
    assert diff <= 1e-5, diff
    from safetensors.torch import load_file

    init = load_file(str(Path(model_dir) / "model.safetensors"))
    moved = max(float((out[1][k] - init[k]).abs().max()) for k in init)
    assert moved > 100 * max(diff, 1e-7), (moved, diff)  # the runs trained


def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, model_dir):
    """Step 1 on 2 ranks, then step 2 resumed on 1 rank: the parameters of 2 steps on 1."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    res = _run([str(model_dir), str(one), "dapo", "2"], 1)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([str(model_dir), str(two), "dapo", "1"], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([str(model_dir), str(two), "dapo", "2", "resume"], 1)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = torch.load(one / "params.pt"), torch.load(two / "params.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


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
    a, b = torch.load(one / "params.pt"), torch.load(two / "params.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
