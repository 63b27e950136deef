"""Reward deadlines: every reward call runs in a worker process that is killed at its deadline
or replaced when it dies; failures become NaN and are counted, and a reward that fails too
often over a window stops the run with a message that names it."""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from grouprl.rewards import RewardFailureError, RewardSet, RewardSpec, math_accuracy

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="reward workers need os.fork")


def ones(prompts, completions, **kw):
    return [1.0] * len(completions)


def sleepy(prompts, completions, **kw):
    """Sleeps a minute when the first completion says so, else scores 2.0."""
    if completions[0] == "slow":
        time.sleep(60)
    return [2.0] * len(completions)


def spec(fn, timeout: float | None = 5.0, **kw) -> RewardSpec:
    return RewardSpec(fn=fn, timeout=timeout, **kw)


def score(rs: RewardSet, completions: list[str], **columns):
    return rs(["q"] * len(completions), completions, columns)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_until(cond, limit: float = 10.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# ---------------------------------------------------------------- deadlines and crashes


def test_a_sleeping_reward_is_cut_at_its_deadline_and_the_next_call_works():
    with RewardSet(
        [
            spec(ones),
            spec(sleepy, timeout=0.5),
            spec(lambda prompts, completions, **kw: [3.0] * len(completions)),
        ]
    ) as rs:
        t0 = time.monotonic()
        res = score(rs, ["slow", "b"])
        assert time.monotonic() - t0 < 3.0
        assert res.rewards_NK[:, 0].tolist() == [1.0, 1.0]
        assert torch.isnan(res.rewards_NK[:, 1]).all()
        assert res.rewards_NK[:, 2].tolist() == [3.0, 3.0]  # the function after it still ran
        assert res.timeouts["sleepy"] == 1 and res.errors["sleepy"] == 1
        assert res.crashes["sleepy"] == 0 and res.timeouts["ones"] == 0
        assert res.metrics["rewards/sleepy/timeouts"] == 1.0
        assert res.metrics["rewards/ones/timeouts"] == 0.0
        assert 0.5 <= res.metrics["rewards/sleepy/seconds"] < 3.0
        again = score(rs, ["fast", "b"])  # a fresh worker
        assert again.rewards_NK.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
        assert again.timeouts["sleepy"] == 0 and again.errors["sleepy"] == 0
        assert rs._worker is not None and rs._worker.starts == 2


@pytest.mark.parametrize(
    "how,reason",
    [
        ("sys.exit()", "exit code 0"),
        ("sys.exit(3)", "exit code 3"),
        ("os._exit(1)", "exit code 1"),
        # (faulthandler, which pytest enables, would print the stack of the segfault)
        ("faulthandler.disable(); os.kill(os.getpid(), signal.SIGSEGV)", "killed by SIGSEGV"),
        ("raise MemoryError('out of memory')", "MemoryError"),
    ],
)
def test_a_reward_that_kills_its_worker_gives_nan_and_the_next_call_works(how, reason, caplog):
    code = compile(how, "<reward>", "exec")

    def dies(prompts, completions, **kw):
        if completions[0] == "die":
            exec(code, {"os": os, "sys": sys, "signal": signal, "faulthandler": faulthandler})
        return [5.0] * len(completions)

    with RewardSet([spec(ones), spec(dies)]) as rs:
        with caplog.at_level(logging.WARNING, logger="grouprl.rewards"):
            res = score(rs, ["die", "x"])
        assert torch.isnan(res.rewards_NK[:, 1]).all() and res.rewards_NK[:, 0].tolist() == [1, 1]
        assert res.crashes["dies"] == 1 and res.errors["dies"] == 1 and res.timeouts["dies"] == 0
        assert res.metrics["rewards/dies/crashes"] == 1.0
        assert reason in caplog.text and "crashed its worker" in caplog.text
        again = score(rs, ["live", "x"])
        assert again.rewards_NK[:, 1].tolist() == [5.0, 5.0] and again.errors["dies"] == 0


def test_a_worker_killed_between_calls_is_replaced_silently():
    with RewardSet([spec(ones)]) as rs:
        score(rs, ["a"])
        pid = rs._worker.pid
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(pid))
        res = score(rs, ["a"])
        assert res.rewards_NK.tolist() == [[1.0]] and res.crashes["ones"] == 0


def test_lambdas_closures_and_state_work_through_the_worker():
    bonus = 0.5
    calls = {"n": 0}

    def counter(prompts, completions, **kw):  # state lives in the worker, between calls
        calls["n"] += 1
        return [float(calls["n"])] * len(completions)

    specs = [
        spec(lambda prompts, completions, **kw: [len(c) + bonus for c in completions]),
        spec(counter),
    ]
    with RewardSet(specs) as rs:
        assert rs.names == ["<lambda>", "counter"]
        first, second = score(rs, ["ab", "abc"]), score(rs, ["ab", "abc"])
    assert first.rewards_NK[:, 0].tolist() == [2.5, 3.5]
    assert first.rewards_NK[0, 1] == 1.0 and second.rewards_NK[0, 1] == 2.0
    assert calls["n"] == 0  # the calls ran in the worker, not here


def test_an_exception_gives_nan_an_error_count_and_one_traceback(caplog):
    def boom(prompts, completions, **kw):
        raise RuntimeError("judge offline")

    with RewardSet([spec(ones), spec(boom)]) as rs:
        with caplog.at_level(logging.WARNING, logger="grouprl.rewards"):
            res, res2 = score(rs, ["a", "b"]), score(rs, ["a", "b"])
    assert torch.isnan(res.rewards_NK[:, 1]).all() and res.rewards_NK[:, 0].tolist() == [1, 1]
    assert res.errors == {"ones": 0, "boom": 1} and res2.errors["boom"] == 1
    assert res.timeouts["boom"] == 0 and res.crashes["boom"] == 0
    logged = [r.getMessage() for r in caplog.records if "'boom'" in r.getMessage()]
    assert len(logged) == 2 and all("RuntimeError: judge offline" in m for m in logged)
    assert "Traceback" in logged[0] and 'raise RuntimeError("judge offline")' in logged[0]
    assert "Traceback" not in logged[1]


class Reporter:
    """A stateful reward object reporting metrics of its last call (like majority_vote)."""

    def __init__(self) -> None:
        self.calls = 0
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts, completions, **kw):
        self.calls += 1
        self.last_metrics = {"test/calls": self.calls, "test/n": len(completions)}
        return [0.0] * len(completions)


def test_last_metrics_come_back_from_the_worker():
    reporter = Reporter()
    with RewardSet([spec(reporter, alias="reporter")]) as rs:
        score(rs, ["a"])
        res = score(rs, ["a", "b", "c"])
    assert res.metrics["test/calls"] == 2.0 and res.metrics["test/n"] == 3.0
    assert reporter.calls == 0  # its state lives in the worker


def test_majority_vote_metrics_come_back_from_the_worker():
    rs = RewardSet(["majority_vote"])
    comps = [r"\boxed{4}", r"\boxed{4}", r"\boxed{5}", "no answer"]
    try:
        res = rs(["p"] * 4, comps, {"answer": ["4"] * 4})
    finally:
        rs.close()
    assert res.rewards_NK[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert res.metrics["ttrl/majority_ratio"] == 0.5
    assert res.metrics["ttrl/label_accuracy"] == 1.0


# ---------------------------------------------------------------- in-process, close, signals


def where(prompts, completions, **kw):
    return [float(os.getpid())] * len(completions)


@pytest.mark.parametrize("timeout", [0, None])
def test_timeout_0_or_none_runs_in_process(timeout):
    with RewardSet([spec(where, timeout=timeout)]) as rs:
        res = score(rs, ["a"])
        assert rs._worker is None
    assert res.rewards_NK[0, 0].item() == float(os.getpid())


def test_a_deadline_runs_in_another_process_that_ignores_sigint():
    def sigint(prompts, completions, **kw):
        return [float(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)] * len(completions)

    def cuda(prompts, completions, **kw):
        return [float(os.environ.get("CUDA_VISIBLE_DEVICES") == "")] * len(completions)

    with RewardSet([spec(where), spec(sigint), spec(cuda)]) as rs:
        res = score(rs, ["a"])
    assert res.rewards_NK[0].tolist()[1:] == [1.0, 1.0]
    assert res.rewards_NK[0, 0].item() != float(os.getpid())


def test_close_is_idempotent_and_stops_the_worker():
    rs = RewardSet([spec(ones)])
    rs.close()  # before any worker: nothing to stop
    score(rs, ["a"])
    pid = rs._worker.pid
    rs.close()
    rs.close()
    assert rs._worker is None and wait_until(lambda: not pid_alive(pid))
    assert score(rs, ["a"]).rewards_NK.tolist() == [[1.0]]  # a later call starts a new one
    rs.close()


def test_ctrl_c_while_waiting_kills_the_worker_and_the_next_call_works():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    with RewardSet([spec(sleepy, timeout=30)]) as rs:
        score(rs, ["fast"])
        pid = rs._worker.pid
        timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            score(rs, ["slow"])
        assert time.monotonic() - t0 < 5.0
        assert wait_until(lambda: not pid_alive(pid))  # its late reply can never be read
        assert score(rs, ["fast"]).rewards_NK.tolist() == [[2.0]]


def test_a_timeout_also_kills_the_processes_the_reward_started(tmp_path):
    pid_file = tmp_path / "child.pid"

    def spawns(prompts, completions, **kw):
        child = subprocess.Popen(["sleep", "60"])
        pid_file.write_text(str(child.pid))
        time.sleep(60)
        return [0.0] * len(completions)

    with RewardSet([spec(spawns, timeout=2.0)]) as rs:
        res = score(rs, ["a"])
    assert res.timeouts["spawns"] == 1
    pid = int(pid_file.read_text())
    assert wait_until(lambda: not pid_alive(pid), limit=5.0)


WORKER_OUTLIVES = """
import os, sys, time
from grouprl.rewards import RewardSet, RewardSpec

def sleeper(prompts, completions, **kw):
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(60)
    return [0.0] * len(completions)

print("started", flush=True)
RewardSet([RewardSpec(fn=sleeper, timeout=120)])(["q"], ["a"], {})
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_the_worker_dies_with_its_parent_and_releases_its_output(tmp_path):
    pid_file = tmp_path / "worker.pid"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(WORKER_OUTLIVES))
    parent = subprocess.Popen(
        [sys.executable, str(script), str(pid_file)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text(), limit=60)
        worker = int(pid_file.read_text())
        parent.kill()  # SIGKILL: no atexit hook, no finalizer runs
        t0 = time.monotonic()
        parent.communicate(timeout=10)  # EOF: the worker no longer holds the pipe
        assert time.monotonic() - t0 < 5.0
        assert wait_until(lambda: not pid_alive(worker), limit=5.0)
    finally:
        parent.kill()


def test_math_accuracy_through_the_worker_equals_in_process():
    comps = [r"so \boxed{\frac{1}{2}}", "the answer is 42", r"\boxed{41}, then 42", "$x^2+1$"]
    golds = ["0.5", "42", "42", "x^2+1"]
    expected = math_accuracy(["q"] * 4, comps, answer=golds)
    with RewardSet(["math_accuracy"]) as rs:
        res = rs(["q"] * 4, comps, {"answer": golds})
        # called off the main thread here, it still runs in the worker's main thread, where
        # math-verify's signal-based timeouts work
        out = []
        t = threading.Thread(target=lambda: out.append(rs(["q"] * 4, comps, {"answer": golds})))
        t.start()
        t.join()
    assert expected[:3] == [1.0, 1.0, 0.0]
    assert res.rewards_NK[:, 0].tolist() == expected
    assert out[0].rewards_NK[:, 0].tolist() == expected


def test_an_unpicklable_column_is_an_error_not_a_crash(caplog):
    with RewardSet([spec(ones), spec(where, timeout=0)]) as rs:
        with caplog.at_level(logging.WARNING, logger="grouprl.rewards"):
            res = score(rs, ["a"], handle=[threading.Lock()])
    assert torch.isnan(res.rewards_NK[:, 0]).all() and res.errors["ones"] == 1
    assert "cannot be sent to the reward worker" in caplog.text
    assert res.rewards_NK[0, 1].item() == float(os.getpid())  # in-process needs no pickling


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("bad", [-1, "soon", True, math.inf, math.nan])
def test_timeout_must_be_seconds(bad):
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        RewardSpec(name="format", timeout=bad)


def test_timeout_from_config_and_default():
    rs = RewardSet(
        [
            "format",
            {"name": "exact_match", "timeout": 2},
            {"name": "math_accuracy", "timeout": None},
        ]
    )
    assert [s.timeout for s in rs.specs] == [30.0, 2.0, None]


# ---------------------------------------------------------------- failure share over a window


def test_a_reward_failing_on_every_call_trips_the_limit_after_a_full_window(caplog):
    def broken(prompts, completions, **kw):
        raise ConnectionError("judge at http://judge:8000 refused")

    with RewardSet([spec(ones), spec(broken)], failure_limit=0.5, failure_window=5) as rs:
        with caplog.at_level(logging.WARNING, logger="grouprl.rewards"):
            for _ in range(4):
                score(rs, ["a", "b"])
                assert rs.check_health() is None  # a window not yet full never trips
            rs.raise_if_unhealthy()
            score(rs, ["a", "b"])
        err = rs.check_health()
        assert isinstance(err, RewardFailureError)
        assert (err.name, err.share, err.window, err.limit) == ("broken", 1.0, 5, 0.5)
        msg = str(err)
        assert "'broken'" in msg and "100%" in msg and "last 5 calls" in msg and "50%" in msg
        assert "ConnectionError: judge at http://judge:8000 refused" in msg
        with pytest.raises(RewardFailureError, match="reward 'broken' failed on 100%"):
            rs.raise_if_unhealthy()
        assert rs.failure_share("ones") == 0.0 and rs.failure_share("broken") == 1.0


def test_a_reward_failing_once_in_20_calls_does_not_trip():
    calls = {"n": 0}

    def flaky(prompts, completions, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("once")
        return [1.0] * len(completions)

    with RewardSet([spec(flaky)]) as rs:  # the defaults: limit 0.5, window 20
        for _ in range(20):
            score(rs, ["a", "b"])
        assert rs.failure_share("flaky") == pytest.approx(1 / 20)
        assert rs.check_health() is None
        rs.raise_if_unhealthy()


def test_none_is_not_a_failure_but_timeouts_and_crashes_are():
    def unscorable(prompts, completions, **kw):
        return [None] * len(completions)

    def hangs_or_dies(prompts, completions, **kw):
        if completions[0] == "hang":
            time.sleep(60)
        os._exit(1)

    rs = RewardSet(
        [spec(unscorable), spec(hangs_or_dies, timeout=0.3)], failure_limit=0.6, failure_window=3
    )
    with rs:
        score(rs, ["hang", "b"])  # timeout
        score(rs, ["die", "b"])  # crash
        score(rs, ["die", "b"])  # crash
    assert rs.failure_share("unscorable") == 0.0
    assert rs.failure_share("hangs_or_dies") == 1.0
    err = rs.check_health()
    assert err is not None and err.name == "hangs_or_dies" and "exit code 1" in err.last_error


def test_the_share_counts_samples_and_configure_health_restarts_the_window():
    def fails_on_big(prompts, completions, **kw):
        if len(completions) > 2:
            raise ValueError("too many")
        return [1.0] * len(completions)

    with RewardSet([spec(fails_on_big)], failure_limit=0.5, failure_window=2) as rs:
        score(rs, ["a"] * 6)  # 6 failed samples
        score(rs, ["a"] * 2)  # 2 good ones: 6 / 8 failed
        assert rs.failure_share("fails_on_big") == 0.75 and rs.check_health() is not None
        rs.configure_health(limit=0.8, window=2)
        assert rs.failure_share("fails_on_big") is None and rs.check_health() is None
        score(rs, ["a"] * 6)
        score(rs, ["a"] * 2)
        assert rs.check_health() is None  # 0.75 <= 0.8
        with pytest.raises(ValueError, match="failure_window"):
            rs.configure_health(limit=0.5, window=0)
        with pytest.raises(ValueError, match="failure_limit"):
            rs.configure_health(limit=1.5, window=3)


def test_the_stop_message_quotes_a_short_last_error():
    def verbose(prompts, completions, **kw):
        raise ValueError("cannot parse " + completions[0])

    with RewardSet([spec(verbose, timeout=0)], failure_limit=0.0, failure_window=1) as rs:
        score(rs, ["x" * 10_000])
    msg = str(rs.check_health())
    assert "ValueError: cannot parse xxx" in msg and msg.endswith("...") and len(msg) < 500
