"""Shared-prefix (Prefix Grouper) training forward vs the repeated layout, side by side.

Usage:
    python benchmarks/shared_prefix.py [--grid small|full] [--device cpu|cuda] [--out FILE.md]
        [--reps 3] [--configs "P,C,G;P,C,G"] [--skip logprobs grpo prefill pg]
        [--mem-warmup] [--profile P,C,G]

`--configs` replaces the grid, `--mem-warmup` runs one fwd+bwd in each memory child before
the measured one, `--profile` only prints a torch.profiler op table per layout. On CPU the
script sets OMP_WAIT_POLICY=PASSIVE (unless set) and reports wall and process CPU time.

What is measured (one run, one model, same inputs for every layout):

1. `completion_logprobs` forward + backward (loss = sum of masked completion log-probs) for
   one prompt group per micro-batch (B=1): prompt of P random token ids, G completions of
   exactly C random token ids each (no padding anywhere), layouts
   - `repeated`: grouprl's G rows `[prompt; completion]` (`shared_prefix=False`);
   - `shared`:   grouprl's packed row `[prompt; c_1; ...; c_G]` (`shared_prefix=True`);
   - `pg`:       the PyPI package `prefix-grouper` 0.0.1.post1 (if installed), wired into the
                 same model through a registered transformers attention function (below).
   Time: one warm-up, then the median of `--reps` repetitions, layouts interleaved.
   Peak memory: each (config, layout) in a fresh child process (see `peak_rss_delta`); on
   CUDA, `torch.cuda.max_memory_allocated` after a reset, in process.
2. One full GRPO step (rollout + reward + fwd/bwd + optimizer) with grouprl's Trainer,
   `model.shared_prefix` on vs off, same seed and config.
3. Rollout prefill: `HFEngine.generate` with `share_prefill` True vs False at P=512, G=8,
   `max_new_tokens=8` (prefill dominates).

Model: a random Qwen2 from `build_tiny_model` (hidden 256, 4 layers, 4 heads, MLP 1024,
fp32, SDPA), vocabulary = grouprl's character tokenizer (85 tokens), so the LM head is
negligible and the numbers are about the trunk (the head costs the same in every layout:
only completion positions go through it).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import product

# Passive OpenMP waiting: on a shared machine, spinning threads fight other processes at
# every barrier and 2-thread wall times swing several-fold; passive waiting keeps them
# stable. Must be set before torch (libgomp) loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from grouprl.models.attention import attention_implementation
from grouprl.models.forward import completion_logprobs
from grouprl.models.head import chunked_head_logprobs
from grouprl.models.tiny import build_char_tokenizer, build_tiny_model

HIDDEN, LAYERS, HEADS = 256, 4, 4
MAX_POS = 4096  # >= max P + C of the full grid (2048 + 256)

GRIDS = {
    # CPU-feasible subset; must contain P=512, C=64, G=8
    "small": [
        (128, 32, 4),
        (256, 64, 8),
        (512, 64, 8),
        (512, 128, 4),
        (1024, 32, 4),
        (256, 32, 16),
    ],
    "full": list(product((128, 256, 512, 1024, 2048), (32, 64, 128, 256), (4, 8, 16))),
}
LAYOUTS = ("repeated", "shared", "pg")

# ----------------------------------------------------------------------------- prefix-grouper

try:
    from prefix_grouper import PrefixGrouper

    PG_SKIP = None
except ImportError as exc:  # optional comparison
    PrefixGrouper = None
    PG_SKIP = f"prefix-grouper not importable ({exc}); pip install prefix-grouper==0.0.1.post1"

PG_ATTN = "bench_prefix_grouper_sdpa"
_PG_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("bench_pg", default=None)


def bottom_right_sdpa(q, k, v, key_mask_bK, *, scaling=None):
    """SDPA with bottom-right causal alignment and a 2-D key-padding mask.

    q [b,H,Lq,d], k/v [b,Hkv,Lk,d], key_mask_bK [b,Lk] (True = real key). Query i sees key j
    iff j <= i + Lk - Lq and key j is real (FA2's convention, which prefix-grouper relies on:
    a suffix query sees the whole prefix and the suffix up to itself). Rows with no visible
    key (padding queries) see key 0 so the softmax has no empty row; their outputs are
    dropped by prefix-grouper's `group`. Returns [b,Lq,H,d] (what `group` expects).
    """
    Lq, Lk = q.shape[2], k.shape[2]
    qi = torch.arange(Lq, device=q.device)[:, None]
    kj = torch.arange(Lk, device=q.device)[None, :]
    allowed = (kj <= qi + (Lk - Lq))[None] & key_mask_bK.bool()[:, None, :]  # [b,Lq,Lk]
    empty = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (empty & (kj == 0)[None])
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None], scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2).contiguous()


def pg_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered transformers attention: route q/k/v through the active PrefixGrouper."""
    pg = _PG_ACTIVE.get()
    if pg is None:
        raise RuntimeError(f"{PG_ATTN} called outside pg_logprobs")
    return pg.forward(bottom_right_sdpa, query, key, value, scaling=scaling), None


@contextlib.contextmanager
def attn_implementation(model, name, pg):
    from transformers import AttentionInterface

    AttentionInterface.register(PG_ATTN, pg_attention)
    token = _PG_ACTIVE.set(pg)
    try:
        with attention_implementation(model, name):
            yield
    finally:
        _PG_ACTIVE.reset(token)


def pg_logprobs(model, prompt_ids_BP, prompt_mask_BP, comp_ids_NT, comp_mask_NT, G):
    """Completion log-probs [N, T] through prefix-grouper (prompts B, completions N = B*G).

    Prompt masks may be left or right padded; completion masks are right padded (leading
    real tokens). Positions restart at each prompt's length for every completion. The LM
    head is grouprl's chunked one, as in the other layouts.
    """
    pmask, cmask = prompt_mask_BP.bool(), comp_mask_NT.bool()
    pg = PrefixGrouper.from_ungrouped_masks(
        pmask, cmask, group_sizes=G, device=comp_ids_NT.device, padding_mode="right"
    )
    ids = pg.concat_input(prompt_ids_BP, pmask, comp_ids_NT, cmask)
    pos = torch.zeros_like(ids)
    for b, info in enumerate(pg.group_info):
        p = info.prefix_len
        chunks = [torch.arange(p)] + [torch.arange(p, p + s) for s in info.suffix_lens]
        row = torch.cat(chunks)
        pos[b, : len(row)] = row.to(ids.device)
    with attn_implementation(model, PG_ATTN, pg):
        hidden = model.get_decoder()(
            input_ids=ids, position_ids=pos, use_cache=False
        ).last_hidden_state
    _, _, suffix_h, suffix_mask = pg.split_output(hidden, include_prefix_last=1)
    # suffix_h [N, S+1, d]: the last prompt position, then the completion; position t
    # predicts completion token t. suffix_mask[:, 1:] is the (right-padded) completion mask.
    S, T = suffix_h.shape[1] - 1, comp_ids_NT.shape[1]
    valid = suffix_mask[:, 1:].bool()
    h_Md, y_M = suffix_h[:, :-1][valid], comp_ids_NT[:, :S][valid]
    lp, _ = chunked_head_logprobs(h_Md, y_M, model.get_output_embeddings())
    return F.pad(lp.new_zeros(valid.shape).masked_scatter(valid, lp), (0, T - S))


# ----------------------------------------------------------------------------- helpers


def make_model(device):
    tok = build_char_tokenizer()
    model = build_tiny_model(
        tok,
        arch="qwen2",
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        max_position_embeddings=MAX_POS,
        seed=0,
    )
    return model.to(device), tok


def make_inputs(P, C, G, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed * 1_000_003 + P * 1009 + C * 31 + G)
    prompt = torch.randint(4, vocab, (1, P), generator=g)  # skip the 4 special tokens
    comps = torch.randint(4, vocab, (G, C), generator=g)
    return [t.to(device) for t in (prompt.repeat(G, 1), torch.ones(G, P), comps, torch.ones(G, C))]


def fwd_bwd(model, layout, inputs):
    """One forward + backward; returns the log-probs (detached)."""
    pid, pmask, cid, cmask = inputs
    model.zero_grad(set_to_none=True)
    if layout == "pg":
        logp = pg_logprobs(model, pid[:1], pmask[:1], cid, cmask, G=cid.shape[0])
    else:
        logp, _ = completion_logprobs(
            model, pid, pmask, cid, cmask, shared_prefix=layout == "shared"
        )
    (logp * cmask).sum().backward()
    return logp.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_delta(fn):
    """Peak resident memory (MB) that `fn()` adds above the process's resting RSS.

    Linux: reset the high-water mark (`echo 5 > /proc/self/clear_refs` sets VmHWM = VmRSS),
    run, read VmHWM. The child runs with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, so every
    tensor buffer is its own mmap and returns to the OS when freed: the resting RSS before
    the measured call does not hide memory that the warm-up freed. Falls back to the
    ru_maxrss delta if clear_refs is not writable.
    """
    gc.collect()
    rss0 = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method, rss0 = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = (
        _status_kb("VmHWM")
        if method == "VmHWM"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    return (peak - rss0) / 1024, method


def child_memory(P, C, G, layout, warmup=False):
    """Runs in a fresh process: peak memory of one fwd+bwd of (P, C, G, layout) on CPU.

    Also returns the plain ru_maxrss delta (after minus before the same call), which reads
    0 whenever an earlier transient (the imports, building the model) peaked higher.
    """
    torch.manual_seed(0)
    model, tok = make_model(torch.device("cpu"))
    inputs = make_inputs(P, C, G, len(tok), torch.device("cpu"))
    if warmup:
        fwd_bwd(model, layout, inputs)
        model.zero_grad(set_to_none=True)
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak, method = peak_rss_delta(lambda: fwd_bwd(model, layout, inputs))
    ru = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru0) / 1024
    return {"peak_mb": peak, "ru_maxrss_mb": ru, "method": method}


def run_child(P, C, G, layout, warmup=False):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        json.dumps([P, C, G, layout, warmup]),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {
            "error": res.stderr.strip().splitlines()[-1]
            if res.stderr.strip()
            else f"rc={res.returncode}"
        }
    return json.loads(res.stdout.strip().splitlines()[-1])


def cuda_memory(model, layout, inputs):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(model, layout, inputs)
    torch.cuda.synchronize()
    return {
        "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
        "method": "cuda max_memory_allocated",
    }


def grad_vector(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- sections


class Timer:
    """Wall-clock and process CPU time of a block (CUDA: synchronized; CPU time then means little)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def bench_logprobs(grid, device, reps, layouts, log, mem_warmup=False):
    model, tok = make_model(device)
    model.train()
    V = len(tok)
    rows, pg_rows, mem_rows = [], [], []
    for P, C, G in grid:
        inputs = make_inputs(P, C, G, V, device)
        wall = {lay: [] for lay in layouts}
        cpu = {lay: [] for lay in layouts}
        logps, grads = {}, {}
        for lay in layouts:  # warm-up, and the values for the correctness columns
            logps[lay] = fwd_bwd(model, lay, inputs)
            grads[lay] = grad_vector(model)
        for _ in range(reps):  # interleaved so that background load hits every layout alike
            for lay in layouts:
                with Timer(device) as t:
                    fwd_bwd(model, lay, inputs)
                wall[lay].append(t.wall)
                cpu[lay].append(t.cpu)
        model.zero_grad(set_to_none=True)
        med = {lay: statistics.median(v) for lay, v in wall.items()}
        med_cpu = {lay: statistics.median(v) for lay, v in cpu.items()}
        mem = {}
        for lay in layouts:
            mem[lay] = (
                run_child(P, C, G, lay, mem_warmup)
                if device.type == "cpu"
                else cuda_memory(model, lay, inputs)
            )
        ideal = G * (P + C) / (P + G * C)
        sp = med["repeated"] / med["shared"]
        sp_cpu = med_cpu["repeated"] / med_cpu["shared"]
        peak = {lay: mem[lay].get("peak_mb") for lay in layouts}
        ref_lp, ref_g = logps["repeated"], grads["repeated"]
        diff = {lay: float((logps[lay] - ref_lp).abs().max()) for lay in layouts}
        gerr = {lay: float((grads[lay] - ref_g).norm() / ref_g.norm()) for lay in layouts}
        mr, ms = peak["repeated"], peak["shared"]
        rows.append(
            [P, C, G, f"{med['repeated']:.3f}", f"{med['shared']:.3f}", f"{sp:.2f}"]
            + [f"{sp_cpu:.2f}" if device.type == "cpu" else "n/a"]
            + [f"{ideal:.2f}", f"{sp / ideal:.2f}", fmt(mr, ".0f"), fmt(ms, ".0f")]
            + [fmt(mr / ms if mr and ms else None, ".2f")]
        )
        pg_row = [P, C, G, f"{diff['shared']:.1e}", f"{gerr['shared']:.1e}"]
        if "pg" in layouts:
            mp = peak["pg"]
            pg_row += [f"{med['pg']:.3f}", f"{med['repeated'] / med['pg']:.2f}"]
            pg_row += [f"{med['shared'] / med['pg']:.2f}", fmt(mp, ".0f")]
            pg_row += [f"{diff['pg']:.1e}", f"{gerr['pg']:.1e}"]
        pg_rows.append(pg_row)
        mem_rows.append(
            [P, C, G]
            + [fmt(mem[lay].get("ru_maxrss_mb"), ".0f") for lay in layouts]
            + [mem["repeated"].get("method", mem["repeated"].get("error"))]
        )
        log(
            f"  P={P} C={C} G={G}: "
            + ", ".join(
                f"{lay} {med[lay]:.3f}s (cpu {med_cpu[lay]:.3f}s) {fmt(peak[lay], '.0f')}MB"
                for lay in layouts
            )
            + f" (ideal {ideal:.2f}, speedup {sp:.2f})"
        )
    headers = ["P", "C", "G", "repeated s", "shared s", "speedup", "CPU-time speedup", "ideal"]
    headers += ["speedup/ideal", "peak MB repeated", "peak MB shared", "mem ratio"]
    out = table(headers, rows)
    out += "\n\nCorrectness against the repeated layout (log-probs: max abs difference; "
    out += "parameter gradients: ||g - g_repeated|| / ||g_repeated||)"
    pg_headers = ["P", "C", "G", "shared max abs Δlogp", "shared grad rel err"]
    if "pg" in layouts:
        out += " and the prefix-grouper layout (time: median wall s; speedups are repeated/pg and shared/pg)"
        pg_headers += ["pg s", "speedup vs repeated", "shared/pg time", "peak MB pg"]
        pg_headers += ["pg max abs Δlogp", "pg grad rel err"]
    out += ":\n\n" + table(pg_headers, pg_rows)
    if device.type == "cpu":
        out += "\n\nMemory method check: plain ru_maxrss delta (MB, after minus before) of the same measured call, same child:\n\n"
        out += table(
            ["P", "C", "G"] + [f"{lay} ru_maxrss MB" for lay in layouts] + ["peak method"], mem_rows
        )
    return out


def bench_grpo_step(device, steps, log, P=512, max_new=64, G=8, B=1):
    """Two Trainers (shared_prefix off / on) built from the same seed, stepped alternately.

    Each keeps its own torch RNG state, so both draw the same samples (checked through the
    completion lengths) while background load hits both alike.
    """
    import random

    from grouprl.training.trainer import Trainer

    rnd = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    data = [{"prompt": "".join(rnd.choice(letters) for _ in range(P))} for _ in range(16)]

    def length_reward(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    modes = ("off", "on")
    trainers, rng, timers = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            model, tok = make_model(device)
            cfg = {
                "model": {"name_or_path": "unused", "shared_prefix": mode},
                "rollout": {"num_generations": G, "max_new_tokens": max_new, "temperature": 1.0},
                "advantage": {"name": "grpo"},
                "loss": {"name": "ppo_clip", "aggregation": "token_mean"},
                "regularizers": [],
                "data": {"max_prompt_length": P},
                "train": {
                    "output_dir": os.path.join(tmp, mode),
                    "seed": 0,
                    "max_steps": steps + 1,
                    "prompts_per_step": B,
                    "micro_batch_size": G,
                    "learning_rate": 1e-6,
                    "save_every": 0,
                    "progress": False,
                },
            }
            tr = Trainer(
                cfg, model=model, tokenizer=tok, train_dataset=data, reward_funcs=[length_reward]
            )
            assert tr.shared_prefix == (mode == "on")
            rng[mode] = torch.get_rng_state()
            timers[mode] = {"generate": [], "train": []}
            for part, obj, name in (
                ("generate", tr.engine, "generate"),
                ("train", tr.learner, "update"),
            ):
                setattr(obj, name, _timed(getattr(obj, name), timers[mode][part], device))
            trainers[mode] = tr
        res = {m: {"step": [], "generate": [], "train": [], "len": []} for m in modes}
        for i in range(steps + 1):  # step 0 = warm-up
            for mode in modes:
                torch.set_rng_state(rng[mode])
                with Timer(device) as t:
                    metrics = trainers[mode].train_step()
                rng[mode] = torch.get_rng_state()
                if i == 0:
                    continue
                res[mode]["step"].append((t.wall, t.cpu))
                res[mode]["generate"].append(timers[mode]["generate"][-1])
                res[mode]["train"].append(timers[mode]["train"][-1])
                res[mode]["len"].append(metrics["completions/mean_length"])
    med = {
        m: {
            k: tuple(statistics.median(x[j] for x in v) for j in range(2))
            for k, v in r.items()
            if k != "len"
        }
        for m, r in res.items()
    }
    log(f"  GRPO step: {med}; completion lengths {dict((m, r['len']) for m, r in res.items())}")
    rows = [
        [m]
        + [f"{med[m][k][0]:.2f}" for k in ("step", "generate", "train")]
        + [f"{med[m][k][1]:.2f}" for k in ("step", "train")]
        + [" ".join(f"{x:.1f}" for x in res[m]["len"])]
        for m in modes
    ]
    head = (
        f"B={B} prompt x G={G}, prompt {P} tokens, max_new_tokens={max_new}, "
        f"micro_batch_size={G} (one group per micro-batch), no KL, lr 1e-6; median of {steps} "
        "steps after 1 warm-up step, the two trainers stepped alternately with their own RNG "
        "state (same samples: see the completion lengths). train = `Learner.update` "
        "(fwd+bwd+optimizer).\n\n"
    )
    sp = {k: med["off"][k][0] / med["on"][k][0] for k in ("step", "train")}
    sp_cpu = {k: med["off"][k][1] / med["on"][k][1] for k in ("step", "train")}
    return (
        head
        + table(
            [
                "shared_prefix",
                "step s",
                "generate s",
                "train s",
                "step CPU s",
                "train CPU s",
                "mean completion len per step",
            ],
            rows,
        )
        + f"\n\nspeedup (off/on): step {sp['step']:.2f}x (CPU time {sp_cpu['step']:.2f}x), "
        f"train {sp['train']:.2f}x (CPU time {sp_cpu['train']:.2f}x)"
    )


def _timed(fn, sink, device):
    def wrapper(*a, **k):
        with Timer(device) as t:
            out = fn(*a, **k)
        sink.append((t.wall, t.cpu))
        return out

    return wrapper


def bench_prefill(device, reps, log, P=512, G=8, max_new=8):
    import random

    from grouprl.rollout.base import SamplingParams
    from grouprl.rollout.hf import HFEngine

    model, tok = make_model(device)
    rnd = random.Random(1)
    prompt = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(P))
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) == P
    params = SamplingParams(num_generations=G, max_new_tokens=max_new, temperature=1.0)
    engines = {s: HFEngine(model, tok, share_prefill=s) for s in (False, True)}
    times = {s: [] for s in engines}
    for e in engines.values():  # warm-up
        e.generate([prompt], params)
    for _ in range(reps):
        for s, e in engines.items():
            with Timer(device) as t:
                e.generate([prompt], params)
            times[s].append((t.wall, t.cpu))
    med = {s: tuple(statistics.median(x[j] for x in v) for j in range(2)) for s, v in times.items()}
    log(f"  prefill: {med}")
    rows = [[s, f"{med[s][0]:.3f}", f"{med[s][1]:.3f}"] for s in (False, True)]
    head = (
        f"one prompt of {P} tokens, G={G}, max_new_tokens={max_new}, temperature 1; "
        f"median of {reps} after 1 warm-up, alternating.\n\n"
    )
    return (
        head
        + table(["share_prefill", "generate s", "generate CPU s"], rows)
        + f"\n\nspeedup: {med[False][0] / med[True][0]:.2f}x (CPU time {med[False][1] / med[True][1]:.2f}x)"
    )


def bench_profile(P, C, G, device, layouts, log):
    """torch.profiler op table (self time) of one fwd+bwd per layout, after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    model, tok = make_model(device)
    inputs = make_inputs(P, C, G, len(tok), device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for lay in layouts:
        fwd_bwd(model, lay, inputs)
        with profile(activities=acts) as prof:
            fwd_bwd(model, lay, inputs)
            sync(device)
        avgs = prof.key_averages()
        total = sum(getattr(e, key) for e in avgs)
        attn = sum(getattr(e, key) for e in avgs if "scaled_dot_product" in e.key)
        out.append(
            f"### {lay} (P={P}, C={C}, G={G}): attention (SDPA kernels) {attn / total:.0%} of self time"
        )
        out.append("```\n" + avgs.table(sort_by=key, row_limit=8, max_name_column_width=55) + "```")
        log(f"  profiled {lay}")
    return "\n\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=GRIDS, default="small")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--skip", nargs="*", default=[], choices=("logprobs", "grpo", "prefill", "pg"))
    ap.add_argument(
        "--mem-warmup",
        action="store_true",
        help="memory children run one fwd+bwd before the measured one",
    )
    ap.add_argument("--configs", help="override the grid: 'P,C,G;P,C,G;...'")
    ap.add_argument(
        "--profile", metavar="P,C,G", help="only print a torch.profiler op table per layout"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_memory(*json.loads(args.child))))
        return
    device = torch.device(args.device)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    layouts = [lay for lay in LAYOUTS if not (lay == "pg" and (PG_SKIP or "pg" in args.skip))]
    load = os.getloadavg()
    import transformers

    hw = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), transformers {transformers.__version__}"
    if device.type == "cuda":
        hw += f", {torch.cuda.get_device_name()}"
    parts = [
        f"# shared-prefix benchmark (`{' '.join(sys.argv[1:])}`)",
        f"machine: {hw}; load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]
    parts.append(
        f"model: random Qwen2, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, char vocab, fp32, SDPA; B=1 group per micro-batch; completions all of length C"
        + ("." if args.profile else f"; median of {args.reps} after 1 warm-up.")
    )
    if PG_SKIP:
        parts.append(f"prefix-grouper comparison skipped: {PG_SKIP}")
    t_start = time.perf_counter()
    if args.profile:
        P, C, G = (int(x) for x in args.profile.split(","))
        parts.append(bench_profile(P, C, G, device, layouts, log))
        args.skip = ["logprobs", "grpo", "prefill"]
    if "logprobs" not in args.skip:
        log("completion_logprobs fwd+bwd ...")
        grid = (
            [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
            if args.configs
            else GRIDS[args.grid]
        )
        parts += [
            "## completion_logprobs forward+backward",
            bench_logprobs(grid, device, args.reps, layouts, log, args.mem_warmup),
        ]
    if "grpo" not in args.skip:
        log("GRPO step ...")
        parts += ["## one GRPO training step (Trainer)", bench_grpo_step(device, args.reps, log)]
    if "prefill" not in args.skip:
        log("rollout prefill ...")
        parts += ["## rollout prefill (HFEngine.generate)", bench_prefill(device, args.reps, log)]
    load = os.getloadavg()
    parts.append(
        f"total {time.perf_counter() - t_start:.0f} s; load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
