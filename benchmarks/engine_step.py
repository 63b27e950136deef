"""GRPO step time by rollout engine: HF `generate` vs vLLM colocated vs a vLLM server.

Usage:
    python benchmarks/engine_step.py [--size 0.5b|tiny] [--engines hf vllm vllm_server]
        [--async off one_step] [--prompt-len 512] [--completion-len 512] [--G 8]
        [--prompts 8] [--steps 3] [--out FILE.md]

What is measured: full `grouprl` Trainer steps (rollout, reward, log-probs, backward,
optimizer, weight sync to the engine) on one model with random weights built locally from
a config (`0.5b`: the Qwen2.5-0.5B shapes; `tiny`: a CPU smoke size), prompts of exactly
`--prompt-len` tokens, `--G` samples of up to `--completion-len` tokens each, a reward of
pseudo-random values (so advantages are non-zero). bf16 on CUDA, fp32 on CPU. One warm-up
step, then `--steps` steps; the table gives the median of each stage's seconds
(`time/collect` = sampling + reward, `time/train` = log-probs + update + weight sync).

Engines: `hf` (HFEngine), `vllm` (in-process vLLM sharing the GPU with training,
`rollout.vllm.gpu_memory_utilization` 0.3), `vllm_server` (`grouprl vllm-serve` started
here on a free port; on a one-GPU machine it shares the GPU with training). An engine that
cannot run (vLLM not installed) gets a row saying why.

`--async`: each engine once per `train.async` mode. Under `one_step` the next step's batch
is sampled while this step trains, so `collect s` is the step's own collection (~0 once the
pipeline runs) and `step s` is the number to compare with `off`; the run makes one step
more and drops its last, which samples nothing ahead (a "drain" step, shorter than a
steady one). The colocated `vllm` engine is refused with one_step (a row says why).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import traceback
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SIZES = {
    # Qwen2.5-0.5B's shapes (its config.json), random weights
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word `w<i>`, ids 0..vocab_size-1 (0-3 special)."""
    special = {
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "bos_token": "<bos>",
        "unk_token": "<unk>",
    }
    vocab = {t: i for i, t in enumerate(special.values())}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **special)
    tok.padding_side = "left"
    return tok


def build_model_dir(size: str, dtype: torch.dtype, out: Path) -> Path:
    tok = word_tokenizer(SIZES[size]["vocab_size"])
    cfg = AutoConfig.for_model(
        "qwen2",
        **SIZES[size],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pseudo_reward(completions, **_):
    """Deterministic, spread-out values: GRPO advantages are non-zero."""
    return [zlib.crc32(c.encode()) % 1000 / 1000 for c in completions]


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    return [{"prompt": " ".join(f"w{i}" for i in row.tolist())} for row in ids]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, max_len: int, dtype: str, log: Path
) -> tuple[subprocess.Popen, str]:
    from grouprl.rollout.vllm_server import launch_server

    args = ["--max-model-len", str(max_len), "--dtype", dtype]
    if torch.cuda.is_available():
        args += ["--gpu-memory-utilization", "0.3"]
    return launch_server(model_dir, port=free_port(), log_path=log, args=args)


def run_engine(
    engine: str, model_dir: Path, args, data: list[dict], work: Path, mode: str = "off"
) -> dict:
    from grouprl.training.trainer import Trainer

    cuda = torch.cuda.is_available()
    rollout = {
        "engine": "hf" if engine == "hf" else "vllm",
        "num_generations": args.G,
        "max_new_tokens": args.completion_len,
        "temperature": 1.0,
    }
    proc = None
    if engine == "vllm":
        rollout["vllm"] = {"gpu_memory_utilization": 0.3}
    elif engine == "vllm_server":
        proc, url = start_server(
            model_dir,
            args.prompt_len + args.completion_len,
            "bfloat16" if cuda else "float32",
            work / "server.log",
        )
        rollout["vllm"] = {"mode": "server", "server_url": url}
    cfg = {
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16" if cuda else "float32"},
        "rollout": rollout,
        "data": {"max_prompt_length": args.prompt_len},
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "aggregation": "token_mean"},
        "train": {
            "output_dir": str(work / f"{engine}-{mode}"),
            "async": mode,
            "max_steps": args.steps + 1 + (mode == "one_step"),  # + the drain step
            "prompts_per_step": args.prompts,
            "micro_batch_size": args.micro_batch,
            "learning_rate": 1e-6,
            "save_every": 0,
            "progress": False,
            "overwrite": True,
        },
    }
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with Trainer(cfg, train_dataset=data, reward_funcs=[pseudo_reward]) as tr:
            hist = tr.train().history[1:]  # drop the warm-up step
            hist = hist[: args.steps]  # and one_step's drain step
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)

    def med(key: str) -> float:
        return statistics.median(m[key] for m in hist)

    return {
        "collect": med("time/collect"),
        "train": med("time/train"),
        "step": med("time/step"),
        "tokens_per_s": med("tokens_per_second"),
        "completion_len": med("completions/mean_length"),
        "peak_gib": peak,
        "mismatch_kl": med("mismatch/kl") if "mismatch/kl" in hist[0] else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm", "vllm_server"])
    ap.add_argument(
        "--async",
        dest="modes",
        nargs="+",
        default=["off"],
        choices=["off", "one_step"],
        help="train.async modes, each engine once per mode",
    )
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--completion-len", type=int, default=512)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="grouprl-engine-bench-"))
    model_dir = build_model_dir(
        args.size, torch.bfloat16 if cuda else torch.float32, work / "model"
    )
    data = prompts(args.prompts * (args.steps + 2), args.prompt_len, SIZES[args.size]["vocab_size"])
    device = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)"
    )
    head = (
        f"model {args.size} (random weights), {'bf16' if cuda else 'fp32'}, prompt {args.prompt_len}, "
        f"completion <= {args.completion_len}, G={args.G}, B={args.prompts}, median of "
        f"{args.steps} steps after 1 warm-up; {device}; torch {torch.__version__}"
    )
    lines = [
        head,
        "",
        "| engine | train.async | collect s | train s | step s | tokens/s | mean completion "
        "| peak GiB (trainer process) | mismatch/kl |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for engine in args.engines:
        for mode in args.modes:
            try:
                r = run_engine(engine, model_dir, args, data, work, mode)
                lines.append(
                    f"| {engine} | {mode} | {r['collect']:.2f} | {r['train']:.2f} | "
                    f"{r['step']:.2f} | {r['tokens_per_s']:.0f} | {r['completion_len']:.0f} | "
                    f"{r['peak_gib']:.1f} | {r['mismatch_kl']:.2e} |"
                )
            except Exception as exc:  # noqa: BLE001  (a row that says why, the others still run)
                traceback.print_exc()
                lines.append(
                    f"| {engine} | {mode} | not run: {type(exc).__name__}: {str(exc)[:160]} "
                    "| | | | | | |"
                )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
