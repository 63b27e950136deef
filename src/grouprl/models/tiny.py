"""Tiny offline models: a character tokenizer and a small Qwen2/Llama built from a config.

Nothing here downloads anything, so tests and the demo run on a laptop with no network.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
}
DEFAULT_CHARS = (
    "0123456789+-*=() .,:?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\\{}<>/_\n"
)


def build_char_tokenizer(chars: Iterable[str] = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character plus <pad>, <eos>, <bos>, <unk>."""
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS.values():
        vocab[tok] = len(vocab)
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Split into single characters so every char maps to its own token.
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers import decoders

    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIAL_TOKENS)
    tok.padding_side = "left"
    return tok


ARCHITECTURES = {
    "qwen2": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
}


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    **config_overrides: object,
) -> torch.nn.Module:
    """A randomly initialized decoder-only model sized for CPU (fp32, SDPA attention)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config = AutoConfig.for_model(
        ARCHITECTURES[arch],
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **config_overrides,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="sdpa"
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: str | Path
) -> Path:
    """Save weights (safetensors) and tokenizer so `from_pretrained(path)` reloads them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
