"""Peak memory of completion log-probs through the LM head: naive vs grouprl's chunked head.

Usage:
    python benchmarks/logprob_memory.py [--V 32000] [--T 512] [--N 16] [--d 256]
                                        [--chunk 0] [--device cpu|cuda] [--out FILE.md]

Inputs: random hidden states h [N*T, d] (requires_grad), a Linear(d, V, bias=False) head,
random targets. Loss = sum of the target log-probs; forward + backward.

- naive:   logits = head(h) -> log_softmax -> gather (the [N*T, V] fp32 logits, their
           log-softmax and their gradients all exist at once);
- chunked: `grouprl.models.head.chunked_head_logprobs` (chunks of `--chunk` positions,
           0 = grouprl's automatic size, each checkpointed: its logits are freed after the
           forward and recomputed in backward); the entropy is computed without gradient,
           as the Trainer does unless an entropy regularizer needs it;
- chunked+ent: the same with `entropy_grad=True` and 0.1 * sum(entropy) in the loss.

Each path runs in its own child process; on CPU the peak is the VmHWM high-water mark
above the resting RSS (see `shared_prefix.peak_rss_delta`), on CUDA
`torch.cuda.max_memory_allocated` above the allocation before the call. The children save
their log-probs and gradients, and the parent prints the max abs differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from grouprl.models.head import chunked_head_logprobs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shared_prefix import peak_rss_delta, table  # noqa: E402


def make_inputs(N, T, d, V, device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N * T, d, generator=g).to(device).requires_grad_(True)
    head = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g) / d**0.5)
    y = torch.randint(0, V, (N * T,), generator=g).to(device)
    return h, head.to(device), y


PATHS = {
    "naive": "full [M, V] logits -> log_softmax -> gather; loss = sum log-probs",
    "chunked": "grouprl chunked_head_logprobs (entropy computed, no grad: the Trainer's default)",
    "chunked+ent": "grouprl chunked_head_logprobs(entropy_grad=True); loss = sum log-probs + 0.1 * sum entropy",
}


def run_path(path, h, head, y, chunk):
    if path == "naive":
        logp = torch.log_softmax(head(h).float(), dim=-1).gather(-1, y[:, None]).squeeze(-1)
        loss = logp.sum()
    else:
        with_ent = path == "chunked+ent"
        logp, ent = chunked_head_logprobs(h, y, head, chunk_size=chunk, entropy_grad=with_ent)
        loss = logp.sum() + (0.1 * ent.sum() if with_ent else 0.0)
    loss.backward()
    return logp.detach()


def child(args, path, save_to):
    device = torch.device(args.device)
    h, head, y = make_inputs(args.N, args.T, args.d, args.V, device)
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        logp = run_path(path, h, head, y, args.chunk)
        torch.cuda.synchronize()
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["method"] = "cuda max_memory_allocated"
    else:
        box = {}
        out["peak_mb"], out["method"] = peak_rss_delta(
            lambda: box.update(logp=run_path(path, h, head, y, args.chunk))
        )
        logp = box["logp"]
    torch.save(
        {"logp": logp.cpu(), "h_grad": h.grad.cpu(), "w_grad": head.weight.grad.cpu()}, save_to
    )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--N", type=int, default=16)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument(
        "--chunk", type=int, default=0, help="0 = grouprl's automatic size (64 MiB of logits)"
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args, *args.child)))
        return
    load = os.getloadavg()
    res, saved = {}, {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            f = os.path.join(tmp, f"{path}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", path, f]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{path} child failed:\n{r.stderr}")
            res[path] = json.loads(r.stdout.strip().splitlines()[-1])
            saved[path] = torch.load(f)
    ref = saved["naive"]
    M = args.N * args.T
    logits_mb = M * args.V * 4 / 2**20
    rows = []
    for p, r in res.items():
        d = saved[p]
        d_lp = float((d["logp"] - ref["logp"]).abs().max())
        rel_lp = float(((d["logp"] - ref["logp"]).abs() / ref["logp"].abs().clamp(min=1e-30)).max())
        d_h = float((d["h_grad"] - ref["h_grad"]).abs().max())
        d_w = float((d["w_grad"] - ref["w_grad"]).abs().max())
        rows.append(
            [
                p,
                f"{r['peak_mb']:.0f}",
                f"{r['peak_mb'] / res['naive']['peak_mb']:.3f}",
                f"{d_lp:.1e}",
                f"{rel_lp:.1e}",
                f"{d_h:.1e}",
                f"{d_w:.1e}",
            ]
        )
    ratio = res["chunked"]["peak_mb"] / res["naive"]["peak_mb"]
    lines = [
        f"# log-prob memory (`{' '.join(sys.argv[1:]) or 'defaults'}`)",
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
        + f"; load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"V={args.V}, T={args.T}, N={args.N} (M={M} positions), d={args.d}, chunk={args.chunk}, fp32; "
        f"one [M, V] fp32 logits tensor = {logits_mb:.0f} MB; peak method: {res['naive']['method']}; "
        "differences are against the naive path",
        table(
            [
                "path",
                "peak MB (fwd+bwd)",
                "ratio to naive",
                "max abs Δ log-prob",
                "max rel Δ log-prob",
                "max abs Δ dL/dh",
                "max abs Δ dL/dW",
            ],
            rows,
        ),
        "\n".join(f"- {p}: {desc}" for p, desc in PATHS.items()),
        f"naive log-probs lie in [{float(ref['logp'].min()):.2f}, {float(ref['logp'].max()):.2f}]; "
        f"one fp32 ulp at |x| = {float(ref['logp'].abs().max()):.2f} is "
        f"{float(torch.finfo(torch.float32).eps * 2 ** torch.floor(torch.log2(ref['logp'].abs().max()))):.1e}",
        f"target (grouprl chunked peak <= 1/4 of naive): {'HELD' if ratio <= 0.25 else 'FAILED'} ({ratio:.3f})",
    ]
    report = "\n\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
