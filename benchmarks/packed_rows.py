"""One group per packed row vs several where they fit: fwd+bwd of a batch with uneven lengths.

Usage:
    python benchmarks/packed_rows.py [--groups 8] [--G 8] [--prompt 64 512]
        [--completion 16 256] [--lengths per_group|independent] [--reps 5]
        [--backend two_part] [--threads 2]

The random Qwen2 of `attention_backends.py` (`bench_model`); per repetition a fresh batch
(seed = repetition): `--groups` prompts of lengths drawn from `--prompt`, each with `--G`
completions of lengths drawn from `--completion`: with `--lengths per_group` (default) each
group first draws its own upper end from that range and its completions below it (a prompt's
completions tend to be alike: short answers to easy prompts), with `independent` every
completion draws from the whole range (then group lengths, sums of G draws, differ little
and rarely fit two to a row). The time of
`completion_logprobs(..., shared_prefix=True).sum().backward()` with `pack_rows=False` (one
group per packed row) and `pack_rows=True` (several where they fit), alternating which runs
first, one warm-up each; the time ratio several / one and the padded-token ratio (R x L of
the two layouts), min / median / max over the repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from attention_backends import bench_model  # this folder's script

from grouprl.models.forward import completion_logprobs
from grouprl.models.packing import pack_groups

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def uneven_batch(
    groups: int,
    G: int,
    prompt: tuple[int, int],
    completion: tuple[int, int],
    seed: int,
    per_group: bool = True,
) -> Batch:
    """Rows of the repeated layout: prompts (left-padded) repeated G times, completions of
    lengths drawn uniformly (right-padded), below a per-group upper end with `per_group`."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = completion
    P_B = torch.randint(prompt[0], prompt[1] + 1, (groups,), generator=g)
    hi_B = (
        torch.randint(lo, hi + 1, (groups,), generator=g)
        if per_group
        else torch.full((groups,), hi)
    )
    u_N = torch.rand(groups * G, generator=g)
    C_N = lo + (u_N * (hi_B.repeat_interleave(G) - lo + 1)).long()
    Pm, Cm = int(P_B.max()), int(C_N.max())
    pid = torch.randint(0, 4000, (groups, Pm), generator=g)
    pmask_BP = (torch.arange(Pm) >= Pm - P_B[:, None]).float()
    pid = (pid * pmask_BP.long()).repeat_interleave(G, 0)
    cid = torch.randint(0, 4000, (groups * G, Cm), generator=g)
    cmask = (torch.arange(Cm) < C_N[:, None]).float()
    return pid, pmask_BP.repeat_interleave(G, 0), cid, cmask


def fwd_bwd(model: torch.nn.Module, batch: Batch, backend: str, pack_rows: bool) -> float:
    model.zero_grad()
    t0 = time.perf_counter()
    lp, _ = completion_logprobs(
        model, *batch, shared_prefix=True, attn_backend=backend, pack_rows=pack_rows
    )
    lp.sum().backward()
    return time.perf_counter() - t0


def padded(batch: Batch, pack_rows: bool) -> tuple[int, int]:
    R, L = pack_groups(*batch, pack_rows=pack_rows).input_ids_RL.shape
    return R, L


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompt", type=int, nargs=2, default=[64, 512])
    ap.add_argument("--completion", type=int, nargs=2, default=[16, 256])
    ap.add_argument("--lengths", default="per_group", choices=["per_group", "independent"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="two_part", choices=["two_part", "sdpa", "flex"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = bench_model()
    print(f"load average {os.getloadavg()[0]:.1f}; backend {args.backend}; {args.lengths}")
    print("| rep | one per row R x L | several R x L | one s | several s | time ratio |")
    print("|---|---|---|---|---|---|")
    t_ratio, tok_ratio = [], []
    for rep in range(args.reps):
        batch = uneven_batch(
            args.groups, args.G, args.prompt, args.completion, rep, args.lengths == "per_group"
        )
        if rep == 0:
            for pack in (False, True):
                fwd_bwd(model, batch, args.backend, pack)  # warm-up
        order = (False, True) if rep % 2 == 0 else (True, False)
        t = {pack: fwd_bwd(model, batch, args.backend, pack) for pack in order}
        (R1, L1), (R2, L2) = padded(batch, False), padded(batch, True)
        t_ratio.append(t[True] / t[False])
        tok_ratio.append(R2 * L2 / (R1 * L1))
        print(
            f"| {rep} | {R1} x {L1} | {R2} x {L2} | {t[False]:.2f} | {t[True]:.2f} "
            f"| {t_ratio[-1]:.2f} |",
            flush=True,
        )
    print(f"time ratio several / one (min / median / max): {spread(t_ratio)}")
    print(f"padded-token ratio several / one (min / median / max): {spread(tok_ratio)}")


if __name__ == "__main__":
    main()
