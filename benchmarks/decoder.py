"""The HF engine's decoders side by side: the shared-prompt decoder vs `generate`.

Usage:
    python benchmarks/decoder.py [--cells 64x32 512x32 512x256 2048x32 64x1024]
        [--B 4] [--G 8] [--reps 2] [--threads 2] [--draw inverse_cdf|multinomial]
    python benchmarks/decoder.py --draw-only [--vocab 4096 151936] [--rows 32]
    python benchmarks/decoder.py --compile [--cells 64x256]

The random Qwen2 of `attention_backends.py` (hidden 256, 4 layers, vocabulary 4096, fp32), B prompts of P random ids, G samples each of exactly C tokens (the EOS is outside
the vocabulary). Compared: `rollout/decode.py::sample_groups` (rollout.decoder shared) and
the `generate` path as `HFEngine` runs it (prefill once, cache repeated G times, then
`model.generate`). `--reps` rounds alternating the two; the minimum of each and the ratio. `--draw` is the
shared decoder's `rollout.draw`.

`--draw-only`: one decode step's token draw alone, `rollout.draw` inverse_cdf vs
multinomial (softmax included, 50 calls each, alternating, min/median/max per call) on
`--rows` random logit rows of each `--vocab` size.

`--compile`: the shared decoder with the model eager vs wrapped in `torch.compile(dynamic=
True)` (inductor), the compiled one's first call (compilation included) reported apart;
then `--reps` rounds alternating the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from attention_backends import bench_model  # this folder's script
from transformers import GenerationConfig

from grouprl.rollout.decode import draw_inverse_cdf, sample_groups
from grouprl.rollout.hf import HFEngine

DRAW = "inverse_cdf"


def _shared(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, G: int, C: int, eos: list[int]
) -> None:
    sample_groups(
        model, ids, mask, G=G, max_new_tokens=C, eos_ids=eos, pad_id=0, temperature=1.0, draw=DRAW
    )


def _generate(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, G: int, C: int, eos: list[int]
) -> None:
    eng = HFEngine(model, None, decoder="generate")
    kw = eng._prefill_once(ids, mask, G)
    gc = GenerationConfig(max_new_tokens=C, do_sample=True, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        model.generate(
            input_ids=ids.repeat_interleave(G, 0),
            attention_mask=mask.repeat_interleave(G, 0),
            generation_config=gc,
            **kw,
        )


def draw_only(vocabs: list[int], rows: int, calls: int = 50) -> None:
    """Time one step's draw: softmax + inverse-CDF lookup vs softmax + torch.multinomial."""
    fns = {
        "inverse_cdf": lambda x: draw_inverse_cdf(torch.softmax(x, -1)),
        "multinomial": lambda x: torch.multinomial(torch.softmax(x, -1), 1),
    }
    print("| vocabulary | rows | inverse_cdf ms | multinomial ms | ratio min / med / max |")
    print("|---|---|---|---|---|")
    for V in vocabs:
        logits = torch.randn(rows, V)
        ms: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(calls):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(logits)
                ms[name].append((time.perf_counter() - t0) * 1e3)
        ratios = sorted(a / b for a, b in zip(ms["inverse_cdf"], ms["multinomial"], strict=True))
        i, m = statistics.median(ms["inverse_cdf"]), statistics.median(ms["multinomial"])
        print(
            f"| {V} | {rows} | {i:.2f} | {m:.2f} | {ratios[0]:.3f} / "
            f"{statistics.median(ratios):.3f} / {ratios[-1]:.3f} |"
        )


def compile_cmp(model: torch.nn.Module, cells: list[str], B: int, G: int, reps: int) -> None:
    """Eager vs torch.compile'd model under the shared decoder."""
    eos = [model.config.vocab_size]
    compiled = torch.compile(model, dynamic=True)
    print("| P | C | eager s | compiled s | compiled / eager | first compiled call s |")
    print("|---|---|---|---|---|---|")
    for cell in cells:
        P, C = (int(x) for x in cell.split("x"))
        ids = torch.randint(0, 4000, (B, P))
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        _shared(compiled, ids, mask, G, C, eos)
        first = time.perf_counter() - t0
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(reps):
            for name, m in (("eager", model), ("compiled", compiled)):
                t0 = time.perf_counter()
                _shared(m, ids, mask, G, C, eos)
                times[name].append(time.perf_counter() - t0)
        e, c = min(times["eager"]), min(times["compiled"])
        print(f"| {P} | {C} | {e:.2f} | {c:.2f} | {c / e:.2f} | {first:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--cells", nargs="*", default=["64x32", "512x32", "512x256", "2048x32", "64x1024"]
    )
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draw", default="inverse_cdf", choices=["inverse_cdf", "multinomial"])
    ap.add_argument("--draw-only", action="store_true")
    ap.add_argument("--vocab", nargs="*", type=int, default=[4096, 151936])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.draw_only:
        draw_only(args.vocab, args.rows)
        return
    global DRAW
    DRAW = args.draw
    model = bench_model().eval()
    if args.compile:
        compile_cmp(model, args.cells, args.B, args.G, args.reps)
        return
    B, G, eos = args.B, args.G, [model.config.vocab_size]  # never sampled: exactly C tokens
    print("| P | C | shared s | generate s | shared / generate |")
    print("|---|---|---|---|---|")
    for cell in args.cells:
        P, C = (int(x) for x in cell.split("x"))
        ids = torch.randint(0, 4000, (B, P))
        mask = torch.ones_like(ids)

        runs = {"shared": _shared, "generate": _generate}
        times: dict[str, list[float]] = {"shared": [], "generate": []}
        for _ in range(args.reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn(model, ids, mask, G, C, eos)
                times[name].append(time.perf_counter() - t0)
        s, g = min(times["shared"]), min(times["generate"])
        print(f"| {P} | {C} | {s:.2f} | {g:.2f} | {s / g:.2f} |", flush=True)


if __name__ == "__main__":
    main()
