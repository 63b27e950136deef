"""Collapse diagnostics for label-free (test-time) RL, usable on any run.

SPINE (arXiv 2511.17938) reports that TTRL collapses: the majority-vote reward takes over,
responses shorten and Pass@1 falls. Two signals warn of it:
- the mean completion length fell more than `length_drop` (30%) below its first-step value;
- the majority ratio exceeds `majority_max` (0.95) while the entropy on the selected
  (forking) tokens is under the floor (the entropy band's lower bound when there is one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class CollapseMonitor:
    length_drop: float = 0.3
    majority_max: float = 0.95
    entropy_floor: float | None = None
    start_length: float | None = None

    def check(self, metrics: Mapping[str, float]) -> list[str]:
        """Warnings for this step's metrics (empty when nothing looks like collapse)."""
        out = []
        length = metrics.get("completions/mean_length")
        if length is not None:
            if self.start_length is None:
                self.start_length = float(length)
            elif self.start_length > 0 and length < (1 - self.length_drop) * self.start_length:
                out.append(
                    f"collapse: mean length {length:.1f} is {100 * (1 - length / self.start_length):.0f}% "
                    f"below its start ({self.start_length:.1f})"
                )
        ratio = metrics.get("ttrl/majority_ratio")
        floor = metrics.get("entropy_band/low", self.entropy_floor)
        entropy = metrics.get("forking_tokens/kept_entropy_mean", metrics.get("entropy"))
        if ratio is not None and floor is not None and entropy is not None:
            if ratio > self.majority_max and entropy < floor:
                out.append(
                    f"collapse: majority ratio {ratio:.2f} > {self.majority_max} with selected-token "
                    f"entropy {entropy:.3f} under the floor {floor:.3f}"
                )
        return out

    def state_dict(self) -> dict[str, float | None]:
        return {"start_length": self.start_length}

    def load_state_dict(self, state: Mapping[str, float | None]) -> None:
        self.start_length = state.get("start_length")
