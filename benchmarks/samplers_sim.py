"""The prompt samplers on a simulated policy (no model): what each draws, and where the
rollouts go. Prints the two tables of docs/methods.md "Prompt samplers" and `knapsack`.

    python benchmarks/samplers_sim.py [--seeds 0 1 2] [--steps 40]

1. Which prompts a sampler draws: 60 prompts, 1/3 always solved, 1/3 never, 1/3 half the
   time (each rollout a Bernoulli draw); 8 prompts x 8 rollouts per step. Reported per
   sampler, over the seeds (min-max): the share of half-solved prompts among those drawn
   in the second half of the run, and the share of groups with all-equal rewards over the
   whole run.
2. Where the rollouts go: 40 prompts solved 95% of the time and 20 solved 60%; 8 prompts,
   64 rollouts per step; the share of rollouts that land in groups whose rewards differ
   (a non-zero advantage), knapsack vs uniform, per seed.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from grouprl.data.samplers import build_sampler

SAMPLERS = ["uniform", "vas", "vade", "spo_priority", "cures", "hard_mining"]


def draw_loop(name: str, p_true: list[float], steps: int, seed: int, B: int = 8, G: int = 8):
    """(indices drawn per step, all-equal group share, rollouts in groups with signal /
    all rollouts) for one sampler on the simulated policy."""
    rng = np.random.default_rng(seed)
    s = build_sampler({"name": name}, len(p_true), seed=seed, shuffle=True)
    drawn, zero, groups, useful, total = [], 0, 0, 0, 0
    for _ in range(steps):
        idx = s.next(B)
        counts = s.budget(idx, G) if hasattr(s, "budget") else [G] * B
        r = torch.full((B, max(counts)), float("nan"))
        for b, (i, n) in enumerate(zip(idx, counts, strict=True)):
            r[b, :n] = torch.tensor([float(rng.random() < p_true[i]) for _ in range(n)])
            signal = bool(r[b, :n].max() != r[b, :n].min())
            zero += int(not signal)
            useful += n * int(signal)
        groups += B
        total += sum(counts)
        s.update(idx, r)
        drawn.append(idx)
    return drawn, zero / groups, useful / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    p_true = [1.0, 0.0, 0.5] * 20
    print("| sampler | half-solved prompts drawn (second half) | all-equal groups (whole run) |")
    print("|---|---|---|")
    for name in SAMPLERS:
        mids, zeros = [], []
        for seed in args.seeds:
            drawn, z, _ = draw_loop(name, p_true, args.steps, seed)
            late = [i for d in drawn[args.steps // 2 :] for i in d]
            mids.append(sum(p_true[i] == 0.5 for i in late) / len(late))
            zeros.append(z)
        print(f"| `{name}` | {min(mids):.2f}-{max(mids):.2f} | {min(zeros):.2f}-{max(zeros):.2f} |")

    p_mix = [0.95] * 40 + [0.6] * 20
    print()
    print("| seed | rollouts in groups with signal: uniform | knapsack | ratio |")
    print("|---|---|---|---|")
    for seed in args.seeds:
        u = draw_loop("uniform", p_mix, args.steps, seed)[2]
        k = draw_loop("knapsack", p_mix, args.steps, seed)[2]
        print(f"| {seed} | {u:.3f} | {k:.3f} | {k / u:.2f} |")


if __name__ == "__main__":
    main()
