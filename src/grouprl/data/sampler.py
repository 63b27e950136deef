"""Seeded prompt sampler with a resumable cursor (shuffled epochs)."""

from __future__ import annotations

from typing import Any

import torch


class PromptSampler:
    """Yields dataset indices in shuffled epochs; `state_dict` is the data cursor.

    The permutation of epoch e is drawn from its own generator seeded by (seed, e), so a
    resumed run continues with exactly the indices an uninterrupted run would have used.
    """

    def __init__(self, size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.pos >= self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(n - len(out), self.size - self.pos)
            out.extend(self._perm[self.pos : self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise ValueError(
                f"data cursor was saved for {state['size']} prompts, the dataset has {self.size}"
            )
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)
