"""A forked worker process that runs reward functions under a deadline and can be killed.

Why a process: a thread cannot be stopped, so a reward that sleeps, loops or waits on a dead
server would hold the training step forever; a process is killed (SIGKILL) at the deadline
and a fresh one is forked for the next call. Its calls also run in a main thread, where
math-verify's own timeouts work (they use SIGALRM, which Python allows only there).

Why fork: the child inherits the reward functions (lambdas, closures, objects of a user's
reward file), so they are never pickled; only each batch's keyword arguments go to the child
and each `Outcome` comes back, pickled, over a pipe. The child persists between calls, so a
function's state (a counter, a cache) lives as long as its worker, and is lost when a
timeout or a crash replaces the worker.

In the child: SIGINT is ignored (Ctrl-C is for the trainer, which stops after the step) and
SIGTERM and SIGHUP get their default action back (the trainer's handlers were inherited);
CUDA is hidden (a forked child cannot use its parent's CUDA context); torch runs one thread,
as in PyTorch's forked DataLoader workers (torch/utils/data/_utils/worker.py); it leads its
own process group, so a kill also reaches the processes a reward started; and it dies with
its parent (PR_SET_PDEATHSIG, prctl(2), on Linux; elsewhere it notices within a second), so
it never holds the trainer's output pipes open. Forking a process that runs other threads is
what the DataLoader does too; the child runs only reward code.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.connection as mpc
import multiprocessing.util  # noqa: F401  (its exit hook registers first, so ours runs first)
import os
import pickle
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from grouprl.rewards.outcome import Outcome, call_reward

__all__ = ["RewardWorker", "fork_available"]

_POLL_S = 1.0  # how often an idle child checks that its parent still lives
_JOIN_S = 5.0  # how long to wait for a killed child to be reaped
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def fork_available() -> bool:
    """Whether this platform can fork (not Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


class _Child:
    """The running worker process and the parent's end of its pipe (None when none runs)."""

    def __init__(self) -> None:
        self.proc: Any = None  # multiprocessing.Process
        self.conn: Any = None  # multiprocessing.connection.Connection
        self.owner = os.getpid()

    def stop(self) -> None:
        """Kill the worker and every process in its group, and reap it; idempotent."""
        if os.getpid() != self.owner:
            # A forked copy of this object (a finalizer run by garbage collection inside
            # some worker) must not kill the workers of its parent.
            return
        proc, conn = self.proc, self.conn
        self.proc = self.conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()  # in case it had not made its own group yet
        proc.join(_JOIN_S)
        with contextlib.suppress(ValueError):
            proc.close()


class RewardWorker:
    """Runs ``fns[k](**kwargs)`` in a forked child, one call at a time, each under a deadline.

    The child is forked at the first `run` (and again after a timeout or a crash); the
    functions are those given here, inherited by the child. A batch's kwargs are sent once
    and reused by the calls of the other functions on the same batch (the same dict).
    """

    def __init__(self, fns: Sequence[Callable[..., Any]]) -> None:
        if not fork_available():
            raise RuntimeError("reward deadlines need os.fork, which this platform lacks")
        self._fns = list(fns)
        self._child = _Child()
        self._sent: dict[str, Any] | None = None  # the kwargs the running child holds
        self._lock = threading.Lock()
        self._closed = False
        self._at_exit = False
        self.starts = 0  # how many worker processes were forked
        # Garbage collection stops the child too; at exit the atexit hook (run before
        # multiprocessing's, which would wait for the child) does.
        self._finalizer = weakref.finalize(self, self._child.stop)
        self._finalizer.atexit = False

    @property
    def pid(self) -> int | None:
        """The running child's process id, or None when none runs."""
        return None if self._child.proc is None else self._child.proc.pid

    def run(self, k: int, kwargs: dict[str, Any], n: int, timeout: float) -> Outcome:
        """``fns[k](**kwargs)`` on a batch of `n`, or a timeout/crash Outcome after `timeout` s."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this reward worker is closed")
            try:
                return self._run(k, kwargs, n, timeout)
            except BaseException:
                # Interrupted between request and reply (Ctrl-C, a signal handler raising):
                # the child's late reply must never be read as the answer to the next call.
                self._child.stop()
                raise

    def close(self) -> None:
        """Stop the child; idempotent. A closed worker refuses further calls."""
        with self._lock:
            self._closed = True
            self._child.stop()
            self._sent = None
            if self._at_exit:
                atexit.unregister(self._child.stop)
                self._at_exit = False

    # ------------------------------------------------------------ parent side

    def _run(self, k: int, kwargs: dict[str, Any], n: int, timeout: float) -> Outcome:
        for _ in range(2):  # a child that died between calls is replaced once
            if self._child.proc is None:
                try:
                    self._start()
                except Exception as e:  # e.g. inside a daemonic process, which may not fork
                    return Outcome(
                        "error",
                        error=f"cannot start the reward worker ({type(e).__name__}: {e}); "
                        "a reward with timeout 0 runs in-process",
                    )
            payload = None if kwargs is self._sent else kwargs
            try:
                data = pickle.dumps((k, n, payload), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                return Outcome(
                    "error",
                    error=f"the batch cannot be sent to the reward worker ({type(e).__name__}: "
                    f"{e}); a reward with timeout 0 runs in-process, without pickling",
                )
            try:
                self._child.conn.send_bytes(data)
            except OSError:  # killed from outside since the last call
                self._child.stop()
                continue
            self._sent = kwargs
            return self._receive(timeout)
        return Outcome("crash", error="the reward worker died as soon as it was started")

    def _receive(self, timeout: float) -> Outcome:
        proc, conn = self._child.proc, self._child.conn
        deadline = time.monotonic() + timeout
        while True:
            # Waits of at most _POLL_S: a signal that reached another thread gets its Python
            # handler run (in this thread) between two waits, so Ctrl-C is never held back.
            left = deadline - time.monotonic()
            ready = mpc.wait([conn, proc.sentinel], max(0.0, min(left, _POLL_S)))
            if ready or left <= _POLL_S:
                break
        if conn in ready:
            try:
                outcome: Outcome = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # it died without replying
                return self._crashed()
            if outcome.status == "crash":  # it exits after such a reply
                self._child.stop()
            return outcome
        if ready:
            return self._crashed()
        self._child.stop()
        return Outcome(
            "timeout", error=f"no result within its {timeout:g} s deadline; the worker was killed"
        )

    def _crashed(self) -> Outcome:
        proc = self._child.proc
        proc.join(_JOIN_S)
        code = proc.exitcode
        self._child.stop()
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        return Outcome("crash", error=f"the reward worker died during the call ({how})")

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(
            target=_serve,
            args=(child_end, parent_end, self._fns, os.getpid()),
            name="grouprl-reward-worker",
            daemon=False,  # a daemonic process may not start processes, and a reward may
        )
        with warnings.catch_warnings():
            # Python 3.12+ warns when a process with threads forks (module docstring).
            warnings.simplefilter("ignore", DeprecationWarning)
            proc.start()
        child_end.close()
        self._child.proc, self._child.conn = proc, parent_end
        self._sent = None
        self.starts += 1
        if not self._at_exit:
            atexit.register(self._child.stop)
            self._at_exit = True


# ---------------------------------------------------------------- child side


def _serve(conn: Any, parent_end: Any, fns: list[Callable[..., Any]], parent_pid: int) -> None:
    """The child's loop: receive (k, n, kwargs or None), run, reply, until the pipe closes."""
    parent_end.close()  # else the child would hold its own pipe open after the parent died
    _detach(parent_pid)
    kwargs: dict[str, Any] | None = None
    while True:
        try:
            if not conn.poll(_POLL_S):
                if os.getppid() != parent_pid:
                    return
                continue
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            k, n, payload = pickle.loads(data)
        except Exception as e:
            kwargs = None
            reply = Outcome(
                "error",
                error=f"the reward worker cannot unpickle the batch: {type(e).__name__}: {e}",
            )
        else:
            if payload is not None:
                kwargs = payload
            if kwargs is None:
                reply = Outcome("error", error="the reward worker holds no batch (see above)")
            else:
                reply = call_reward(fns[k], kwargs, n)
        try:
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            return
        if reply.status == "crash":  # out of memory: a fresh fork starts clean
            return


def _detach(parent_pid: int) -> None:
    """Signals, GPU, threads, process group and parent death of the child (module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    with contextlib.suppress(OSError):
        os.setpgrp()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the hook above was set
        os._exit(0)
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.set_num_threads(1)
