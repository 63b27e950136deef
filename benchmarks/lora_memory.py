"""Full fine-tuning vs LoRA: trainable parameters, optimizer state and peak memory.

Usage:
    python benchmarks/lora_memory.py [--hidden 512] [--layers 8] [--r 16] [--steps 3]
        [--beta 0.04] [--repeats 2]

Each run is a fresh process training the same locally built Qwen2 (fp32, `arith` task, HF
engine, 8 prompts x 8 samples per step, a KL term with `--beta` so full fine-tuning keeps
its reference copy) for `--steps` steps; runs alternate full / LoRA `--repeats` times.
Reported per run: trainable parameters, the AdamW state actually held (bytes of its
tensors after the run), peak resident memory of the process (ru_maxrss, which includes
about 500 MB of imported torch and transformers), and the median step time after the
first step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    from grouprl.training.trainer import Trainer

    cfg = {
        "model": {"name_or_path": args.model_dir},
        "data": {"task": "arith"},
        "rollout": {"num_generations": 8, "max_new_tokens": 8},
        "regularizers": [{"name": "kl", "beta": args.beta}] if args.beta else [],
        "train": {
            "output_dir": args.out,
            "max_steps": args.steps,
            "prompts_per_step": 8,
            "micro_batch_size": 64,
            "save_every": 0,
            "progress": False,
            "overwrite": True,
        },
    }
    if args.mode == "lora":
        cfg["model"]["lora"] = {"r": args.r, "alpha": 2 * args.r}
    with Trainer(cfg) as tr:
        tr.train()
        model = tr.model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = tr.learner.optimizer
        state = sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim()
        )
        has_ref = tr.learner.ref_model is not None
    rows = [json.loads(x) for x in Path(args.out, "metrics.jsonl").read_text().splitlines()]
    report = {
        "trainable": trainable,
        "opt_mb": state / 2**20,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(r["time/step"] for r in rows[1:]) if len(rows) > 1 else 0,
        "reference_copy": has_ref,
    }
    Path(args.out, "report.json").write_text(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from grouprl.data.tasks import get_task
    from grouprl.models.tiny import build_tiny_model, save_model

    work = Path(tempfile.mkdtemp(prefix="grouprl-lora-bench-"))
    tok = get_task("arith").build_tokenizer()
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, seed=0)
    total = sum(p.numel() for p in model.parameters())
    model_dir = save_model(model, tok, work / "model")
    print(
        f"Qwen2 hidden {args.hidden}, {args.layers} layers, {total:,} parameters, fp32; "
        f"arith, 8 prompts x 8 samples, KL beta {args.beta}; {args.steps} steps; "
        f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| run | mode | trainable parameters | AdamW state MB | reference copy "
        "| peak MB | step s (median after 1) |"
    )
    print("|---|---|---|---|---|---|---|")
    for i in range(args.repeats):
        for mode in ("full", "lora"):
            out = work / f"{mode}{i}"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                "--mode",
                mode,
                "--model-dir",
                str(model_dir),
                "--out",
                str(out),
                "--steps",
                str(args.steps),
                "--r",
                str(args.r),
                "--beta",
                str(args.beta),
            ]
            subprocess.run(cmd, check=True, capture_output=True)
            r = json.loads((out / "report.json").read_text())
            label = "full fine-tuning" if mode == "full" else f"LoRA r={args.r}"
            print(
                f"| {i + 1} | {label} | {r['trainable']:,} ({100 * r['trainable'] / total:.2f}%) "
                f"| {r['opt_mb']:.1f} | {'yes' if r['reference_copy'] else 'no (adapters off)'} "
                f"| {r['peak_mb']:.0f} | {r['step_s']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
