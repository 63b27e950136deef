"""GRPO step time and memory per process: 1 process vs N under torchrun (ddp, fsdp2),
same work.

Usage:
    python benchmarks/data_parallel.py [--procs 2] [--strategies ddp,fsdp2] [--steps 4]
        [--hidden 256] [--layers 4] [--prompts 8] [--G 8] [--max-new-tokens 16]

Both runs train the same model (a random Qwen2 from `build_tiny_model`, fp32) on the
built-in `arith` task with the HF engine and the same global batch (`--prompts` x `--G`
completions per step). The single process gets all the machine's threads; each of the N
processes gets 1/N of them (OMP_NUM_THREADS), so the comparison spends the same cores.
Reported: the median of `time/step`, `time/collect` and `time/train` over the steps after
the first (from metrics.jsonl), each process's peak resident memory (ru_maxrss, which
includes importing torch and transformers), and the training state each process holds at
the end: its parameters plus AdamW's two moments, in MB (under fsdp2 its shards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One run (a torchrun worker or the single process); rank 0 writes the report."""
    from grouprl.training.trainer import Trainer

    cfg = {
        "model": {"name_or_path": args.model_dir},
        "data": {"task": "arith"},
        "rollout": {"num_generations": args.G, "max_new_tokens": args.max_new_tokens},
        "train": {
            "output_dir": args.out,
            "max_steps": args.steps,
            "prompts_per_step": args.prompts,
            "micro_batch_size": args.prompts * args.G,
            "save_every": 0,
            "progress": False,
            "overwrite": True,
            "strategy": args.strategy,
        },
    }
    with Trainer(cfg) as tr:
        tr.train()
        rank = tr.dist.rank
        opt = tr.learner.optimizer
        tensors = list(tr.model.parameters())
        tensors += [v for s in opt.state.values() for v in s.values() if v.dim()]
        state_mb = sum(_local(t).numel() * t.element_size() for t in tensors) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out, f"peak_{rank}.txt").write_text(f"{peak:.0f} {state_mb:.1f}")


def _local(t):
    """This process's part of a tensor (a DTensor's shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def run(n: int, strategy: str, args: argparse.Namespace, model_dir: Path, work: Path) -> dict:
    out = work / f"p{n}-{strategy}"
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    script = [
        str(Path(__file__).resolve()),
        "--child",
        "--model-dir",
        str(model_dir),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--prompts",
        str(args.prompts),
        "--G",
        str(args.G),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--strategy",
        strategy,
    ]
    if n == 1:
        cmd = [sys.executable, *script]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={n}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *script,
        ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    med = {
        k: statistics.median(r[k] for r in rows)
        for k in ("time/step", "time/collect", "time/train")
    }
    reports = [(out / f"peak_{r}.txt").read_text().split() for r in range(n)]
    peaks = [int(p) for p, _ in reports]
    state = [float(m) for _, m in reports]
    return {**med, "peaks": peaks, "state": state, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--strategies", default="ddp,fsdp2", help="comma-separated, for N processes")
    ap.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from grouprl.data.tasks import get_task
    from grouprl.models.tiny import build_tiny_model, save_model

    work = Path(tempfile.mkdtemp(prefix="grouprl-dp-bench-"))
    tok = get_task("arith").build_tokenizer()
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, seed=0)
    model_dir = save_model(model, tok, work / "model")
    print(
        f"model hidden {args.hidden}, {args.layers} layers, fp32; arith, {args.prompts} prompts x "
        f"{args.G} samples of <= {args.max_new_tokens} tokens per step; median of "
        f"{args.steps - 1} steps after 1; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| processes | strategy | threads each | step s | collect s | train s "
        "| peak MB per process | weights + AdamW state MB per process |"
    )
    print("|---|---|---|---|---|---|---|---|")
    runs = [(1, "single")] + [(args.procs, s) for s in args.strategies.split(",")]
    for n, strategy in runs:
        r = run(n, strategy, args, model_dir, work)
        print(
            f"| {n} | {strategy} | {r['threads']} | {r['time/step']:.3f} | "
            f"{r['time/collect']:.3f} | {r['time/train']:.3f} | "
            f"{', '.join(map(str, r['peaks']))} | {', '.join(f'{m:.1f}' for m in r['state'])} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
