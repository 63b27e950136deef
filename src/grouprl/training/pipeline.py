"""`train.async`: whether the next step's batch is sampled while this step trains.

`off`: collect, then plan and update, in order (the synchronous loop). `one_step`, step k:

    take batch_k: collected during step k-1 (sampled with the weights θ_k-1), or now
    start collecting batch_k+1 in a background thread, sampling with the engine's
        weights θ_k (not for the first step after a checkpoint, nor past max_steps)
    plan and update on batch_k: θ_k -> θ_k+1
    wait for that collection (the engine is idle again), publish θ_k+1 to the engine

so a batch is at most one update old. Its tokens carry the sampler's own log-probs, and
`rollout.mismatch_correction` (tis by default) weighs π_θ(y_t) / π_sampler(y_t) per token:
the decoupled form of PPO with a stale behaviour policy (AReaL, arXiv 2505.24298; the
one-step-off pipeline of verl). The engine must declare `overlaps_training`
(rollout/base.py); the HF engine then samples from a copy of the policy.

Exactness: every collection in this mode draws its randomness from a seed of
(train.seed, step, call, rank) (`SamplingParams.seed`), never from the global RNG the
training thread shares, so a run does not depend on the threads' timing. The first step
after a checkpoint (train.save_every) is never prefetched: it samples from the saved
weights, so a run resumed from that checkpoint makes exactly the steps of one that was not
interrupted (tests/test_async.py). A run that stops between checkpoints (a signal, a failing
reward) drops its prefetched batch and saves the data cursor from before it: those prompts
are drawn again after the resume, from the saved weights. With several processes the
collection's all-gathers use a process group of their own, so they never interleave with
the update's gradient all-reduce.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from grouprl.training.collect import Collector, ScoredBatch

MODES = ("off", "one_step")


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s collection (a 62-bit mix: distinct steps, distinct seeds)."""
    return (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) % (2**62)


@dataclass
class _Pending:
    step: int  # the step this batch is for
    cursor: dict[str, Any]  # the data cursor before its prompts were drawn
    future: Future[tuple[ScoredBatch, dict[str, float], float]]


class Pipeline:
    """Runs the collections of a `train.async` mode (see the module docstring)."""

    def __init__(self, collector: Collector, *, mode: str, seed: int) -> None:
        if mode not in MODES:
            raise ValueError(f"train.async: {mode!r} is not one of {', '.join(MODES)}")
        self.collector, self.mode, self.seed = collector, mode, seed
        self.overlaps = mode == "one_step"
        self._pool: ThreadPoolExecutor | None = None
        self._pending: _Pending | None = None

    def seed_of(self, step: int) -> int | None:
        """The sampling seed of a step's collection; None (the global RNG) when off."""
        return step_seed(self.seed, step) if self.overlaps else None

    def _collect(self, B: int, step: int) -> tuple[ScoredBatch, dict[str, float], float]:
        t0 = time.perf_counter()
        batch, metrics = self.collector.collect(B, seed=self.seed_of(step), step=step)
        return batch, metrics, time.perf_counter() - t0

    def collect_now(self, B: int, step: int) -> tuple[ScoredBatch, dict[str, float]]:
        """Step `step`'s batch, collected in this thread."""
        self.collector.begin()
        batch, metrics, _ = self._collect(B, step)
        return batch, metrics

    def start(self, B: int, step: int) -> None:
        """Begin collecting step `step`'s batch in the background."""
        assert self.overlaps and self._pending is None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grouprl-collect")
        cursor = self.collector.state_dict()
        self.collector.begin()  # here, in the training thread: no race with the update
        self._pending = _Pending(step, cursor, self._pool.submit(self._collect, B, step))

    def take(self, step: int) -> tuple[ScoredBatch, dict[str, float], float] | None:
        """The batch collected in the background for `step` (re-raising what the collection
        raised), with the seconds it took; None when there is none."""
        pending = self._pending
        if pending is None or pending.step != step:
            return None
        self._pending = None
        return pending.future.result()

    @property
    def holds_next(self) -> bool:
        """Whether a batch for a later step is being collected or held (after a step: whether
        that step sampled ahead; the last step of a run does not)."""
        return self._pending is not None

    def wait(self) -> float:
        """Wait for the background collection to finish (its errors wait for `take`);
        returns the seconds waited."""
        if self._pending is None:
            return 0.0
        t0 = time.perf_counter()
        self._pending.future.exception()  # blocks until done; never raises here
        return time.perf_counter() - t0

    def cursor(self) -> dict[str, Any]:
        """The data cursor a checkpoint saves: from before a batch collected ahead, so a
        resume draws its prompts again."""
        if self._pending is not None:
            return self._pending.cursor
        return self.collector.state_dict()

    def drop(self) -> None:
        """Forget a batch collected ahead (after waiting for it) and rewind the data cursor."""
        if self._pending is None:
            return
        self.wait()
        self.collector.load_state_dict(self._pending.cursor)
        self._pending = None

    def close(self) -> None:
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
