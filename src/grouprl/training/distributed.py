"""Several processes launched by `torchrun` or `accelerate launch` (torch.distributed; gloo
on CPU, NCCL on GPU): the process group and the few collectives the loop needs. How the
weights are laid out over the processes is training/parallel.py; docs/scaling.md.

Design: "gather, then plan everywhere". Every rank samples and scores its own share of the
step's prompt groups; the scored groups are all-gathered, so every rank holds the same
global batch and runs the (CPU, deterministic) planning stage on it: advantages, quantiles,
top-k selections and refill decisions are those of one process, and all ranks agree on
them, so no collective waits on a rank that decided differently. Each rank then trains on
its own groups' rows with the global batch's normalizers; gradients are summed over ranks
before clipping and the optimizer step, so N ranks make the update one process makes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job. The single-process default does nothing."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the process group of these collectives (None: the default one)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items (the first n % world ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects; tensors on the CPU)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place: process `src`'s values everywhere."""
        if self.active:
            dist.broadcast(t, src=src, group=self.group)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def split(self) -> Dist:
        """The same ranks over a gloo process group of their own (collective: every rank
        calls it, in the same order), for collectives issued from another thread that must
        never interleave with this group's (train.async's collection, training/pipeline.py).
        Only object gathers go over it, so gloo serves under NCCL too."""
        if not self.active:
            return self
        return Dist(self.rank, self.world, self.local_rank, dist.new_group(backend="gloo"))


def init_distributed(strategy: str, *, timeout_s: float = 600.0) -> Dist:
    """The process group for `train.strategy` (auto: data parallel when launched by torchrun
    with WORLD_SIZE > 1). gloo on CPU, NCCL when CUDA is available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "single" or world == 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world, local_rank=local_rank)
