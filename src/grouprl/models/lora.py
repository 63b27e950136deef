"""LoRA adapters through PEFT (`model.lora`): only low-rank adapters on a frozen base train.

The policy is the base model plus low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", arXiv:2106.09685). The reference policy of a KL term
is the same model with the adapters switched off (`disable_adapter`), so no second copy of
the model is kept. QLoRA (Dettmers et al. 2023, arXiv:2305.14314) loads the frozen base in
4 bits through bitsandbytes, on CUDA only.

PEFT is imported when a run asks for adapters, never at `import grouprl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grouprl.config import ConfigError
from grouprl.models.whole import whole

log = logging.getLogger("grouprl")


@dataclass
class LoraSettings:
    """`model.lora` keys. dropout defaults to 0, not PEFT's habit of 0.05: a stochastic
    forward makes the sampling policy's log-probs differ from every training forward's,
    which the importance ratio would read as policy change."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # "all-linear": every linear layer of the decoder (not the LM head), as in QLoRA
    target_modules: Any = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)
    # "4bit": QLoRA, the frozen base in NF4 through bitsandbytes (CUDA only)
    quantize: str = "none"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LoraSettings | None:
        """None when `model.lora` is absent or empty (full fine-tuning); ConfigError naming
        the `model.lora.<key>` that is wrong."""
        if not d:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(
                    f"model.lora.{key}: unknown key; known: {', '.join(sorted(known))}"
                )
        s = cls(**d)
        if not isinstance(s.r, int) or s.r < 1:
            raise ConfigError(f"model.lora.r: {s.r!r} is not a positive integer (the rank)")
        if not isinstance(s.alpha, (int, float)) or s.alpha <= 0:
            raise ConfigError(f"model.lora.alpha: {s.alpha!r} is not a positive number")
        if not isinstance(s.dropout, (int, float)) or not 0 <= s.dropout < 1:
            raise ConfigError(f"model.lora.dropout: {s.dropout!r} is not in [0, 1)")
        if not isinstance(s.target_modules, (str, list)) or not s.target_modules:
            raise ConfigError(
                "model.lora.target_modules: give 'all-linear' or a list of module names "
                f"(e.g. [q_proj, v_proj]), not {s.target_modules!r}"
            )
        if not isinstance(s.modules_to_save, list):
            raise ConfigError(
                f"model.lora.modules_to_save: {s.modules_to_save!r} is not a list of module names"
            )
        if s.quantize not in ("none", "4bit"):
            raise ConfigError(f"model.lora.quantize: {s.quantize!r} is not one of none, 4bit")
        return s


def require_peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ConfigError(
            f"model.lora needs PEFT: pip install 'peft>=0.17' (import failed: {exc})"
        ) from None
    return peft


def quantization_config(settings: LoraSettings, device: torch.device) -> Any:
    """The bitsandbytes config for QLoRA, or None; ConfigError where it cannot run."""
    if settings.quantize == "none":
        return None
    if device.type != "cuda":
        raise ConfigError(
            "model.lora.quantize: 4bit (QLoRA) needs a CUDA device and bitsandbytes; this run "
            f"is on {device.type}. Use model.lora without quantize here"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"model.lora.quantize: 4bit needs bitsandbytes: pip install bitsandbytes ({exc})"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """The model wrapped by PEFT with fresh adapters (B = 0, so it starts as the base model);
    every base weight frozen."""
    peft = require_peft()
    if settings.quantize != "none":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=settings.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet():
            return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules that the model does not have
        raise ConfigError(f"model.lora.target_modules: {exc}") from None


def check_combination(cfg: Any) -> None:
    """Refuse at start-up what QLoRA cannot do here: its 4-bit base cannot be merged for
    vLLM, nor sharded by fully_shard."""
    settings = LoraSettings.from_dict(cfg.model.lora)
    if settings is None or settings.quantize == "none":
        return
    if cfg.rollout.engine == "vllm":
        raise ConfigError(
            "model.lora.quantize: 4bit cannot send vLLM merged weights (the base is packed "
            "4-bit); use rollout.engine: hf with QLoRA, or LoRA without quantize"
        )
    if cfg.train.strategy == "fsdp2":
        raise ConfigError(
            "model.lora.quantize: 4bit cannot be sharded with train.strategy: fsdp2; use "
            "train.strategy: ddp (or single)"
        )


def adapt(model: nn.Module, model_cfg: Any) -> nn.Module:
    """The run's policy: `model` with fresh adapters when `model.lora` asks for them (a model
    that already carries PEFT adapters is trained as it is); logs the trainable share."""
    settings = LoraSettings.from_dict(model_cfg.lora)
    if settings is None or is_adapted(model):
        return model
    local = Path(str(model_cfg.name_or_path)).expanduser()
    if model_cfg.name_or_path and (local / "adapter_config.json").is_file():
        raise ConfigError(
            f"model.name_or_path: {model_cfg.name_or_path} is a LoRA checkpoint; new adapters "
            "need a plain base model: merge it first (grouprl export "
            f"{model_cfg.name_or_path} --output DIR) and train from DIR"
        )
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and settings.modules_to_save:
        raise ConfigError(
            f"model.lora.modules_to_save: {settings.modules_to_save} on a model with tied "
            "input and output embeddings would train one copy and leave its twin behind; "
            "leave modules_to_save empty for this model"
        )
    model = apply_lora(model, settings)
    if model_cfg.name_or_path and local.is_dir():  # export finds the base from anywhere
        model.peft_config[model.active_adapter].base_model_name_or_path = str(local.resolve())
    trainable, total = trainable_parameters(model)
    log.info(
        "LoRA r=%d alpha=%g on %s: %s of %s parameters train (%.2f%%)",
        settings.r,
        settings.alpha,
        settings.target_modules,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return model


def is_adapted(model: nn.Module) -> bool:
    """A PEFT model (adapters on a frozen base)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Load adapter weights saved in PEFT's format (names without the adapter's name) into
    `model`; returns the (missing, unexpected) adapter keys, base weights aside."""
    peft = require_peft()
    result = peft.set_peft_model_state_dict(model, state)
    own = set(peft.get_peft_model_state_dict(model))
    loaded = set(state)
    missing = sorted(own - loaded)
    unexpected = list(getattr(result, "unexpected_keys", []))
    return missing, unexpected


def load_adapter_state_sharded(
    model: nn.Module, state: dict[str, Tensor], place: Any
) -> tuple[list[str], list[str]]:
    """`load_adapter_state` for a model whose tensors are sharded: PEFT's file names are the
    model's with the adapter's name taken out; `place(tensor, like)` lays each whole tensor
    out as the model's own (training/parallel.py)."""
    adapter = model.active_adapter
    target = model.state_dict()
    # PEFT's saved name drops the adapter's name where it stands as a whole component
    names = {k.replace(f".{adapter}.", "."): k for k in target if f".{adapter}." in k}
    own = {k: names.get(k, k if k in target else None) for k in state}  # embeddings as is
    model.load_state_dict(
        {mk: place(state[k], target[mk]) for k, mk in own.items() if mk is not None},
        strict=False,
    )
    return sorted(set(names) - set(state)), sorted(k for k, mk in own.items() if mk is None)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights of the adapted model as one plain model: each adapted layer's base weight
    plus its LoRA delta (PEFT's `get_delta_weight`), under the base model's own names (what
    `merge_and_unload()` would save), computed out of place so the adapters stay separate
    and the base weights untouched. Sharded (fsdp2) tensors come back whole, so every
    process must call it, in step."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    out: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")] = (
            value.detach()
        )
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            weight = module.get_base_layer().weight
            out[f"{name}.weight"] = (weight + module.get_delta_weight(adapter)).detach()
    return {k: whole(v) for k, v in out.items()}


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory names (`adapter_config.json`; "" when it names
    none), or None when `path` holds no adapter."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("base_model_name_or_path") or ""
    except ValueError as exc:
        raise ConfigError(f"{cfg}: unreadable ({exc})") from None


def load_merged(
    path: str | Path,
    *,
    base: str | None = None,
    hint: str = "set base_model_name_or_path in its adapter_config.json",
    **load_kwargs: Any,
) -> nn.Module:
    """The base model with the adapter of `path` merged in (`merge_and_unload`): a plain
    transformers model. `base` overrides the base named in adapter_config.json; `hint`
    says how to give another base where this one is missing or unloadable."""
    from transformers import AutoModelForCausalLM

    peft = require_peft()
    base = base or adapter_base(path)
    if not base:
        raise ConfigError(f"{path}: the adapter does not name its base model; {hint}")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **load_kwargs)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot load the base model {base!r} of this adapter "
            f"({str(exc).splitlines()[0]}); {hint}"
        ) from None
    with _quiet():
        return peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PEFT asks transformers a question under a deprecated name: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        yield
