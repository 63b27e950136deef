"""Dataclass configs, YAML loading, recipes and `section.key=value` overrides.

Resolution order (later wins): dataclass defaults < recipe YAML < user YAML < command-line
overrides. Every key is checked at start-up: an unknown key or a value of the wrong type
fails with the key's dotted name and, for typos, a "did you mean" suggestion.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from grouprl.registry import did_you_mean


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""

    def __init__(self, message: object = "", *args: object) -> None:
        # A key or value may hold lone surrogates (a YAML "\ud800" escape): escape them so
        # that the message can always be printed and logged.
        if isinstance(message, str):
            message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message, *args)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 core-schema scalars; PyYAML implements YAML 1.1, where `on`, `off`, `yes`,
    `no` are booleans (so `model.shared_prefix: on` read as True), `1e-6` is a string,
    `010` is octal 8, `1:30` is 90 and `2024-01-01` a date. Here only true/false are
    booleans, `1e-6` is a float, `010` is 10, and the others are strings."""


class _Dumper(yaml.SafeDumper):
    """Quotes exactly the strings `_Loader` would read as something else (e.g. `1e5`)."""


_YAML11_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}
_YAML12_SCALARS = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        "-+0123456789.",
    ),
]
for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_TAGS]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for _tag, _rx, _first in _YAML12_SCALARS:
        _cls.add_implicit_resolver(_tag, re.compile(_rx, re.X), list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    # YAML 1.2: 0o17 and 0x1F have bases; a leading zero is still decimal (010 = 10)
    return int(text, 0) if text[:2].lower() in ("0o", "0x", "0b") else int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def choice(default: Any, *choices: Any, doc: str = "", key: str = "") -> Any:
    """A field with a fixed set of values; `key` is its name in YAML when that name is a
    Python keyword (`train.async` is the field `async_`)."""
    meta: dict[str, Any] = {"choices": choices, "doc": doc}
    if key:
        meta["key"] = key
    return field(default=default, metadata=meta)


def config_key(f: dataclasses.Field) -> str:
    """A config field's name in YAML, overrides and messages (its `key`, else its name)."""
    return f.metadata.get("key", f.name)


# train.lr_schedule values built by transformers' `get_scheduler` (its warm-up starts at
# learning rate 0; grouprl's own constant and cosine count the first update as 1/W)
HF_SCHEDULES = (
    "linear",
    "cosine_with_min_lr",
    "cosine_with_restarts",
    "polynomial",
    "constant_with_warmup",
    "inverse_sqrt",
    "warmup_stable_decay",
)


@dataclass
class ModelConfig:
    name_or_path: str = ""  # HF hub id or local directory
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: str = choice("auto", "auto", "float32", "bfloat16", "float16")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    # Prefix Grouper: encode each prompt once per group in training (exact same gradients).
    # auto = on when a quick self-check passes on this model, else off with a one-line reason.
    shared_prefix: str = choice("auto", "auto", "on", "off")
    # attention of the packed layout: two_part (prompt once, then each completion against
    # [prompt; itself]; default off CUDA), flex (block-sparse; default on CUDA), sdpa (dense)
    shared_prefix_backend: str = choice("auto", "auto", "two_part", "sdpa", "flex")
    # positions per LM-head chunk (fp32 logits of one chunk at a time); 0 = 64 MiB of logits
    logprob_chunk_size: int = 0
    # LoRA through PEFT (models/lora.py): {r, alpha, dropout, target_modules,
    # modules_to_save, quantize}; empty = full fine-tuning
    lora: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    path: str | None = None  # jsonl / json / parquet / save_to_disk directory
    task: str | None = None  # or a built-in offline task (e.g. "arith")
    task_params: dict[str, Any] = field(default_factory=dict)
    # read data.path / data.eval_path with a benchmark loader (medqa, medmcqa, medxpertqa)
    benchmark: str | None = None
    benchmark_params: dict[str, Any] = field(default_factory=dict)
    eval_path: str | None = None
    prompt_column: str = "prompt"
    max_prompt_length: int = 512
    on_bad_row: str = choice("error", "error", "skip")
    chat_template: str = choice("auto", "auto", "never")
    system_prompt: str | None = None
    split: str = "train"
    shuffle: bool = True
    # a step may hold the same prompt twice only when train.prompts_per_step > dataset size
    # is asked for explicitly
    allow_repeats: bool = False
    # multi-turn rollouts: {name: tools, tools: [calculator, "my_tools.py:search"], ...}, an
    # ENVIRONMENTS entry and its parameters (grouprl/envs, docs/environments.md)
    environment: dict[str, Any] | None = None
    # which prompts a step draws, and how many rollouts each gets: {name: uniform | vas |
    # cures | vade | spo_priority | hard_mining | knapsack | xrpo_alloc | cures_alloc,
    # params...} (data/samplers.py; per-prompt state saved in checkpoints)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "uniform"})


@dataclass
class RolloutConfig:
    engine: str = "hf"
    num_generations: int = 8  # G, completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    num_train_samples: int = 0  # train on the first k of each group's G samples (TTRL); 0 = all
    share_prefill: bool = True  # prefill each prompt once and reuse its KV cache for the G samples
    # engine hf: shared = the G samples read one copy of their prompt's KV, cache preallocated,
    # finished rows dropped (rollout/decode.py); generate = HF generate; auto = shared when
    # its probe passes on the model
    decoder: str = choice("auto", "auto", "shared", "generate")
    # how the shared decoder draws a token: inverse_cdf = one uniform per row looked up in the
    # cumulative distribution (CPU: 14-19x faster than multinomial per step); multinomial =
    # HF's draw, the same samples as `generate` for a seed. `generate` always draws HF's way.
    draw: str = choice("inverse_cdf", "inverse_cdf", "multinomial")
    # importance weights for a sampler whose log-probs differ from the trainer's (vLLM):
    # {name: auto | none | tis | seq_tis | seq_mask, cap: C}; auto = the engine's default
    mismatch_correction: dict[str, Any] = field(default_factory=lambda: {"name": "auto"})
    # engine vllm: {mode: colocate | server, server_url, gpu_memory_utilization, ...}; the
    # keys and their defaults: grouprl.rollout.vllm_common.VLLMSettings, docs/scaling.md
    vllm: dict[str, Any] = field(default_factory=dict)
    # with data.environment: model turns per trajectory, and completion tokens per trajectory
    # (its turns and observations; 0 = max_turns x max_new_tokens)
    max_turns: int = 4
    max_total_tokens: int = 0
    # what happens between sampling and planning: {name: plain | scaf_hints | sage_hints |
    # icl_seed | igrpo | dataset_reset | serial_exit | segment_mc, params...}
    # (training/strategies/: e.g. hinted re-sampling of failed groups)
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "plain"})


@dataclass
class TrainConfig:
    output_dir: str = "runs/grouprl"
    seed: int = 0
    max_steps: int = 100
    prompts_per_step: int = 8  # B; the optimizer batch is B*G completions
    micro_batch_size: int = 16  # completions per forward/backward
    # or a token budget per forward/backward (padded tokens; whole groups with the shared
    # prefix); 0 = use micro_batch_size. Either way the gradient is the whole batch's.
    micro_batch_tokens: int = 0
    num_iterations: int = 1  # optimizer steps per rollout batch (PPO epochs, mu)
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # constant and cosine (linear warm-up from 1/W); or one of transformers' schedules built
    # by its get_scheduler (warm-up from 0), with lr_schedule_kwargs (e.g. min_lr_rate)
    lr_schedule: str = choice("constant", "constant", "cosine", *HF_SCHEDULES)
    lr_schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    save_every: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    # an output_dir holding an earlier run: moved aside to <output_dir>.old-<time> first
    overwrite: bool = False
    # stop the run when one reward function fails (error, timeout) on more than this share
    # of its samples over its last reward_failure_window calls (1.0 = never stop)
    reward_failure_limit: float = 0.5
    reward_failure_window: int = 20
    # a weighted reward that is None / failed for a sample: skip (TRL's nansum: left out of
    # the sum; the sample is unscorable only when every weighted reward is) or unscorable
    missing_rewards: str = choice("skip", "skip", "unscorable")
    # stop (with a checkpoint) after this many consecutive steps in which no sample had a
    # reward; 0 = never
    nan_reward_steps: int = 3
    # every N steps, the step's prompts, completions, rewards and advantages go to
    # completions.jsonl (and TensorBoard's text tab); 0 = never
    log_completions_every: int = 10
    tensorboard: bool = False
    # where metrics go besides metrics.jsonl: tensorboard, trackio, wandb (optional extras)
    report_to: list[str] = field(default_factory=list)
    report_project: str = "grouprl"  # the trackio / wandb project
    # several processes under torchrun (training/parallel.py, docs/scaling.md): auto = ddp
    # when WORLD_SIZE > 1; fsdp2 shards weights, gradients and optimizer state
    strategy: str = choice("auto", "auto", "single", "ddp", "fsdp2")
    progress: bool = True
    collapse_monitor: str = choice("auto", "auto", "on", "off")  # auto: on with majority_vote
    stop_on_collapse: bool = False
    # held-out evaluation every N steps (0 = never); needs data.eval_path or data.task
    eval_every: int = 0
    eval_samples: int = 4  # samples per held-out problem (pass@1 over them, and pass@n / maj@n)
    eval_limit: int = 200  # held-out problems per evaluation (0 = all)
    # one_step: the next step's batch is sampled (from the weights before this step's update)
    # while this step trains, its staleness corrected by rollout.mismatch_correction
    # (training/pipeline.py); off: sample, then train, exactly as one process in order
    async_: str = choice("off", "off", "one_step", key="async")
    # an EMA copy of the policy (GRPO-CARE's reference): {decay: 0.995, every: 10,
    # answer_tag: "<answer>"}; it scores each completion's answer given its reasoning and
    # passes the result to the rewards as the `care_consistency` column (training/ema.py)
    ema_reference: dict[str, Any] | None = None


@dataclass
class Config:
    recipe: str | None = None
    # (not a field) values of the recipe the user's config changed: set by load_config
    recipe_overrides: ClassVar[dict[str, tuple[Any, Any]]] = {}
    trl_mappings: ClassVar[list[str]] = []  # (not a field) TRL names it translated
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[Any] = field(default_factory=list)  # [{name|path, weight, params}] or names
    advantage: dict[str, Any] = field(default_factory=lambda: {"name": "grpo"})
    loss: dict[str, Any] = field(
        default_factory=lambda: {"name": "ppo_clip", "aggregation": "token_mean"}
    )
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    token_mask: dict[str, Any] | None = None  # e.g. {name: forking_tokens, rho: 0.2}
    sample_filters: list[dict[str, Any]] = field(
        default_factory=list
    )  # e.g. [{name: dynamic_sampling}]
    extra_rewards: list[Any] = field(
        default_factory=list
    )  # recipe-level shaping, added to `rewards`
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the YAML key names (what `load_config` reads back)."""
        return _as_dict(self)


def _as_dict(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {config_key(f): _as_dict(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _as_dict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_as_dict(v) for v in x)
    return copy.deepcopy(x)


# ---------------------------------------------------------------------------- recipes


def recipe_names() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in resources.files("grouprl.recipes").iterdir()
        if p.name.endswith(".yaml")
    )


def load_recipe(name: str) -> dict[str, Any]:
    names = recipe_names()
    if not isinstance(name, str):
        raise ConfigError(
            f"recipe: expected a recipe name, got {name!r}; known: {', '.join(names)}"
        )
    if name not in names:
        raise ConfigError(
            f"recipe: unknown recipe {name!r}{did_you_mean(name, names)}; known: {', '.join(names)}"
        )
    text = resources.files("grouprl.recipes").joinpath(f"{name}.yaml").read_text()
    data = yaml_load(text) or {}
    for key in RECIPE_META:
        data.pop(key, None)
    return data


RECIPE_META = ("description", "changes", "source", "confidence")


def recipe_info(name: str) -> dict[str, str]:
    """A recipe's metadata: description, what it changes, source paper, confidence."""
    load_recipe(name)  # validates the name
    data = yaml_load(resources.files("grouprl.recipes").joinpath(f"{name}.yaml").read_text()) or {}
    return {k: str(data.get(k, "")) for k in RECIPE_META}


# ---------------------------------------------------------------------------- merging


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return base updated by over; nested dicts merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            # A component section that names a different component starts afresh.
            if "name" in val and val.get("name") != out[key].get("name"):
                out[key] = copy.deepcopy(val)
            else:
                out[key] = deep_merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.learning_rate=3e-4' -> (['train', 'learning_rate'], 0.0003)."""
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r} is not a string of the form section.key=value")
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except Exception as exc:  # YAMLError, or a ValueError of a tag such as `!!int x`
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    if value in (None, "") and raw.strip()[:1] in _SWALLOWED:
        # YAML reads `|` and `>` as empty block scalars, `#...` as a comment and `&a` as an
        # anchor of nothing: a user who typed such a character meant that character
        value = raw.strip()
    return key.split("."), value


# first characters with which YAML turns a typed value into nothing
_SWALLOWED = ("|", ">", "#", "&")


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(path[:i])} is {node!r}, not a section")
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, ".".join(path))] = value
    elif isinstance(node, dict):
        if last == "name" and node.get("name") not in (None, value):
            # another component: the old one's parameters do not carry over (as in YAML merges)
            keep = {k: node[k] for k in ("aggregation", "modifiers") if k in node}
            node.clear()
            node.update(keep)
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(path)}: {'.'.join(path[:-1])} is not a section")


def _index(part: str, node: list, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"{where}: list index {part!r} out of range (length {len(node)})")
    return int(part)


# ---------------------------------------------------------------------------- validation


_WORDS = ("on", "off", "yes", "no", "y", "n")  # YAML 1.1 booleans, strings here


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_check_value(f"{key}.{i}", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            hint = " (only true and false are booleans)" if str(value).lower() in _WORDS else ""
            raise ConfigError(f"{key}: expected true or false, got {value!r}{hint}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _key_name(key: Any) -> str:
    """A key as a part of a dotted path; quoted when it is empty, not a string, or holds
    spaces, dots, colons or quotes (so the message's key stays readable)."""
    if isinstance(key, str) and re.fullmatch(r"[^\s.:'\"]+", key):
        return key
    return repr(key)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {config_key(f): f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{_key_name(key)}" if prefix else _key_name(key)
        if key not in fields:
            from grouprl.trl_names import trl_hint

            raise ConfigError(
                f"{dotted}: unknown key{trl_hint(str(key)) or did_you_mean(str(key), list(fields))}; "
                f"known keys{' of ' + prefix if prefix else ''}: {', '.join(fields)}"
            )
        tp = hints[fields[key].name]
        if dataclasses.is_dataclass(tp):
            kwargs[fields[key].name] = _build(tp, value if value is not None else {}, dotted)
            continue
        choices = fields[key].metadata.get("choices")
        if choices and isinstance(value, bool):
            raise ConfigError(
                f"{dotted}: expected one of {', '.join(map(str, choices))}, got the boolean "
                f"{value}; a YAML 1.1 loader (yaml.safe_load) reads unquoted on/off/yes/no as "
                "booleans: quote the word, or load the file with grouprl.load_config"
            )
        value = _check_value(dotted, value, tp)
        if choices and value not in choices:
            raise ConfigError(
                f"{dotted}: {value!r} is not one of {', '.join(map(str, choices))}"
                f"{did_you_mean(str(value), [str(c) for c in choices])}"
            )
        kwargs[fields[key].name] = value
    return cls(**kwargs)


EMA_KEYS = ("decay", "every", "answer_tag", "cap")  # train.ema_reference (training/ema.py)


def check_ema_spec(spec: Any) -> dict[str, Any]:
    """`train.ema_reference` with defaults filled in; a bad key or value is a ConfigError."""
    if not isinstance(spec, dict):
        raise ConfigError(f"train.ema_reference: expected a mapping, got {spec!r}")
    unknown = [k for k in spec if k not in EMA_KEYS]
    if unknown:
        raise ConfigError(
            f"train.ema_reference.{unknown[0]}: unknown key; known: {', '.join(EMA_KEYS)}"
        )
    out = {"decay": 0.995, "every": 10, "answer_tag": "<answer>", "cap": 0.95, **spec}
    d, e = out["decay"], out["every"]
    if not isinstance(d, (int, float)) or not 0.0 <= float(d) <= 1.0:
        raise ConfigError(f"train.ema_reference.decay: must be in [0, 1], got {d!r}")
    if not isinstance(e, int) or isinstance(e, bool) or e < 1:
        raise ConfigError(f"train.ema_reference.every: must be an integer >= 1, got {e!r}")
    if not isinstance(out["answer_tag"], str):
        raise ConfigError(
            f"train.ema_reference.answer_tag: expected a string, got {out['answer_tag']!r}"
        )
    if not isinstance(out["cap"], (int, float)) or not 0 < float(out["cap"]) <= 1:
        raise ConfigError(f"train.ema_reference.cap: must be in (0, 1], got {out['cap']!r}")
    return out


def _check_component(dotted: str, spec: Any) -> None:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{dotted}: expected a mapping with a 'name' key, got {spec!r}")
    if not isinstance(spec["name"], str) or not spec["name"]:
        raise ConfigError(f"{dotted}.name: expected a component name, got {spec['name']!r}")


# Integer fields and the lowest value that can work (0 means "off" or "all" where allowed).
_INT_MIN: dict[str, int] = {
    "model.logprob_chunk_size": 0,  # 0 = 64 MiB of logits per chunk
    "data.max_prompt_length": 1,
    "rollout.num_generations": 1,
    "rollout.top_k": 0,  # 0 = no top-k filtering
    "rollout.max_new_tokens": 1,
    "rollout.max_turns": 1,
    "rollout.max_total_tokens": 0,  # 0 = max_turns x max_new_tokens
    "train.max_steps": 0,
    "train.prompts_per_step": 1,
    "train.micro_batch_size": 1,
    "train.micro_batch_tokens": 0,  # 0 = by micro_batch_size
    "train.num_iterations": 1,
    "train.warmup_steps": 0,
    "train.save_every": 0,  # 0 = only at the end
    "train.keep_checkpoints": 1,  # a resume needs the latest one
    "train.reward_failure_window": 1,
    "train.nan_reward_steps": 0,  # 0 = never stop
    "train.log_completions_every": 0,  # 0 = never
    "train.eval_every": 0,  # 0 = never
    "train.eval_samples": 1,
    "train.eval_limit": 0,  # 0 = all
}
# String fields that name something and cannot be empty.
# train.report_to names (monitor/trackers.py builds trackio and wandb; tensorboard is the
# metrics logger's own)
REPORT_TO = ("tensorboard", "trackio", "wandb")
_NON_EMPTY = ("data.prompt_column", "data.split", "rollout.engine", "train.output_dir")


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_number(key: str, value: float, low: float, high: float = math.inf) -> None:
    """low <= value <= high and finite; NaN fails (every comparison with NaN is false)."""
    if not (math.isfinite(value) and low <= value <= high):
        rule = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ConfigError(f"{key}: must be a finite number {rule}, got {value}")


def _check_device(name: str) -> None:
    if name == "auto":
        return
    import torch  # late: the schema layer does not need torch otherwise

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"model.device: {name!r} is not a device (auto, cpu, cuda, cuda:N, mps): {exc}"
        ) from None
    if device.type == "meta":
        raise ConfigError("model.device: 'meta' holds no data; use auto, cpu, cuda or cuda:N")


def validate(cfg: Config) -> Config:
    """Range and cross-field checks of the schema: a value that cannot work (or that would
    silently stop learning) fails here with its key. Components are checked against their
    registries by `grouprl.components.load_config` (= `grouprl.load_config`), one layer up."""
    t, r = cfg.train, cfg.rollout
    for key, low in _INT_MIN.items():
        if _get(cfg, key) < low:
            raise ConfigError(f"{key}: must be >= {low}, got {_get(cfg, key)}")
    for key in _NON_EMPTY:
        if not _get(cfg, key).strip():
            raise ConfigError(f"{key}: must not be empty")
    _check_device(cfg.model.device)
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"train.seed: must be in [0, 2**32) (numpy's seed range), got {t.seed}")
    _check_number("train.learning_rate", t.learning_rate, 0.0)
    _check_number("train.weight_decay", t.weight_decay, 0.0)
    if not t.max_grad_norm > 0:  # NaN fails too
        raise ConfigError(
            f"train.max_grad_norm: must be > 0, got {t.max_grad_norm}: gradients are scaled by "
            "max_grad_norm / norm, so 0 zeroes every update and a negative value reverses it "
            "(use .inf to turn clipping off)"
        )
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas: expected two numbers in [0, 1), got {t.adam_betas}")
    for i, name in enumerate(t.report_to):
        if name not in REPORT_TO:
            raise ConfigError(
                f"train.report_to.{i}: {name!r} is not one of {', '.join(REPORT_TO)}"
                f"{did_you_mean(str(name), REPORT_TO)}"
            )
    if not 0 < t.reward_failure_limit <= 1:
        raise ConfigError(
            f"train.reward_failure_limit: must be in (0, 1] (1.0 = never stop), "
            f"got {t.reward_failure_limit}"
        )
    _check_number("rollout.temperature", r.temperature, 0.0)
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {r.top_p}")
    if not 0 <= r.num_train_samples <= r.num_generations:
        raise ConfigError(
            f"rollout.num_train_samples: must be between 0 (all) and rollout.num_generations "
            f"({r.num_generations}), got {r.num_train_samples}"
        )
    if t.async_ != "off" and t.strategy == "fsdp2":
        raise ConfigError(
            "train.async: one_step with train.strategy fsdp2 is not supported yet (the "
            "sampler's own copy of the policy would need the sharded weights gathered every "
            "step); use train.strategy ddp, or train.async: off"
        )
    if t.ema_reference is not None:
        check_ema_spec(t.ema_reference)
        if t.async_ != "off":
            raise ConfigError(
                "train.ema_reference: the EMA reference scores rollouts while they are "
                "collected, which train.async: one_step would overlap with its update; use "
                "train.async: off"
            )
        if t.strategy == "fsdp2":
            raise ConfigError(
                "train.ema_reference: an EMA copy of sharded weights is not built; use "
                "train.strategy ddp"
            )
    if t.eval_every and not (cfg.data.eval_path or cfg.data.task):
        raise ConfigError(
            "train.eval_every: set data.eval_path (or use data.task) to evaluate during training"
        )
    _check_component("advantage", cfg.advantage)
    modifiers = cfg.advantage.get("modifiers") or []
    if not isinstance(modifiers, list):
        raise ConfigError(
            f"advantage.modifiers: expected a list of {{name: ..., params...}}, got {modifiers!r}"
        )
    for i, mod in enumerate(modifiers):
        _check_component(f"advantage.modifiers.{i}", mod)
    _check_component("loss", cfg.loss)
    if not isinstance(cfg.loss.get("aggregation", ""), str):
        raise ConfigError(
            f"loss.aggregation: expected an aggregation name, got {cfg.loss['aggregation']!r}"
        )
    for i, reg in enumerate(cfg.regularizers):
        _check_component(f"regularizers.{i}", reg)
    for i, flt in enumerate(cfg.sample_filters):
        _check_component(f"sample_filters.{i}", flt)
    if cfg.token_mask is not None:
        _check_component("token_mask", cfg.token_mask)
    _check_component("rollout.mismatch_correction", r.mismatch_correction)
    if cfg.data.environment is not None:
        _check_component("data.environment", cfg.data.environment)
    _check_component("data.sampler", cfg.data.sampler)
    _check_component("rollout.strategy", r.strategy)
    if r.strategy["name"] != "plain" and cfg.data.environment is not None:
        raise ConfigError(
            f"rollout.strategy: {r.strategy['name']!r} samples single-turn completions; it "
            "cannot be combined with data.environment (multi-turn rollouts)"
        )
    return cfg


def read_yaml_file(path: Path) -> dict[str, Any]:
    """A YAML config file as a mapping; any failure is a ConfigError naming the file."""
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        found = False
    if not found:
        raise ConfigError(f"config file not found: {path}")
    try:
        user = yaml_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except Exception as exc:  # YAMLError, or a ValueError of a tag such as `!!int x`
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return user


# a recipe value the user must give (a reward model's path, a judge's URL): "<required: what>"
REQUIRED = "<required"


def required_keys(data: Any, where: str = "") -> list[tuple[str, str]]:
    """(dotted key, what) of every value still marked "<required: what>" in `data`."""
    if isinstance(data, str) and data.startswith(REQUIRED):
        return [(where, data[len(REQUIRED) :].strip(" :>"))]
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return []
    return [hit for k, v in items for hit in required_keys(v, f"{where}.{k}" if where else k)]


def load_config(
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    *,
    check: bool = True,
    allow_required: bool = False,
) -> Config:
    """Build a Config from a YAML path or dict, its recipe, and `key=value` overrides. A
    recipe value marked "<required: ...>" that nothing set is a ConfigError naming the key
    (unless `allow_required`: `grouprl recipes NAME` prints such a recipe)."""
    if source is None:
        user: dict[str, Any] = {}
    elif isinstance(source, dict):
        user = copy.deepcopy(source)
    elif isinstance(source, (str, os.PathLike)):
        user = read_yaml_file(Path(source))
    else:
        raise ConfigError(
            f"config: expected a YAML file path or a mapping, got {type(source).__name__}"
        )
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple, type(None))):
        raise ConfigError(
            f"overrides: expected a list of 'section.key=value' strings, got {overrides!r}"
        )
    parsed = [parse_override(o) for o in overrides or []]
    from grouprl.trl_names import TRLNameError, is_trl_name, translate

    # GRPOConfig names (in the file, or as `num_generations=16` overrides) -> grouprl keys
    for path_, value in [p for p in parsed if len(p[0]) == 1 and is_trl_name(p[0][0])]:
        user[path_[0]] = value
    parsed = [p for p in parsed if not (len(p[0]) == 1 and is_trl_name(p[0][0]))]
    try:
        user, trl_lines = translate(user)
    except TRLNameError as exc:
        raise ConfigError(str(exc)) from None
    recipe = user.get("recipe")
    for path_, value in parsed:
        if path_ == ["recipe"]:
            recipe = value
    # defaults < recipe < user file, so `loss.eps_high=...` refines the default loss
    recipe_cfg = load_recipe(recipe) if recipe else {}
    merged = deep_merge(Config().to_dict(), recipe_cfg)
    merged = deep_merge(merged, user)
    for path_, value in parsed:
        set_path(merged, path_, value)
    if recipe:
        merged["recipe"] = recipe
    missing = required_keys(merged)
    if missing and not allow_required:
        lines = "; ".join(f"{key} ({what})" for key, what in missing)
        example = " ".join(f"{key}=..." for key, _ in missing)
        raise ConfigError(
            f"recipe {recipe}: set {lines}, in your YAML or on the command line: {example}"
        )
    cfg = _build(Config, merged, "")
    cfg.recipe_overrides = recipe_overrides(recipe_cfg, merged)
    cfg.trl_mappings = trl_lines
    return validate(cfg) if check else cfg


def recipe_overrides(recipe: dict[str, Any], merged: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """ "key -> (the recipe's value, the run's)" for every value the recipe sets that the
    user's config or command line changed (the start-up log lists them)."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(r: Any, m: Any, key: str) -> None:
        if isinstance(r, dict) and isinstance(m, dict):
            for k, v in r.items():
                walk(v, m.get(k), f"{key}.{k}" if key else k)
        elif r != m:
            out[key] = (r, m)

    walk(recipe, merged, "")
    return out


def _plain(x: Any) -> Any:
    """Config data as YAML-safe values; Python callables (API rewards) by name."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if callable(x):
        return f"<python function {getattr(x, '__name__', type(x).__name__)}>"
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain({config_key(f): getattr(x, f.name) for f in dataclasses.fields(x)})
    return x


def dump_config(cfg: Config) -> str:
    """The config as YAML that `load_config` reads back to the same Config."""
    return yaml.dump(_plain(cfg.to_dict()), Dumper=_Dumper, sort_keys=False)
