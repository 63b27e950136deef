"""A run that lasts days: signals save and exit 0, output folders are never mixed, one
process per run, checkpoints load without unpickling, resume says what it restored and
what changed, and falls back past a damaged checkpoint."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import arith_rows, base_config
from safetensors.torch import load_file

from grouprl.config import ConfigError
from grouprl.training.checkpoint import CheckpointError, list_checkpoints
from grouprl.training.rundir import LOCK_NAME, RunLock
from grouprl.training.trainer import Trainer

TESTS = Path(__file__).resolve().parent


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


# ---------------------------------------------------------------------------- signals

REWARD_FILE = """
import time

def slow_length(prompts, completions, **kw):
    time.sleep({sleep})
    return [float(len(c)) for c in completions]
"""


def write_run(
    tmp_path: Path, model_dir: Path, name: str, *, sleep: float = 0.25, timeout: float = 60
) -> Path:
    """A CLI config (6 steps, a slow reward) and its data; returns the config path."""
    (tmp_path / "reward.py").write_text(REWARD_FILE.format(sleep=sleep))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arith_rows(12)))
    cfg = base_config(tmp_path / name, model_dir, max_steps=6, save_every=0)
    cfg["rewards"] = [{"path": f"{tmp_path / 'reward.py'}:slow_length", "timeout": timeout}]
    cfg["data"] = {"path": str(data)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grouprl.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, limit: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("the run made no progress")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("full")
    proc = cli("train", str(write_run(tmp, tiny_model_dir, "full", sleep=0.0)))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return final_weights(tmp / "full")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_saves_exits_0_and_resumes_exactly(tmp_path, tiny_model_dir, uninterrupted, sig):
    config = write_run(tmp_path, tiny_model_dir, "run")
    proc = cli("train", str(config))
    wait_for_steps(tmp_path / "run", 1, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped early" in out and "train.resume=true" in out, out
    ckpts = list_checkpoints(tmp_path / "run")
    step = int(ckpts[-1].name.split("_")[1])
    assert 1 <= step < 6, out  # it finished the step it was in, then stopped
    proc = cli("train", str(config), "train.resume=true")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resumed from {ckpts[-1]} at step {step}" in out, out
    resumed = final_weights(tmp_path / "run")
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed[k]), k


def test_a_second_signal_exits_at_once(tmp_path, tiny_model_dir):
    config = write_run(tmp_path, tiny_model_dir, "run", sleep=20.0)
    proc = cli("train", str(config))
    time.sleep(0.5)
    t0 = time.monotonic()
    while not (tmp_path / "run" / "config.yaml").exists():  # the loop has started
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)
    time.sleep(1.0)  # inside the first step's 20 s reward
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t1 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - t1 < 10
    assert proc.returncode == -signal.SIGTERM


def test_system_exit_inside_a_step_keeps_the_done_steps(tmp_path, tiny_model_dir):
    rows = arith_rows(12)
    full = Trainer(base_config(tmp_path / "full", tiny_model_dir, max_steps=4), train_dataset=rows)
    full.train()

    cut = Trainer(base_config(tmp_path / "cut", tiny_model_dir, max_steps=4), train_dataset=rows)
    real = cut.components.loss

    def exits_on_step_3(inp):
        if cut.step == 2:  # inside step 3, after its rollouts were sampled
            sys.exit(3)
        return real(inp)

    cut.components.loss = exits_on_step_3
    res = cut.train()
    assert res.steps == 2 and res.interrupted == "SystemExit(3) during step 3"
    assert res.checkpoint is not None and res.checkpoint.name == "step_0000002"
    again = Trainer(
        base_config(tmp_path / "cut", tiny_model_dir, max_steps=4, resume=True),
        train_dataset=rows,
    )
    again.train()
    a, b = params_of(full.model), params_of(again.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the cut step was repeated exactly


# ---------------------------------------------------------------------------- output folders


def test_a_folder_holding_a_run_is_refused_then_moved_aside(tmp_path, tiny_model_dir):
    rows = arith_rows()
    Trainer(base_config(tmp_path / "run", tiny_model_dir, max_steps=1), train_dataset=rows).train()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as err:
        Trainer(base_config(tmp_path / "run", tiny_model_dir, max_steps=1), train_dataset=rows)
    msg = str(err.value)
    assert str(tmp_path / "run") in msg and "train.resume=true" in msg
    assert "train.overwrite=true" in msg
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # nothing touched
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=2, overwrite=True)
    Trainer(cfg, train_dataset=rows).train()
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and (old[0] / "metrics.jsonl").read_text() == before
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="cannot be combined with train.resume"):
        Trainer(
            base_config(tmp_path / "run", tiny_model_dir, resume=True, overwrite=True),
            train_dataset=rows,
        )


HOLD_LOCK = """
import sys, time
from pathlib import Path
from grouprl.training.rundir import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_refused_and_a_dead_holder_releases(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        tr = Trainer(
            base_config(run, tiny_model_dir, max_steps=1, resume=True), train_dataset=arith_rows()
        )
        with pytest.raises(ConfigError, match=f"another grouprl run is using .*pid {holder.pid}"):
            tr.train()
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # kill -9: no clean-up runs in the holder
        holder.wait()
    assert (run / LOCK_NAME).exists()  # the file stays, the kernel dropped the lock
    res = tr.train()
    assert res.steps == 1
    with RunLock(run):  # released at the end of train()
        pass


# ---------------------------------------------------------------------------- checkpoints


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _run_with_checkpoints(tmp_path, tiny_model_dir, **train) -> Path:
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=4, save_every=2, **train)
    Trainer(cfg, train_dataset=arith_rows()).train()
    return tmp_path / "run"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("victim", ["rng.pt", "optimizer.pt", "scheduler.pt"])
def test_a_crafted_pickle_is_never_run(tmp_path, tiny_model_dir, victim, caplog):
    run = _run_with_checkpoints(tmp_path, tiny_model_dir)
    marker = tmp_path / "pwned"
    newest = list_checkpoints(run)[-1]
    with open(newest / victim, "wb") as f:
        pickle.dump({"state": _Marker(str(marker))}, f)
    cfg = base_config(run, tiny_model_dir, max_steps=5, save_every=2, resume=True)
    tr = Trainer(cfg, train_dataset=arith_rows())
    with caplog.at_level(logging.INFO, logger="grouprl"):
        tr.train()
    assert not marker.exists()
    assert f"{newest / victim}: unreadable" in caplog.text  # named, then the previous one
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in caplog.text


@pytest.mark.parametrize("damage", ["truncate_weights", "drop_optimizer", "bad_state_json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path, tiny_model_dir, damage, caplog
):
    run = _run_with_checkpoints(tmp_path, tiny_model_dir)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_0000004"
    if damage == "truncate_weights":
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        named = f
    elif damage == "drop_optimizer":
        named = newest / "optimizer.pt"
        named.unlink()
    else:
        named = newest / "trainer_state.json"
        named.write_text("{not json")
    cfg = base_config(run, tiny_model_dir, max_steps=5, save_every=2, resume=True)
    tr = Trainer(cfg, train_dataset=arith_rows())
    with caplog.at_level(logging.INFO, logger="grouprl"):
        tr.train()
    assert str(named) in caplog.text
    assert "resumed from" in caplog.text and "at step 2" in caplog.text


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir):
    run = _run_with_checkpoints(tmp_path, tiny_model_dir)
    for ckpt in list_checkpoints(run):
        (ckpt / "rng.pt").unlink()
    cfg = base_config(run, tiny_model_dir, max_steps=5, resume=True)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*rng.pt: missing"):
        Trainer(cfg, train_dataset=arith_rows()).train()


def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path, tiny_model_dir, caplog):
    run = _run_with_checkpoints(tmp_path, tiny_model_dir)
    cfg = base_config(run, tiny_model_dir, max_steps=6, save_every=2, resume=True)
    cfg["train"]["learning_rate"] = 3e-3
    tr = Trainer(cfg, train_dataset=arith_rows())
    with caplog.at_level(logging.INFO, logger="grouprl"):
        tr._maybe_resume()
    assert "at step 4" in caplog.text and "data cursor" in caplog.text
    assert "train.learning_rate 0.01 -> 0.003" in caplog.text
    assert "train.max_steps 4 -> 6" in caplog.text
    assert [g["lr"] for g in tr.learner.optimizer.param_groups] == [3e-3]
    assert tr.learner.scheduler.get_last_lr() == [3e-3]


@pytest.mark.parametrize(
    "key, value",
    [("train.seed", 7), ("model.name_or_path", "elsewhere")],
)
def test_resume_refuses_a_change_that_makes_another_run(tmp_path, tiny_model_dir, key, value):
    run = _run_with_checkpoints(tmp_path, tiny_model_dir)
    cfg = base_config(run, tiny_model_dir, max_steps=6, resume=True)
    section, field = key.split(".")
    cfg[section][field] = value
    from grouprl.config import ModelConfig
    from grouprl.models.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    tr = Trainer(cfg, model=model, tokenizer=tok, train_dataset=arith_rows())
    with pytest.raises(ConfigError, match=f"^{key}: train.resume=true continues"):
        tr._maybe_resume()


# ---------------------------------------------------------------------------- start-up values


def test_more_prompts_per_step_than_data_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "run", tiny_model_dir, prompts_per_step=30)
    with pytest.raises(ConfigError, match=r"^train.prompts_per_step: 30 .* 24 rows"):
        Trainer(cfg, train_dataset=arith_rows(24))
    cfg["data"] = {"allow_repeats": True}
    Trainer(cfg, train_dataset=arith_rows(24))


def test_remote_code_stays_off_unless_asked(tiny_model_dir, monkeypatch):
    import transformers

    import grouprl.models.loading as loading
    from grouprl.config import ModelConfig

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loading.load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    loading.load_model_and_tokenizer(
        ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=True)
    )
    assert seen == [False, True]


def test_the_demo_refuses_an_earlier_demo_run_before_its_sft(tmp_path):
    from grouprl.demo import DemoSettings, run_demo

    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "metrics.jsonl").write_text("{}\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="already holds a demo run; pass --overwrite"):
        run_demo(tmp_path, DemoSettings(sft_steps=1, grpo_steps=1), progress=False)
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------- rewards


def test_a_reward_that_keeps_failing_stops_the_run_with_a_checkpoint(tmp_path, tiny_model_dir):
    from grouprl.rewards import RewardFailureError

    def judge(prompts, completions, **kw):
        raise ConnectionError("judge unreachable")

    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=10, reward_failure_window=3)
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=["exact_match", judge])
    with pytest.raises(RewardFailureError) as err:
        tr.train()
    msg = str(err.value)
    assert "reward 'judge' failed on 100% of its samples over its last 3 calls" in msg
    assert "ConnectionError: judge unreachable" in msg
    assert "Stopped after step 3" in msg and "train.reward_failure_limit" in msg
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_0000003"
    with RunLock(tmp_path / "run"):  # the lock was released on the way out
        pass


def test_a_sleeping_reward_is_cut_at_its_deadline_and_the_run_goes_on(tmp_path, tiny_model_dir):
    calls = []

    def sleepy(prompts, completions, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second call hangs
            time.sleep(60)
        return [1.0 for _ in completions]

    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=3)
    t0 = time.monotonic()
    res = Trainer(
        cfg,
        train_dataset=arith_rows(),
        reward_funcs=["exact_match", {"fn": sleepy, "timeout": 1.0}],
    ).train()
    assert time.monotonic() - t0 < 30
    assert res.steps == 3
    assert [h["rewards/sleepy/timeouts"] for h in res.history] == [0.0, 1.0, 0.0]
    assert [h["rewards/sleepy/nan_count"] for h in res.history] == [0.0, 12.0, 0.0]


def test_reward_timeouts_of_every_refill_round_are_counted():
    from grouprl.training.collect import _merge_reward_metrics

    rounds = [
        {"rewards/judge/timeouts": 1.0, "rewards/judge/seconds": 2.0, "ttrl/majority_ratio": 0.5},
        {"rewards/judge/timeouts": 0.0, "rewards/judge/seconds": 1.5, "ttrl/majority_ratio": 0.7},
    ]
    assert _merge_reward_metrics(rounds) == {
        "rewards/judge/timeouts": 1.0,
        "rewards/judge/seconds": 3.5,
        "ttrl/majority_ratio": 0.7,
    }
