"""Load an HF causal LM and its tokenizer from a hub id or a local directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grouprl.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 where the hardware has it, fp32 on CPU for exactness
        return (
            torch.bfloat16
            if device.type == "cuda" and torch.cuda.is_bf16_supported()
            else torch.float32
        )
    return DTYPES[name]


# tokenizer_config classes that mean "the tokenizer.json as saved" (transformers 4 and 5 names)
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer_class(path: str) -> str | None:
    config = Path(path).expanduser() / "tokenizer_config.json"
    try:
        return json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The tokenizer at `path` (hub id or directory), left-padded, with a pad token.

    A tokenizer saved as a plain `tokenizers` object (grouprl's tiny char and word
    tokenizers) is loaded as such: `AutoTokenizer` would pick the class of the model type
    in config.json (e.g. Qwen2Tokenizer), whose own pre-tokenizer splits words differently.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _saved_tokenizer_class(path) in GENERIC_TOKENIZER_CLASSES:
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def enable_checkpointing(model: torch.nn.Module) -> None:
    """`model.gradient_checkpointing`: HF's activation checkpointing, non-reentrant, with
    `attention.recompute_context` so a layer recomputed in the backward runs under the packed
    layout its forward used (without it, the recompute leaves the packed attention and
    torch refuses the mismatch)."""
    from grouprl.models.attention import recompute_context

    kwargs = {"use_reentrant": False, "context_fn": recompute_context}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model_and_tokenizer(cfg: ModelConfig):
    """Returns (model, tokenizer, device). Errors name `model.name_or_path`."""
    from transformers import AutoModelForCausalLM

    if not cfg.name_or_path:
        raise ConfigError("model.name_or_path: no model given (a hub id or a local directory)")
    path = cfg.name_or_path
    if (path.startswith((".", "/", "~")) or Path(path).exists()) and not Path(
        path
    ).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path: directory not found: {path}")
    local = Path(path).expanduser()
    plain = (local / "config.json").is_file()
    # a LoRA checkpoint (adapter_config.json, no config.json) loads as its merged model
    adapter = local.is_dir() and not plain and (local / "adapter_config.json").is_file()
    if local.is_dir() and not plain and not adapter:
        raise ConfigError(
            f"model.name_or_path: cannot load {path!r}: no config.json there (not a model directory)"
        )
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    from grouprl.models.lora import LoraSettings, quantization_config

    lora = LoraSettings.from_dict(cfg.lora)
    quant = quantization_config(lora, device) if lora is not None else None
    if quant is not None:  # QLoRA: bitsandbytes places the 4-bit weights itself
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    try:
        tok = load_tokenizer(cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code)
        if adapter:
            from grouprl.models.lora import load_merged

            model = load_merged(local, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(local) if local.is_dir() else path, **kwargs
            )
    except OSError as exc:
        raise ConfigError(
            f"model.name_or_path: cannot load {path!r}: {str(exc).splitlines()[0]}"
        ) from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
        if lora is not None:  # frozen embeddings: checkpointed blocks still need input grads
            model.enable_input_require_grads()
    return (model if quant is not None else model.to(device)), tok, device
