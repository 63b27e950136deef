"""The `Rollouts` batch, the `RolloutEngine` protocol and `build_engine`.

A rollout engine turns B prompt strings into B*G sampled completions. Groups are
contiguous: rows g*G .. g*G+G-1 are the completions of prompt g. Engines are registered
in `ROLLOUT_ENGINES` by name (`rollout.engine` in the config) and built with `build_engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from grouprl.config import ConfigError  # config imports only grouprl.registry: no cycle
from grouprl.registry import Registry, RegistryError

if TYPE_CHECKING:
    from grouprl.config import RolloutConfig


class RolloutEngineError(RuntimeError):
    """The rollout engine failed: a server down or stuck, a weight sync that did not finish.

    The message names the step and the engine (e.g. the server's address); the trainer saves
    a checkpoint first and adds where it is."""


@dataclass
class SamplingParams:
    """How to sample: G completions per prompt; temperature 0 means greedy decoding."""

    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    # when set, this call's randomness comes from this seed alone, not from torch's global
    # RNG: what sampling in a background thread needs (train.async, training/pipeline.py)
    seed: int | None = None


@dataclass(kw_only=True)
class Rollouts:
    """B prompts x G completions, as token ids ready for the policy forward. Built by keyword.

    prompt_ids_NP / prompt_mask_NP:  left-padded prompt tokens, repeated per completion.
    completion_ids_NT:               right-padded completion tokens.
    attention_mask_NT:               1 where a completion token is real (the model sees it):
                                     sampled tokens up to and including the first EOS, and
                                     any context inside the completion (tool output, ...).
    loss_mask_NT:                    1 where a token is an action of the policy (trained on);
                                     0 on padding and on context tokens. Always <= attention.
    truncated_N:                     True where no EOS came within max_new_tokens.
    completions:                     decoded completion texts (no special tokens).
    sampling_logp_NT:                the sampler's own log-probs of the completion tokens,
                                     when the engine reports them (mismatch correction).
    meta:                            per-row metadata (e.g. turn spans, tool calls), or None.
    pad_N:                           True on padding rows (no completion, NaN reward) that
                                     fill a group up to group_size when prompts get
                                     different numbers of rollouts (a budget sampler:
                                     data/samplers.py); None when every row is real.
    behavior_prompt_ids_NP / behavior_prompt_mask_NP:
                                     every row's *sampling* prompt (left-padded), where a
                                     rollout strategy sampled some rows from another
                                     prompt than the one they train with (Guide-GRPO: a
                                     hinted prompt, the plain one for training); π_old of
                                     those rows is taken in the sampling context. None when
                                     every row trains with the prompt it was sampled from.
    sft_N:                           True on rows trained by likelihood only (a strategy's
                                     demonstrations, e.g. ExPO's self-explanations): not
                                     samples of their group (NaN reward, no advantage, no
                                     policy term); the `sft_rows` regularizer trains them.
                                     None when there are none.
    offpolicy_N:                     True on rows the policy did not sample from their
                                     training prompt (a strategy's hinted or
                                     demonstration-steered rows, expert anchors): losses
                                     may treat them apart (ppo_clip's `offpolicy`). None
                                     when every row is on-policy.
    fixed_adv_N:                     a rollout strategy's advantage for rows it added
                                     outside their group's statistics (AEPO's positive
                                     extra samples: A = 1), float [N], NaN on ordinary
                                     rows; such rows have a NaN reward. None when none.
    """

    prompt_ids_NP: Tensor
    prompt_mask_NP: Tensor
    completion_ids_NT: Tensor
    attention_mask_NT: Tensor
    loss_mask_NT: Tensor
    truncated_N: Tensor
    completions: list[str]
    group_size: int
    sampling_logp_NT: Tensor | None = None
    meta: list[dict[str, Any]] | None = None
    pad_N: Tensor | None = None
    behavior_prompt_ids_NP: Tensor | None = None
    behavior_prompt_mask_NP: Tensor | None = None
    sft_N: Tensor | None = None
    offpolicy_N: Tensor | None = None
    fixed_adv_N: Tensor | None = None

    def __post_init__(self) -> None:
        N, T = self.completion_ids_NT.shape
        for name in ("attention_mask_NT", "loss_mask_NT", "sampling_logp_NT"):
            val = getattr(self, name)
            if val is not None and tuple(val.shape) != (N, T):
                raise ValueError(f"Rollouts.{name}: shape {tuple(val.shape)}, expected {(N, T)}")
        if len(self.completions) != N:
            raise ValueError(f"Rollouts.completions: {len(self.completions)} texts for {N} rows")
        if self.meta is not None and len(self.meta) != N:
            raise ValueError(f"Rollouts.meta: {len(self.meta)} entries for {N} rows")
        for name in ("pad_N", "sft_N", "offpolicy_N", "fixed_adv_N"):
            val = getattr(self, name)
            if val is not None and tuple(val.shape) != (N,):
                raise ValueError(f"Rollouts.{name}: shape {tuple(val.shape)}, expected {(N,)}")
        ids, mask = self.behavior_prompt_ids_NP, self.behavior_prompt_mask_NP
        if (ids is None) != (mask is None):
            raise ValueError("Rollouts.behavior_prompt_ids_NP and _mask_NP: give both or neither")
        if ids is not None and (ids.shape[0] != N or tuple(ids.shape) != tuple(mask.shape)):  # type: ignore[union-attr]
            raise ValueError(
                f"Rollouts.behavior_prompt_ids_NP: shape {tuple(ids.shape)}, expected {N} rows "
                "and the shape of behavior_prompt_mask_NP"
            )

    @property
    def num_rollouts(self) -> int:
        return int(self.completion_ids_NT.shape[0])

    @property
    def real_N(self) -> Tensor:
        """True on real rows (not padding), bool [N]."""
        if self.pad_N is None:
            return torch.ones(
                self.num_rollouts, dtype=torch.bool, device=self.completion_ids_NT.device
            )
        return ~self.pad_N.to(self.completion_ids_NT.device)

    @property
    def sample_N(self) -> Tensor:
        """True on rows that are samples of their group: not padding, not `sft_N` rows, no
        `fixed_adv_N`."""
        out = self.real_N
        if self.sft_N is not None:
            out = out & ~self.sft_N.to(out.device)
        if self.fixed_adv_N is not None:
            out = out & torch.isnan(self.fixed_adv_N.to(out.device))
        return out

    @property
    def behavior_N(self) -> Tensor | None:
        """True on rows sampled from another prompt than their training prompt, bool [N];
        None when every row trains with its own sampling prompt."""
        if self.behavior_prompt_ids_NP is None or self.behavior_prompt_mask_NP is None:
            return None
        P = max(self.prompt_ids_NP.shape[1], self.behavior_prompt_ids_NP.shape[1])

        def right_aligned(ids: Tensor, mask: Tensor) -> Tensor:
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, -1))
            pad = torch.full((ids.shape[0], P - ids.shape[1]), -1, dtype=ids.dtype)
            return torch.cat([pad.to(ids.device), ids], dim=1)

        train = right_aligned(self.prompt_ids_NP, self.prompt_mask_NP)
        behave = right_aligned(
            self.behavior_prompt_ids_NP.to(train.device),
            self.behavior_prompt_mask_NP.to(train.device),
        )
        return (train != behave).any(dim=1)

    def behavior_view(self) -> Rollouts:
        """The same rows with their sampling prompts as prompts (for π_old in the sampling
        context); itself when there are no separate sampling prompts."""
        if self.behavior_prompt_ids_NP is None or self.behavior_prompt_mask_NP is None:
            return self
        return replace(
            self,
            prompt_ids_NP=self.behavior_prompt_ids_NP,
            prompt_mask_NP=self.behavior_prompt_mask_NP,
            behavior_prompt_ids_NP=None,
            behavior_prompt_mask_NP=None,
        )

    def trained_with(self, prompt_ids_NP: Tensor, prompt_mask_NP: Tensor) -> Rollouts:
        """These rows trained with other prompts (`prompt_ids_NP`, left-padded); the prompts
        they were sampled from become their sampling prompts, and they are off-policy."""
        behave = self.behavior_view()
        return replace(
            self,
            offpolicy_N=torch.ones(self.num_rollouts, dtype=torch.bool),
            prompt_ids_NP=prompt_ids_NP.to(self.prompt_ids_NP.device),
            prompt_mask_NP=prompt_mask_NP.to(self.prompt_mask_NP.device),
            behavior_prompt_ids_NP=behave.prompt_ids_NP,
            behavior_prompt_mask_NP=behave.prompt_mask_NP,
        )

    @property
    def lengths_N(self) -> Tensor:
        """Completion length in tokens (real tokens, actions and context)."""
        return self.attention_mask_NT.sum(dim=1)

    def to(self, device: torch.device | str) -> Rollouts:
        """The same rollouts with every tensor on `device`."""
        moved = {
            f: getattr(self, f).to(device)
            for f in (
                "prompt_ids_NP",
                "prompt_mask_NP",
                "completion_ids_NT",
                "attention_mask_NT",
                "loss_mask_NT",
                "truncated_N",
            )
        }
        if self.sampling_logp_NT is not None:
            moved["sampling_logp_NT"] = self.sampling_logp_NT.to(device)
        for f in (
            "pad_N",
            "sft_N",
            "offpolicy_N",
            "fixed_adv_N",
            "behavior_prompt_ids_NP",
            "behavior_prompt_mask_NP",
        ):
            if getattr(self, f) is not None:
                moved[f] = getattr(self, f).to(device)
        return replace(self, **moved)

    def select(self, idx: Tensor | slice) -> Rollouts:
        """Rows `idx` (micro-batches, kept groups); keeps the group size for bookkeeping."""
        rows = range(self.num_rollouts)[idx] if isinstance(idx, slice) else idx.tolist()
        return replace(
            self,
            prompt_ids_NP=self.prompt_ids_NP[idx],
            prompt_mask_NP=self.prompt_mask_NP[idx],
            completion_ids_NT=self.completion_ids_NT[idx],
            attention_mask_NT=self.attention_mask_NT[idx],
            loss_mask_NT=self.loss_mask_NT[idx],
            truncated_N=self.truncated_N[idx],
            completions=[self.completions[i] for i in rows],
            sampling_logp_NT=None if self.sampling_logp_NT is None else self.sampling_logp_NT[idx],
            meta=None if self.meta is None else [self.meta[i] for i in rows],
            pad_N=None if self.pad_N is None else self.pad_N[idx],
            sft_N=None if self.sft_N is None else self.sft_N[idx],
            offpolicy_N=None if self.offpolicy_N is None else self.offpolicy_N[idx],
            fixed_adv_N=None if self.fixed_adv_N is None else self.fixed_adv_N[idx],
            behavior_prompt_ids_NP=None
            if self.behavior_prompt_ids_NP is None
            else self.behavior_prompt_ids_NP[idx],
            behavior_prompt_mask_NP=None
            if self.behavior_prompt_mask_NP is None
            else self.behavior_prompt_mask_NP[idx],
        )


def rollouts_from_rows(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    texts: list[str],
    group_size: int,
    pad_token_id: int,
    eos_ids: set[int] | None = None,
    truncated: list[bool] | None = None,
    loss_masks: list[list[float]] | None = None,
    logps: list[list[float]] | None = None,
    meta: list[dict[str, Any]] | None = None,
    device: torch.device | str = "cpu",
) -> Rollouts:
    """Rollouts from token lists, one row each (token ids as sampled, never re-tokenized):
    prompts left-padded, completions right-padded with `pad_token_id`. `loss_masks`: the
    tokens trained on (default: every completion token); `logps`: the sampler's
    log-probs (`sampling_logp_NT`); `truncated`: given, or True where a row does not end in
    one of `eos_ids`; `texts`: what the rewards read."""
    N = len(prompt_ids)
    P = max((len(x) for x in prompt_ids), default=0) or 1
    T = max((len(x) for x in completion_ids), default=0) or 1
    prompt_NP = torch.full((N, P), pad_token_id, dtype=torch.long)
    pmask_NP = torch.zeros(N, P)
    comp_NT = torch.full((N, T), pad_token_id, dtype=torch.long)
    attn_NT = torch.zeros(N, T)
    loss_NT = torch.zeros(N, T)
    logp_NT = torch.zeros(N, T)
    for n, (p, ids) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if p:
            prompt_NP[n, P - len(p) :] = torch.tensor(p)
            pmask_NP[n, P - len(p) :] = 1.0
        if ids:
            k = len(ids)
            comp_NT[n, :k] = torch.tensor(ids)
            attn_NT[n, :k] = 1.0
            lm = loss_masks[n] if loss_masks is not None else [1.0] * k
            loss_NT[n, :k] = torch.tensor(lm, dtype=torch.float32)
            if logps is not None:
                logp_NT[n, :k] = torch.tensor(logps[n], dtype=torch.float32)
    if truncated is None:
        ends = eos_ids or set()
        truncated = [not ids or ids[-1] not in ends for ids in completion_ids]
    return Rollouts(
        prompt_ids_NP=prompt_NP.to(device),
        prompt_mask_NP=pmask_NP.to(device),
        completion_ids_NT=comp_NT.to(device),
        attention_mask_NT=attn_NT.to(device),
        loss_mask_NT=loss_NT.to(device),
        truncated_N=torch.tensor(truncated, dtype=torch.bool).to(device),
        completions=list(texts),
        group_size=group_size,
        sampling_logp_NT=logp_NT.to(device) if logps is not None else None,
        meta=meta,
    )


@runtime_checkable
class RolloutEngine(Protocol):
    """What the learner needs from a sampler.

    Lifecycle: `build_engine` (or `from_config`) once per run, `generate` per step,
    `update_weights` after every optimizer step, `close` at the end (idempotent).

    Declared facts: `reports_sampling_logp` (whether `generate` fills
    `Rollouts.sampling_logp_NT`), and `default_mismatch_correction`, what
    `rollout.mismatch_correction: auto` becomes with this engine ("none" for an engine that
    samples with the trainer's own forward). Optional: `samples_from_policy` (default True),
    whether `generate` runs the learner's live module, whose weights a sharded layout
    (fsdp2) must gather for the sampling phase; `shared_by_processes` (default False), one
    engine that every trainer process talks to (a vLLM server), whose `update_weights(model,
    step=, weights=)` process 0 alone calls with the gathered weights; `overlaps_training`
    (default False), whether `generate` may run in a background thread while the learner
    updates the policy (train.async), after an optional `prepare_overlap()` that
    `build_engine(..., overlap=True)` calls once; `multi_turn` (default False), whether it
    has `sample_token_ids(contexts, params)` and `eos_ids()`, which multi-turn rollouts
    (`data.environment`, rollout/multiturn.py) need.
    """

    reports_sampling_logp: bool
    default_mismatch_correction: str

    @classmethod
    def from_config(
        cls,
        rollout_cfg: RolloutConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_prompt_length: int | None = None,
    ) -> RolloutEngine:
        """Build the engine for `model` (the policy) from the `rollout` config section."""
        ...

    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        """B prompts -> B*G rollouts, groups contiguous."""
        ...

    def update_weights(self, model: torch.nn.Module, *, step: int) -> None:
        """Sample from `model`'s current weights from now on (called after each optimizer step
        with the unwrapped policy; `step` is the learner's step count after the update)."""
        ...

    def close(self) -> None:
        """Release the engine's resources; calling it again does nothing."""
        ...


ROLLOUT_ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine")

_ENGINE_METHODS = ("from_config", "generate", "update_weights", "close")


def sampling_params(rollout_cfg: RolloutConfig) -> SamplingParams:
    """The sampling part of the `rollout` config section."""
    return SamplingParams(
        num_generations=rollout_cfg.num_generations,
        temperature=rollout_cfg.temperature,
        top_p=rollout_cfg.top_p,
        top_k=rollout_cfg.top_k,
        max_new_tokens=rollout_cfg.max_new_tokens,
    )


def build_engine(
    rollout_cfg: RolloutConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    max_prompt_length: int | None = None,
    overlap: bool = False,
) -> RolloutEngine:
    """The engine named by `rollout_cfg.engine`, built with its `from_config`; with
    `overlap` (train.async) one that declares `overlaps_training`, prepared for it.

    Raises ConfigError (key `rollout.engine`) for an unknown name, or for a registered
    class that lacks part of the `RolloutEngine` protocol; the latter is checked before
    building, so a broken plug-in fails before it loads anything.
    """
    name = rollout_cfg.engine
    try:
        cls = ROLLOUT_ENGINES.get(name)
    except RegistryError as exc:
        raise ConfigError(f"rollout.engine: {exc}") from None
    missing = [m for m in _ENGINE_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(
            f"rollout.engine: {name!r} ({getattr(cls, '__qualname__', cls)!r}) is not a "
            f"RolloutEngine: it lacks {', '.join(missing)} (needs {', '.join(_ENGINE_METHODS)})"
        )
    if overlap and not getattr(cls, "overlaps_training", False):
        raise ConfigError(
            f"train.async: rollout.engine {name!r} cannot sample while the policy trains (it "
            "does not declare overlaps_training); set train.async: off"
        )
    engine = cls.from_config(rollout_cfg, model, tokenizer, max_prompt_length=max_prompt_length)
    if overlap and not getattr(engine, "overlaps_training", False):
        raise ConfigError(
            f"train.async: rollout.engine {name!r} in this mode cannot sample while the "
            "policy trains; set train.async: off"
        )
    if overlap and callable(getattr(engine, "prepare_overlap", None)):
        engine.prepare_overlap()  # type: ignore[attr-defined]
    if not isinstance(engine, RolloutEngine):
        raise ConfigError(
            f"rollout.engine: {name!r}.from_config returned {type(engine).__qualname__}, "
            f"which is not a RolloutEngine (needs {', '.join(_ENGINE_METHODS)})"
        )
    return engine


def completion_mask_from_eos(
    completion_ids_NT: Tensor, eos_ids: list[int]
) -> tuple[Tensor, Tensor]:
    """Mask up to and including the first EOS; truncated where no EOS appears.

    Returns (mask_NT float32, truncated_N bool).
    """
    is_eos = torch.zeros_like(completion_ids_NT, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids_NT == e
    T = completion_ids_NT.shape[1]
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long)
    )
    pos = torch.arange(T, device=completion_ids_NT.device).unsqueeze(0)
    mask = (pos <= first.unsqueeze(1)) & (pos < T)
    return mask.float(), ~has_eos
