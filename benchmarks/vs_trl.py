"""grouprl vs TRL's `GRPOTrainer` on the same GRPO work: step time, CPU time, memory.

Usage:
    python benchmarks/vs_trl.py [--prompt-lens 64 512 2048] [--completion-lens 32 256 1024]
        [--cells 64x32 512x256] [--repeats 2] [--steps 4] [--threads 2]
        [--omp-wait-policy passive|active|unset] [--malloc-mmap-threshold BYTES]
        [--time-budget 300] [--worker-timeout 900] [--grid-budget MINUTES]
        [--grouprl-src PATH] [--grouprl-set KEY=VALUE ...] [--out FILE.md]
    python benchmarks/vs_trl.py --learn [--learn-steps 30] [--learn-lr 2e-3]
        [--learn-seeds 0 1 2 3]
        [--prompt-lens 64] [--completion-lens 32] [--grouprl-src PATH] [--out FILE.md]

`--cells` picks cells (PxC) instead of the full prompt x completion grid. `--grouprl-src`
puts a grouprl source folder (e.g. an older checkout's `src`) first on the workers'
PYTHONPATH; each worker checks that `grouprl.__file__` lies under it. `--grouprl-set`
passes `section.key=value` overrides to the grouprl side (e.g. `model.shared_prefix=off`).
TRL is a benchmark-only extra: it is imported in the TRL worker and nowhere else.

The work, identical on both sides:
- Model: a Qwen2 with random weights (seed 0) built here from a config: hidden 256,
  4 layers, 4 heads / 2 KV heads, MLP 704, vocabulary 4096, tied embeddings, fp32, SDPA,
  saved once to a temp folder and loaded from it by both. Tokenizer: word level, one token
  per space-separated word `w<i>`; `<pad>` = 0 (an ordinary id of the model), and the EOS
  `<eos>` = 4096, one past the model's vocabulary, so the model can never sample it and
  every completion is exactly C tokens long. Both sides check, after every generation,
  that each of the 32 rows has exactly P prompt and C completion tokens (a worker fails
  loudly otherwise).
- Data: 64 prompts of P random word ids (seed 1000 + P); the decoded text re-encodes to the
  same P ids (checked). No shuffling on either side, so both see the same 4 prompts at
  each step.
- Step: 4 prompts x G=8 = 32 completions of exactly C tokens, sampled at temperature 1,
  top_p 1, no top-k; reward = the fraction of completion words `w<i>` with i % 4 == 0
  (the same function on both sides, run in the trainer's process); advantage = reward
  z-scored in its group; PPO-clip (eps 0.2) token-level ratio, beta = 0 (no reference
  model, no KL), one iteration, ONE AdamW step (lr 1e-6 constant, no warm-up, betas
  0.9/0.999, eps 1e-8, weight decay 0, grad-norm clip 1.0) per 32 completions, forward and
  backward in micro-batches of 8 rows.
- Aggregation: TRL `loss_type="dapo"` (sum of per-token terms over the whole generation
  batch / its token count) = grouprl `loss.aggregation: token_mean` (grouprl's default,
  `docs/from_trl.md`). Note: grouprl's `grpo` *recipe* uses `seq_mean_token_mean` (= TRL
  `loss_type="grpo"`, docs/methods.md); here every completion has the same length C, so all
  of these give the same gradient. grouprl runs without a recipe (its defaults).

TRL 1.16 settings changed from `GRPOConfig`'s defaults to do the same work:
- gradient checkpointing off (TRL's default is on; set as `activation_checkpointing=False`,
  transformers 5.24's name for `gradient_checkpointing`), `bf16=False` (default True: bf16
  autocast, also on CPU), `use_cpu=True` (the worker checks fp32 and no checkpointing);
- `per_device_train_batch_size=8`, `gradient_accumulation_steps=4`: TRL derives
  `steps_per_generation=4` and `generation_batch_size=32`, i.e. one generation of 32
  completions and one optimizer step per 4 micro-batches of 8 (with steps aligned, TRL
  skips the old-log-prob forward, as grouprl does with one iteration);
- `lr_scheduler_type="constant"` (default linear decay; grouprl's default is constant),
  `optim="adamw_torch"` (default `adamw_torch_fused`; grouprl uses torch's AdamW, foreach);
- `shuffle_dataset=False` (default True; grouprl's `data.shuffle` is set false too);
- `logging_strategy="no"`, `save_strategy="no"`, `report_to="none"`, `disable_tqdm=True`,
  `log_completions=False` (its default) -- no logging, saving or evaluation overhead;
- explicitly at their defaults: `beta=0`, `loss_type="dapo"`, `scale_rewards="group"`,
  `num_iterations=1`, `epsilon=0.2`, `mask_truncated_completions=False` (no completion is
  truncated by EOS anyway), `top_entropy_quantile=1`, `use_vllm=False`,
  `disable_dropout=False` (the model has no dropout), `max_grad_norm=1.0`,
  `weight_decay=0`, `warmup_steps=0`, `temperature=1`, `top_p=1`, `top_k=0`.
  TRL computes token entropies in its training forward (for logging); grouprl does too.
  TRL's advantage epsilon is 1e-4, grouprl's 1e-6.

grouprl settings: `rollout.engine: hf` (defaults: `share_prefill` on: each prompt is
prefilled once per group), `model.shared_prefix: auto` (prompt encoded once per group in
the training forward when the model passes its self-check; the report says which was used),
`model.dtype: float32`, `model.gradient_checkpointing: false`, `train.prompts_per_step: 4`,
`train.micro_batch_size: 8`, `train.num_iterations: 1`, `train.lr_schedule: constant`,
`train.save_every: 0` (the one end-of-run checkpoint is written after the last measured
step), `train.log_completions_every: 0`, `train.progress: false`, rewards with `timeout: 0`
(in-process, as TRL). grouprl always writes metrics.jsonl: that cost is in its step time.

Measurement: every (cell, side, repeat) runs in a fresh worker process (this script with
`--worker grouprl|trl`, result read back as JSON), alternating grouprl, TRL, grouprl, TRL,
... `--repeats` times per cell; workers get `torch.set_num_threads(--threads)`,
OMP_NUM_THREADS = --threads and OMP_WAIT_POLICY = `--omp-wait-policy` (default PASSIVE,
steadier on a shared machine, but it puts the OpenMP threads to sleep between parallel
regions: a decode loop of small ops then pays a wake-up per op, and both sides' generation
took ~2x longer than under `--omp-wait-policy unset`, the OpenMP runtime's own default);
`--malloc-mmap-threshold N` sets glibc's MALLOC_MMAP_THRESHOLD_ for both sides (default:
unset, glibc's dynamic threshold, under which freed activations stay in the process and the
peak creeps up over micro-batches).
Each worker runs up to `--steps` steps (the first is warm-up, not counted; a grouprl side with
`train.async=one_step` runs one more and drops its last, which samples nothing ahead and so
is shorter than a steady step: the "drain" step); it stops early
when its training time would pass `--time-budget` seconds (at least one measured step) and
is killed after `--worker-timeout` seconds (the cell then gets a row saying why, as does a
worker that fails). With `--grid-budget M`, a cell (cells run cheapest first, by P + C)
or a cell's next repeat starts only if the last pair of workers' time still fits in M
minutes (rows say so).
A step's wall and process CPU time run from the end of the previous step to the end of
this one (measured from a per-step callback on both sides, so each loop's own
bookkeeping is included). "gen" = grouprl's `time/collect` (sampling + reward)
or the time of TRL's `_generate_and_score_completions` (sampling, decoding, reward,
advantages); "update" = step - gen. Peak RSS = the worker's `ru_maxrss` (imports and model
included). Tokens/s = 32 * C completion tokens / step time.

`--learn`: a same-learning check, one cell (default P=64, C=32), `--learn-steps` steps at
`--learn-lr` (2e-3: on this model 1e-4 leaves the reward flat in 30 steps, 3e-3 saturates
it near 1 on both sides) on both sides, once per seed in `--learn-seeds` (`train.seed` /
`GRPOConfig.seed`: sampling differs between the sides anyway, and one run's reward curve
is noisy: over seeds 0-5 at 2e-3 the change was +0.39..+0.62 for grouprl and +0.46..+0.62
for TRL, the side ahead changing with the seed); prints the mean reward of the first 5
and the last 5 steps and the median pre-clip gradient norm of the first 5 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MODEL_VOCAB = 4096  # the model's vocabulary; the tokenizer has one more token, the EOS
PAD_ID, UNK_ID, FIRST_WORD = 0, 1, 2
G, PROMPTS_PER_STEP, MICRO_BATCH, NUM_PROMPTS = 8, 4, 8, 64
ROWS = G * PROMPTS_PER_STEP  # completions per step (one optimizer step)
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=MODEL_VOCAB,
    max_position_embeddings=4096,  # >= the largest P + C of the default grid (3072)
    tie_word_embeddings=True,
)


def forward_flops(tokens: float, pairs: float, head_tokens: float) -> float:
    """Matmul FLOPs of one forward of the benchmark's model: the layers' weights on `tokens`,
    attention scores and values on `pairs` (query, key) pairs, the LM head on `head_tokens`."""
    h, layers = MODEL_SHAPE["hidden_size"], MODEL_SHAPE["num_hidden_layers"]
    kv = h // MODEL_SHAPE["num_attention_heads"] * MODEL_SHAPE["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * MODEL_SHAPE["intermediate_size"]
    return (
        2 * layers * per_layer * tokens + 4 * layers * h * pairs + 2 * h * MODEL_VOCAB * head_tokens
    )


def work_ratio(P: int, C: int) -> float:
    """grouprl's matmul FLOPs over TRL's for one step of the same work (forward of the sampled
    tokens, then forward + backward of the update, ~3x a forward, the same factor on both
    sides): each prompt encoded once per group (sampling and update) against once per
    completion. A step ratio under it means grouprl runs its arithmetic faster per FLOP than
    TRL runs its own (less overhead), not that it does less of it."""
    B = PROMPTS_PER_STEP
    decode_pairs = ROWS * (C * P + C * (C + 1) / 2)  # completion tokens over [prompt; own past]
    prompt_pairs = P * (P + 1) / 2
    shared = forward_flops(B * P + ROWS * C, B * prompt_pairs + decode_pairs, ROWS * C)
    repeated = forward_flops(ROWS * (P + C), ROWS * prompt_pairs + decode_pairs, ROWS * C)
    return shared / repeated


# ----------------------------------------------------------------------------- shared pieces

_REWARD_MEANS: list[float] = []  # one entry per reward call (= per step on both sides)


def target_word(word: str) -> bool:
    """The reward's word subset: `w<i>` with i % 4 == 0 (a quarter of the vocabulary)."""
    return word.startswith("w") and word[1:].isdigit() and int(word[1:]) % 4 == 0


def subset_reward(completions, **kwargs):
    """Fraction of a completion's words in the target subset (identical on both sides)."""
    out = []
    for text in completions:
        words = str(text).split()
        out.append(sum(target_word(w) for w in words) / max(1, len(words)))
    _REWARD_MEANS.append(sum(out) / max(1, len(out)))
    return out


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<unk>": UNK_ID}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, MODEL_VOCAB)})
    vocab["<eos>"] = MODEL_VOCAB  # outside the model's vocabulary: never sampled
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def build_model_dir(out: Path) -> Path:
    """The tiny Qwen2 (random weights, seed 0) and its tokenizer, saved to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer()
    assert len(tok) == MODEL_VOCAB + 1 and tok.eos_token_id == MODEL_VOCAB
    cfg = AutoConfig.for_model(
        "qwen2",
        **MODEL_SHAPE,
        pad_token_id=PAD_ID,
        eos_token_id=MODEL_VOCAB,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = MODEL_VOCAB
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_prompts(model_dir: Path, prompt_len: int, out: Path) -> Path:
    """NUM_PROMPTS prompts of exactly `prompt_len` random word ids; fails if one does not
    re-encode to its ids."""
    import torch
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(1000 + prompt_len)
    ids = torch.randint(FIRST_WORD, MODEL_VOCAB, (NUM_PROMPTS, prompt_len), generator=g)
    texts = []
    for row in ids.tolist():
        text = tok.decode(row)
        back = tok(text, add_special_tokens=True)["input_ids"]
        if back != row:
            raise SystemExit(
                f"prompt check failed: a {prompt_len}-token prompt re-encodes to {len(back)} "
                "tokens (or other ids)"
            )
        texts.append(text)
    out.write_text(json.dumps(texts))
    return out


def load_tokenizer(model_dir: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tok.padding_side = "left"
    tok.truncation_side = "left"
    return tok


def check_lengths(side: str, rows: int, prompt_lens, completion_lens, P: int, C: int) -> None:
    """Every sample of a generation: exactly P prompt and C completion tokens."""
    p, c = sorted(set(prompt_lens)), sorted(set(completion_lens))
    if rows != ROWS or p != [P] or c != [C]:
        raise RuntimeError(
            f"{side}: length check failed: {rows} rows (want {ROWS}), prompt lengths {p} "
            f"(want [{P}]), completion lengths {c} (want [{C}])"
        )


# ----------------------------------------------------------------------------- workers


class StepClock:
    """Wall / CPU time at each step end; `gen` seconds per step from the side's own split."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.start = time.perf_counter()
        self.last = (self.start, time.process_time())
        self.steps: list[dict[str, float]] = []

    def tick(self, gen: float) -> bool:
        """Record a finished step; True when the next step would pass the time budget."""
        now = (time.perf_counter(), time.process_time())
        wall, cpu = now[0] - self.last[0], now[1] - self.last[1]
        self.steps.append({"wall": wall, "cpu": cpu, "gen": gen})
        self.last = now
        return len(self.steps) >= 2 and now[0] - self.start + wall > self.budget


def run_grouprl(args, prompts: list[str]) -> dict:
    import grouprl
    from grouprl.training.trainer import Trainer

    src = Path(grouprl.__file__).resolve()
    if args.grouprl_src and not src.is_relative_to(Path(args.grouprl_src).resolve()):
        raise SystemExit(f"grouprl imported from {src}, not from --grouprl-src {args.grouprl_src}")
    P, C = args.prompt_len, args.completion_len
    cfg = {
        "model": {
            "name_or_path": args.model_dir,
            "dtype": "float32",
            "device": "cpu",
            "gradient_checkpointing": False,
        },
        "data": {"max_prompt_length": P, "shuffle": False, "chat_template": "never"},
        "rollout": {
            "engine": "hf",
            "num_generations": G,
            "max_new_tokens": C,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
        },
        "advantage": {"name": "grpo", "scale": "group"},
        "loss": {"name": "ppo_clip", "eps_low": 0.2, "eps_high": 0.2, "aggregation": "token_mean"},
        "regularizers": [],
        "train": {
            "output_dir": str(Path(args.work) / "grouprl-run"),
            "seed": args.seed,
            "max_steps": args.steps,
            "prompts_per_step": PROMPTS_PER_STEP,
            "micro_batch_size": MICRO_BATCH,
            "num_iterations": 1,
            "learning_rate": args.lr,
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "save_every": 0,
            "log_completions_every": 0,
            "progress": False,
            "overwrite": True,
        },
    }
    rows = [{"prompt": p} for p in prompts]
    reward = [{"fn": subset_reward, "timeout": 0}]
    with Trainer(cfg, train_dataset=rows, reward_funcs=reward, overrides=args.grouprl_set) as tr:
        engine = tr.engine
        generate = engine.generate

        def checked_generate(texts, params):
            ro = generate(texts, params)
            check_lengths(
                "grouprl",
                ro.prompt_mask_NP.shape[0],
                ro.prompt_mask_NP.sum(1).long().tolist(),
                ro.attention_mask_NT.sum(1).long().tolist(),
                P,
                C,
            )
            return ro

        engine.generate = checked_generate
        clock = StepClock(args.time_budget)
        overlaps = tr.pipeline.overlaps
        if overlaps:  # one step more: the last one samples nothing ahead (dropped, "drain")
            tr.cfg.train.max_steps += 1

        def on_step(step: int, metrics: dict) -> None:
            if clock.tick(float(metrics["time/collect"])):
                tr.cfg.train.max_steps = step  # the loop ends after this step
            clock.steps[-1]["drain"] = overlaps and not tr.pipeline.holds_next
            clock.steps[-1]["reward"] = _REWARD_MEANS[-1] if _REWARD_MEANS else float("nan")
            clock.steps[-1]["grad_norm"] = float(metrics["grad_norm"])

        tr.callbacks.append(on_step)
        setup = clock.start - START
        tr.train()
        shared = tr.shared_prefix
    return {
        "steps": clock.steps,
        "setup_s": setup,
        "grouprl_file": str(src),
        "shared_prefix": shared,
    }


def run_trl(args, prompts: list[str]) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    P, C = args.prompt_len, args.completion_len
    config = GRPOConfig(
        output_dir=str(Path(args.work) / "trl-run"),
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ROWS // MICRO_BATCH,  # -> steps_per_generation 4, 32 rows
        num_generations=G,
        max_completion_length=C,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        epsilon=0.2,
        mask_truncated_completions=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # 5.24's name of gradient_checkpointing
        use_cpu=True,
        shuffle_dataset=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"},
    )
    assert config.steps_per_generation == 4 and config.generation_batch_size == ROWS
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    clock = StepClock(args.time_budget)
    gen_s, grad_norm = [0.0], [float("nan")]

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if clock.tick(gen_s[0]):
                control.should_training_stop = True
            clock.steps[-1]["reward"] = _REWARD_MEANS[-1] if _REWARD_MEANS else float("nan")
            clock.steps[-1]["grad_norm"] = grad_norm[0]
            gen_s[0] = 0.0

    trainer = GRPOTrainer(
        model=args.model_dir,
        reward_funcs=subset_reward,
        args=config,
        train_dataset=dataset,
        processing_class=load_tokenizer(args.model_dir),
        callbacks=[Clock()],
    )
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        gen_s[0] += time.perf_counter() - t0
        check_lengths(
            "trl",
            out["prompt_mask"].shape[0],
            out["prompt_mask"].sum(1).tolist(),
            out["completion_mask"].sum(1).tolist(),
            P,
            C,
        )
        return out

    trainer._generate_and_score_completions = timed_generate
    clip = trainer._clip_grad_norm

    def recorded_clip(model):
        norm = clip(model)
        grad_norm[0] = float(norm)
        return norm

    trainer._clip_grad_norm = recorded_clip
    p0 = next(trainer.model.parameters())
    if config.gradient_checkpointing or config.bf16 or p0.dtype != torch.float32:
        raise SystemExit(f"TRL not in fp32 without checkpointing: {config}")
    clock.start = time.perf_counter()
    clock.last = (clock.start, time.process_time())
    setup = clock.start - START
    trainer.train()
    return {"steps": clock.steps, "setup_s": setup}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    prompts = json.loads(Path(args.prompts_file).read_text())
    run = run_grouprl if args.worker == "grouprl" else run_trl
    out = run(args, prompts)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads"] = torch.get_num_threads()
    out["side"] = args.worker
    Path(args.result).write_text(json.dumps(out))


START = time.perf_counter()

# ----------------------------------------------------------------------------- the parent


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(path: str) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return f"commit {head}" + (" + uncommitted changes" if dirty else " (clean)")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def run_worker(
    side: str,
    args,
    work: Path,
    model_dir: Path,
    P: int,
    C: int,
    steps: int,
    lr: float,
    seed: int = 0,
):
    """One fresh worker process; returns (result dict or None, why it failed)."""
    tag = f"{side}-P{P}-C{C}-{time.monotonic_ns()}"
    result, log = work / f"{tag}.json", work / f"{tag}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--model-dir",
        str(model_dir),
        "--prompts-file",
        str(work / f"prompts_{P}.json"),
        "--prompt-len",
        str(P),
        "--completion-len",
        str(C),
        "--steps",
        str(steps),
        "--lr",
        repr(lr),
        "--seed",
        str(seed),
        "--threads",
        str(args.threads),
        "--time-budget",
        str(args.time_budget),
        "--result",
        str(result),
        "--work",
        str(work / tag),
    ]
    if args.grouprl_src:
        cmd += ["--grouprl-src", args.grouprl_src]
    for item in args.grouprl_set:
        cmd += ["--grouprl-set", item]
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if getattr(args, "malloc_mmap_threshold", None):
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    if args.grouprl_src:
        env["PYTHONPATH"] = os.pathsep.join(
            [args.grouprl_src, *filter(None, [env.get("PYTHONPATH")])]
        )
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"{side} worker passed --worker-timeout {args.worker_timeout:.0f} s"
    took = time.perf_counter() - t0
    if rc != 0 or not result.is_file():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        why = " / ".join(tail)[-300:].replace("|", "/")
        return None, f"{side} worker failed (exit {rc}): {why}"
    out = json.loads(result.read_text())
    out["worker_s"] = took
    print(
        f"  {side:7s} P={P} C={C}: {len(out['steps'])} steps, step s "
        + " ".join(f"{s['wall']:.2f}" for s in out["steps"])
        + f" (worker {took:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return out, ""


def header(args, title: str) -> list[str]:
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    src = args.grouprl_src or "(the installed grouprl)"
    return [
        f"# {title}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {args.threads} torch threads per "
        f"worker, OMP_WAIT_POLICY {args.omp_wait_policy}, MALLOC_MMAP_THRESHOLD_ "
        f"{getattr(args, 'malloc_mmap_threshold', None) or 'unset'}, load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"Python {platform.python_version()}, torch {pkg_version('torch')}, transformers "
        f"{pkg_version('transformers')}, trl {pkg_version('trl')}, tokenizers "
        f"{pkg_version('tokenizers')}",
        "",
        f"grouprl source: {src}"
        + (f" ({git_state(args.grouprl_src)})" if args.grouprl_src else ""),
    ]


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if x == x else "-"


def measured(steps: list[dict], skip: int = 1) -> list[dict]:
    """The steps that count: the first `skip` (warm-up) and a drain step left out."""
    return [s for s in steps[skip:] if not s.get("drain")]


def summarize(results: list[dict]) -> dict:
    """Measured steps (warm-up and drain dropped) of all repeats of one side of one cell."""
    steps = [s for r in results for s in measured(r["steps"])]
    med = statistics.median
    return {
        "n": len(steps),
        "wall": [s["wall"] for s in steps],
        "gen": med(s["gen"] for s in steps),
        "update": med(s["wall"] - s["gen"] for s in steps),
        "cpu": med(s["cpu"] for s in steps),
        "cpu_ratio": med(s["cpu"] / s["wall"] for s in steps),
        "rss": max(r["peak_rss_mib"] for r in results),
        "per_repeat": [med(s["wall"] for s in measured(r["steps"])) for r in results],
    }


def grid(args) -> str:
    cells = (
        [tuple(int(x) for x in c.lower().split("x")) for c in args.cells]
        if args.cells
        else [(p, c) for p in args.prompt_lens for c in args.completion_lens]
    )
    cells.sort(key=lambda pc: (pc[0] + pc[1], pc[1]))
    work = Path(tempfile.mkdtemp(prefix="grouprl-vs-trl-"))
    model_dir = build_model_dir(work / "model")
    for P in sorted({p for p, _ in cells}):
        write_prompts(model_dir, P, work / f"prompts_{P}.json")
    lines = header(args, "grouprl vs TRL GRPOTrainer, same work")
    lines += [
        "",
        f"Per step: {PROMPTS_PER_STEP} prompts x G={G} = {ROWS} completions of exactly C tokens, "
        f"one optimizer step, micro-batch {MICRO_BATCH}, fp32, lr {args.lr:g}; {args.steps} steps "
        f"per worker (first = warm-up, dropped; fewer when a worker reaches --time-budget "
        f"{args.time_budget:.0f} s), {args.repeats} fresh workers per side, alternating. "
        "Times in seconds per step; n = measured steps over all repeats.",
        "",
        "| P | C | side | n | step s min / med / max | gen s | update s | CPU s/step "
        "| CPU/wall | compl. tok/s | peak RSS MiB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = [
        "",
        "grouprl / TRL (below 1: grouprl faster). Pair ratio = the two workers of one repeat, "
        "median step each. work = grouprl's matmul FLOPs over TRL's for the step (`work_ratio`: "
        "the prompt encoded once per group instead of once per completion).",
        "",
        "| P | C | step med/med | pair ratio min / med / max | gen | update | CPU s/step "
        "| peak RSS | work |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    t_start, last_pair = time.perf_counter(), 0.0
    for P, C in cells:
        elapsed = (time.perf_counter() - t_start) / 60
        # cells run cheapest first: one that starts later costs at least the last pair's time
        if args.grid_budget and elapsed + last_pair / 60 > args.grid_budget:
            why = (
                f"skipped: --grid-budget {args.grid_budget:g} min ({elapsed:.0f} min used, the "
                f"previous cell's pair of workers took {last_pair / 60:.1f} min)"
            )
            lines.append(f"| {P} | {C} | both | 0 | {why} | | | | | | | |")
            ratios.append(f"| {P} | {C} | {why} | | | | | | |")
            continue
        print(f"cell P={P} C={C}", file=sys.stderr, flush=True)
        res: dict[str, list[dict]] = {"grouprl": [], "trl": []}
        failure = ""
        pair_time = 0.0
        for r in range(args.repeats):
            pair_start = time.perf_counter()
            if r and args.grid_budget:  # another pair would pass the grid budget
                left = args.grid_budget * 60 - (pair_start - t_start)
                if left < pair_time:
                    failure = f"--grid-budget {args.grid_budget:g} min"
                    break
            for side in ("grouprl", "trl"):
                out, why = run_worker(side, args, work, model_dir, P, C, args.steps, args.lr)
                if out is None:
                    failure = why
                    break
                res[side].append(out)
            if failure:
                break
            pair_time = last_pair = time.perf_counter() - pair_start
        n_pairs = min(len(res["grouprl"]), len(res["trl"]))
        if failure and n_pairs == 0:
            lines.append(f"| {P} | {C} | both | 0 | not run: {failure} | | | | | | | |")
            ratios.append(f"| {P} | {C} | not run: {failure} | | | | | | |")
            print(f"  {failure}", file=sys.stderr, flush=True)
            continue
        summ = {side: summarize(res[side][:n_pairs]) for side in res}
        for side in ("grouprl", "trl"):
            s = summ[side]
            notes = []
            if side == "grouprl":
                sp = {r["shared_prefix"] for r in res[side]}
                notes.append(
                    f"shared prefix {'on' if sp == {True} else 'off' if sp == {False} else sp}"
                )
            if failure:
                notes.append(f"{n_pairs} of {args.repeats} repeats; then {failure}")
            w = s["wall"]
            med = statistics.median(w)
            lines.append(
                f"| {P} | {C} | {side} | {s['n']} | {fmt(min(w))} / {fmt(med)} / {fmt(max(w))} "
                f"| {fmt(s['gen'])} | {fmt(s['update'])} | {fmt(s['cpu'])} | {fmt(s['cpu_ratio'])} "
                f"| {ROWS * C / med:.0f} | {s['rss']:.0f} | {'; '.join(notes)} |"
            )
        g, t = summ["grouprl"], summ["trl"]
        pairs = sorted(a / b for a, b in zip(g["per_repeat"], t["per_repeat"], strict=True))
        ratios.append(
            f"| {P} | {C} | {statistics.median(g['wall']) / statistics.median(t['wall']):.2f} "
            f"| {min(pairs):.2f} / {statistics.median(pairs):.2f} / {max(pairs):.2f} "
            f"| {g['gen'] / t['gen']:.2f} | {g['update'] / t['update']:.2f} "
            f"| {g['cpu'] / t['cpu']:.2f} | {g['rss'] / t['rss']:.2f} | {work_ratio(P, C):.2f} |"
        )
    total = (time.perf_counter() - t_start) / 60
    return "\n".join(lines + ratios + ["", f"Grid wall time: {total:.1f} min."])


def learn(args) -> str:
    P, C = args.prompt_lens[0], args.completion_lens[0]
    work = Path(tempfile.mkdtemp(prefix="grouprl-vs-trl-learn-"))
    model_dir = build_model_dir(work / "model")
    write_prompts(model_dir, P, work / f"prompts_{P}.json")
    args.time_budget = float("inf")
    lines = header(args, "grouprl vs TRL GRPOTrainer, same-learning check")
    lines += [
        "",
        f"P={P}, C={C}, {args.learn_steps} steps of {ROWS} completions, lr {args.learn_lr:g} "
        "(constant), otherwise the settings of the timing grid. Reward = fraction of completion "
        "words in the target quarter of the vocabulary (about 0.25 for a uniform sampler).",
        "",
        "| side | seed | reward, steps 1-5 | reward, last 5 | change | grad norm, steps 1-5 "
        "(median) | per-step rewards | worker s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    changes: dict[str, list[float]] = {"grouprl": [], "trl": []}
    for seed in args.learn_seeds:
        for side in ("grouprl", "trl"):
            out, why = run_worker(
                side, args, work, model_dir, P, C, args.learn_steps, args.learn_lr, seed
            )
            if out is None:
                lines.append(f"| {side} | {seed} | not run: {why} | | | | | |")
                continue
            r = [s["reward"] for s in out["steps"]]
            first, last = statistics.mean(r[:5]), statistics.mean(r[-5:])
            changes[side].append(last - first)
            gn = statistics.median(s["grad_norm"] for s in out["steps"][:5])
            lines.append(
                f"| {side} | {seed} | {first:.3f} | {last:.3f} | {last - first:+.3f} | {gn:.3g} "
                f"| {' '.join(f'{x:.2f}' for x in r)} | {out['worker_s']:.0f} |"
            )
    for side, ch in changes.items():
        if ch:
            lines.append(f"| {side} | mean of {len(ch)} | | | {statistics.mean(ch):+.3f} | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--completion-lens", type=int, nargs="+", default=[32, 256, 1024])
    ap.add_argument("--cells", nargs="+", help="PxC cells instead of the full grid, e.g. 64x32")
    ap.add_argument("--repeats", type=int, default=2, help="fresh workers per side and cell")
    ap.add_argument("--steps", type=int, default=4, help="steps per worker, first = warm-up")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "unset"],
        default="passive",
        help="OMP_WAIT_POLICY of the workers (unset: the OpenMP runtime's default)",
    )
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        help="glibc's MALLOC_MMAP_THRESHOLD_ for both sides' workers, in bytes (0: unset, "
        "glibc's dynamic threshold); allocations above it are returned to the system on free",
    )
    ap.add_argument(
        "--time-budget", type=float, default=300.0, help="a worker stops stepping past this (s)"
    )
    ap.add_argument("--worker-timeout", type=float, default=900.0, help="a worker is killed (s)")
    ap.add_argument("--grid-budget", type=float, help="minutes; later cells are skipped")
    ap.add_argument("--grouprl-src", help="grouprl source folder put first on the workers' path")
    ap.add_argument("--grouprl-set", action="append", default=[], help="grouprl override")
    ap.add_argument("--learn", action="store_true", help="the same-learning check instead")
    ap.add_argument("--learn-steps", type=int, default=30)
    ap.add_argument("--learn-lr", type=float, default=2e-3)
    ap.add_argument("--learn-seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one run each")
    ap.add_argument("--out", help="also write the Markdown here")
    # worker-only arguments
    ap.add_argument("--worker", choices=["grouprl", "trl"], help=argparse.SUPPRESS)
    for name in ("--model-dir", "--prompts-file", "--result", "--work"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--completion-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grouprl_src:
        args.grouprl_src = str(Path(args.grouprl_src).resolve())
    if args.worker:
        worker(args)
        return
    table = learn(args) if args.learn else grid(args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
