"""Seeded prompt sampler with a resumable cursor (shuffled epochs): the `uniform` sampler.

Samplers that learn from scores build on it (data/samplers.py, `data.sampler`)."""

from __future__ import annotations

from typing import Any

import torch


class PromptSampler:
    """Yields dataset indices in shuffled epochs; `state_dict` is the data cursor.

    The permutation of epoch e is drawn from its own generator seeded by (seed, e), so a
    resumed run continues with exactly the indices an uninterrupted run would have used.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        # seed and shuffle are the run's (train.seed, data.shuffle): positional-or-keyword,
        # so the registry's parameter tables list only a sampler's own keyword-only ones
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

    @property
    def progress(self) -> float:
        """Epochs of the data drawn so far (a fraction)."""
        return self.epoch + self.pos / max(self.size, 1)

    def update(self, indices: list[int], rewards_BG: Any) -> None:
        """Scores of the prompts just drawn; the uniform sampler does not use them."""

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if type(self) is PromptSampler and state.get("sampler", "uniform") != "uniform":
            raise ValueError(
                f"the checkpoint's prompt sampler is {state['sampler']!r}, data.sampler is "
                "'uniform'; resume with the same data.sampler"
            )
        if state["size"] != self.size:
            raise ValueError(
                f"data cursor was saved for {state['size']} prompts, the dataset has {self.size}"
            )
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)
