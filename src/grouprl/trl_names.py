"""TRL's `GRPOConfig` names in a grouprl config: each maps onto grouprl keys, or is refused
with the reason. A run config may use them at the top level or under a `trl:` section;
`load_config` translates them before anything else reads the config, and the start-up log
shows one line per mapping. docs/from_trl.md is the table for people.

Only names whose meaning carries over map; TRL's defaults do not (a TRL name that is
absent keeps grouprl's default, which docs/from_trl.md lists beside TRL's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Assign = list[tuple[str, Any]]  # (dotted grouprl key, value)


def _to(key: str) -> Callable[[Any], Assign]:
    return lambda v: [(key, v)]


def _beta(v: Any) -> Assign:
    beta = float(v)
    return [("regularizers", [{"name": "kl", "beta": beta, "estimator": "k3"}] if beta else [])]


_LOSS_TYPES = {  # TRL loss_type -> grouprl loss aggregation (or loss)
    "grpo": [("loss.aggregation", "seq_mean_token_mean")],
    "dapo": [("loss.aggregation", "token_mean")],
    "bnpo": [("loss.aggregation", "token_mean")],
    "dr_grpo": [("loss.aggregation", "seq_mean_token_sum_norm")],
    "cispo": [("loss.name", "cispo"), ("loss.aggregation", "token_mean")],
}


def _loss_type(v: Any) -> Assign:
    if v not in _LOSS_TYPES:
        raise _Refused(
            f"loss_type {v!r} has no grouprl equivalent here; known: {', '.join(_LOSS_TYPES)}"
            " (or choose loss.name / loss.aggregation, docs/methods.md)"
        )
    return list(_LOSS_TYPES[v])


def _scale(v: Any) -> Assign:
    scale = {True: "group", False: "none", "group": "group", "batch": "batch", "none": "none"}
    if v not in scale:
        raise _Refused(f"scale_rewards {v!r}: expected group, batch, none, true or false")
    return [("advantage.scale", scale[v])]


def _is_level(v: Any) -> Assign:
    if v == "token":
        return []
    if v == "sequence":
        return [("loss.name", "gspo"), ("loss.eps_low", 3e-4), ("loss.eps_high", 4e-4)]
    raise _Refused(f"importance_sampling_level {v!r}: expected token or sequence")


def _entropy_quantile(v: Any) -> Assign:
    rho = float(v)
    if rho >= 1.0:
        return [("token_mask", None)]
    return [("token_mask", {"name": "forking_tokens", "rho": rho})]


def _truncated(v: Any) -> Assign:
    return [("sample_filters", [{"name": "mask_truncated"}] if v else [])]


def _report_to(v: Any) -> Assign:
    names = [] if v in (None, "none") else ([v] if isinstance(v, str) else list(v))
    if "all" in names:
        raise _Refused("report_to 'all': name the trackers (tensorboard, trackio, wandb)")
    return [("train.report_to", names)]


def _bf16(v: Any) -> Assign:
    return [("model.dtype", "bfloat16")] if v else []


def _use_vllm(v: Any) -> Assign:
    return [("rollout.engine", "vllm" if v else "hf")]


MAPPINGS: dict[str, Callable[[Any], Assign]] = {
    "num_generations": _to("rollout.num_generations"),
    "max_completion_length": _to("rollout.max_new_tokens"),
    "max_prompt_length": _to("data.max_prompt_length"),
    "temperature": _to("rollout.temperature"),
    "top_p": _to("rollout.top_p"),
    "top_k": _to("rollout.top_k"),
    "beta": _beta,
    "loss_type": _loss_type,
    "epsilon": lambda v: [("loss.eps_low", v), ("loss.eps_high", v)],  # TRL: high = low
    "epsilon_high": _to("loss.eps_high"),
    "scale_rewards": _scale,
    "mask_truncated_completions": _truncated,
    "top_entropy_quantile": _entropy_quantile,
    "importance_sampling_level": _is_level,
    "num_iterations": _to("train.num_iterations"),
    "learning_rate": _to("train.learning_rate"),
    "max_steps": _to("train.max_steps"),
    "output_dir": _to("train.output_dir"),
    "seed": _to("train.seed"),
    "save_steps": _to("train.save_every"),
    "save_total_limit": _to("train.keep_checkpoints"),
    "eval_steps": _to("train.eval_every"),
    "warmup_steps": _to("train.warmup_steps"),
    "lr_scheduler_type": _to("train.lr_schedule"),  # the same names (checked there)
    "max_grad_norm": _to("train.max_grad_norm"),
    "weight_decay": _to("train.weight_decay"),
    "gradient_checkpointing": _to("model.gradient_checkpointing"),
    "bf16": _bf16,
    "use_vllm": _use_vllm,
    "vllm_mode": _to("rollout.vllm.mode"),
    "vllm_server_base_url": _to("rollout.vllm.server_url"),
    "vllm_gpu_memory_utilization": _to("rollout.vllm.gpu_memory_utilization"),
    "report_to": _report_to,
}

REFUSED: dict[str, str] = {
    "num_train_epochs": "grouprl counts optimizer steps: set max_steps (train.max_steps)",
    "per_device_train_batch_size": (
        "grouprl sizes a step in prompts: train.prompts_per_step prompts x "
        "rollout.num_generations completions, split in train.micro_batch_size forwards"
    ),
    "gradient_accumulation_steps": (
        "one optimizer step covers train.prompts_per_step prompts; train.micro_batch_size "
        "splits the forwards (the gradient is the same)"
    ),
    "generation_batch_size": "each step samples its own batch: train.prompts_per_step",
    "steps_per_generation": "each step samples its own batch: train.prompts_per_step",
    "logging_steps": "every step is logged",
    "delta": "the two-sided clip of INTELLECT-2 is not built",
    "sync_ref_model": "the reference policy is never synced (TR-DPO style) here",
    "reward_weights": "give each reward its weight: rewards: [{name: ..., weight: ...}]",
    "use_liger_kernel": "the chunked LM head (model.logprob_chunk_size) does its job",
}


class _Refused(ValueError):
    pass


class TRLNameError(ValueError):
    """A GRPOConfig name that cannot be translated; the message names it."""


def trl_hint(name: str) -> str:
    """' (TRL's X: ...)' for a GRPOConfig name met inside a section, else ''."""
    if name in REFUSED:
        return f" (TRL's {name}: {REFUSED[name]})"
    if name in MAPPINGS:
        return f" (TRL's {name}: write it at the top level or under trl:, see docs/from_trl.md)"
    return ""


def is_trl_name(name: str) -> bool:
    return name in MAPPINGS or name in REFUSED


def translate(user: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The user's config with TRL names (top level, or in a `trl:` section) replaced by
    grouprl keys; and one line per mapping, for the start-up log. Raises TRLNameError
    naming the TRL key when it has no equivalent, or when a grouprl key it maps to is also
    set (config.load_config turns it into a ConfigError)."""
    out = {k: v for k, v in user.items() if k != "trl"}
    section = user.get("trl") or {}
    if not isinstance(section, dict):
        raise TRLNameError(f"trl: expected a mapping of GRPOConfig names, got {section!r}")
    found = {k: (f"trl.{k}", v) for k, v in section.items()}
    for k in list(out):
        if is_trl_name(k):  # no grouprl section has a GRPOConfig name
            found.setdefault(k, (k, out.pop(k)))
    theirs = copy.deepcopy(out)  # what the config itself sets, to catch double settings
    lines = []
    # epsilon before epsilon_high, which refines its upper bound (as in TRL)
    for name in sorted(found, key=lambda n: n == "epsilon_high"):
        where, value = found[name]
        if name in REFUSED:
            raise TRLNameError(f"{where}: TRL's {name} has no grouprl equivalent: {REFUSED[name]}")
        if name not in MAPPINGS:
            raise TRLNameError(
                f"{where}: not a GRPOConfig name grouprl knows; see docs/from_trl.md"
            )
        try:
            assigns = MAPPINGS[name](value)
        except (_Refused, TypeError, ValueError) as exc:
            raise TRLNameError(f"{where}: {exc}") from None
        for key, v in assigns:
            if _get(theirs, key) is not _MISSING and _get(theirs, key) != v:
                raise TRLNameError(
                    f"{where}: TRL's {name} sets {key}, which the config also sets "
                    f"({_get(theirs, key)!r}); keep one of them"
                )
            _set(out, key, v)
        shown = ", ".join(f"{k}={v!r}" for k, v in assigns) or "nothing (grouprl's default)"
        lines.append(f"TRL {name}={value!r} -> {shown}")
    return out, lines


_MISSING = object()


def _get(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value
