"""The packed layout's attention backends side by side: fwd+bwd of one group's log-probs.

Usage:
    python benchmarks/attention_backends.py [--cells 64x32 512x32 512x256 2048x32 512x1024]
        [--G 8] [--reps 3] [--threads 2]

One random Qwen2 (hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 704, vocabulary 4096,
fp32), one prompt of P random ids and G completions of exactly C ids; the time of
`completion_logprobs(...).sum().backward()` for the repeated layout and the packed layout
with the `sdpa` (dense mask) and `two_part` backends, one warm-up each, then `--reps`
rounds alternating the three; the median of each and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from grouprl.models.forward import completion_logprobs


def bench_model() -> torch.nn.Module:
    """The random Qwen2 of these benchmarks (seed 0): hidden 256, 4 layers, vocabulary 4096."""
    cfg = Qwen2Config(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=16384,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _fwd_bwd(model: torch.nn.Module, batch: tuple, kw: dict) -> None:
    model.zero_grad()
    lp, _ = completion_logprobs(model, *batch, **kw)
    lp.sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--cells", nargs="*", default=["64x32", "512x32", "512x256", "2048x32", "512x1024"]
    )
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = bench_model()
    print("| P | C | repeated s | sdpa s | two_part s | two_part / sdpa | two_part / repeated |")
    print("|---|---|---|---|---|---|---|")
    for cell in args.cells:
        P, C = (int(x) for x in cell.split("x"))
        G = args.G
        pid = torch.randint(0, 4000, (1, P)).repeat_interleave(G, 0)
        pm = torch.ones_like(pid).float()
        cid = torch.randint(0, 4000, (G, C))
        cm = torch.ones(G, C)

        layouts = {
            "repeated": dict(shared_prefix=False),
            "sdpa": dict(shared_prefix=True, attn_backend="sdpa"),
            "two_part": dict(shared_prefix=True, attn_backend="two_part"),
        }
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for kw in layouts.values():
            _fwd_bwd(model, (pid, pm, cid, cm), kw)
        for _ in range(args.reps):
            for name, kw in layouts.items():
                t0 = time.perf_counter()
                _fwd_bwd(model, (pid, pm, cid, cm), kw)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"| {P} | {C} | {med['repeated']:.3f} | {med['sdpa']:.3f} | {med['two_part']:.3f} "
            f"| {med['two_part'] / med['sdpa']:.2f} | {med['two_part'] / med['repeated']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
