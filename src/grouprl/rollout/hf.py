"""Rollouts with HF transformers `generate` (CPU or one GPU), sampling from the policy itself."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig

from grouprl.config import ConfigError
from grouprl.rollout.base import ROLLOUT_ENGINES, Rollouts, SamplingParams, completion_mask_from_eos
from grouprl.rollout.decode import DRAWS, check_decoder, sample_groups

if TYPE_CHECKING:
    from grouprl.config import RolloutConfig

log = logging.getLogger("grouprl")


def _cache_field(out: Any) -> str:
    """The name this transformers version gives the KV cache, in outputs and `generate` kwargs.

    Transformers 5.x renamed `past_key_values` to `cache` (the old name warns, FutureWarning);
    older releases (>= 4.56 is supported) know only `past_key_values`. A model output is a
    dataclass whose fields carry the current name, so ask it rather than the version number.
    """
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
    return "cache" if "cache" in names else "past_key_values"


# shared: one copy of each prompt's KV for its G samples, a preallocated cache
# (rollout/decode.py); generate: HF `generate` on G repeated prompts; auto: shared when its
# probe passes on the model, else generate (one warning)
DECODERS = ("auto", "shared", "generate")


@ROLLOUT_ENGINES.register("hf")
class HFEngine:
    """Samples G completions per prompt with `model.generate` on the policy itself.

    Prompts are left-padded so that every completion starts at the same column; sampling
    uses the global torch RNG, so a seeded run (and a resumed one) draws the same samples.
    It samples with the policy's own forward, so there is no sampler/trainer mismatch to
    correct and it reports no separate sampling log-probs, except under train.async
    (`prepare_overlap`), where it samples from a copy a step behind and reports them.
    """

    reports_sampling_logp = False
    samples_from_policy = True  # the learner's live module: gathered under fsdp2
    default_mismatch_correction = "none"
    overlaps_training = True  # train.async: after prepare_overlap, from its own copy
    multi_turn = True  # `sample_token_ids`: continues token-id contexts (rollout/multiturn.py)

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_prompt_length: int | None = None,
        share_prefill: bool = True,
        decoder: str = "auto",
        draw: str = "inverse_cdf",
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"rollout.decoder: {decoder!r} is not one of {', '.join(DECODERS)}")
        if draw not in DRAWS:
            raise ValueError(f"rollout.draw: {draw!r} is not one of {', '.join(DRAWS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.share_prefill = share_prefill
        self.decoder = decoder
        self.draw = draw
        self._shared_ok: dict[type, bool] = {}

    @classmethod
    def from_config(
        cls,
        rollout_cfg: RolloutConfig,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_prompt_length: int | None = None,
    ) -> HFEngine:
        return cls(
            model,
            tokenizer,
            max_prompt_length=max_prompt_length,
            share_prefill=rollout_cfg.share_prefill,
            decoder=rollout_cfg.decoder,
            draw=rollout_cfg.draw,
        )

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module, *, step: int) -> None:
        """Nothing to do when `model` is the policy this engine samples from (the usual case:
        the optimizer updated it in place); otherwise copy its weights into ours."""
        if model is self.model:
            return
        self.model.load_state_dict(model.state_dict())

    def close(self) -> None:
        """No resources of its own: the model belongs to the caller."""

    def prepare_overlap(self) -> None:
        """Sample from a copy of the policy instead of the live module, so that `generate`
        can run in a background thread while the learner updates the policy (train.async).
        The copy (a second set of weights) gets the policy's weights in `update_weights`
        after every step. From here on `generate` reports its own log-probs: the copy is a
        step behind the policy the trainer scores, and `rollout.mismatch_correction` weighs
        the difference (default tis). Needs the shared decoder, which draws from a seed per
        call (`SamplingParams.seed`) rather than the global RNG the training thread shares."""
        if not self.uses_shared_decoder():
            raise ConfigError(
                "train.async: one_step samples through rollout.decoder shared (seeded per "
                f"call, its own log-probs), which {type(self.model).__name__} cannot use "
                f"(rollout.decoder: {self.decoder}); set train.async: off"
            )
        own = copy.deepcopy(self.model)
        own.requires_grad_(False)
        self.model = own
        self.reports_sampling_logp = True
        self.samples_from_policy = False
        self.default_mismatch_correction = "tis"

    def _prefill_once(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor, G: int) -> dict[str, Any]:
        """KV cache of each prompt but its last token, computed once and repeated G times.

        Returned as the `generate` kwarg that carries it (empty when unavailable). `generate`
        then runs only the last prompt token per row, so prefill costs P tokens per prompt
        instead of G*P. Same positions and masks as generate's own prefill, so the logits,
        and hence the samples for a given seed, are the same (tests check it).
        """
        if ids_BP.shape[1] < 2:
            return {}
        pos = (mask_BP.long().cumsum(1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids_BP[:, :-1],
            attention_mask=mask_BP[:, :-1],
            position_ids=pos[:, :-1],
            use_cache=True,
        )
        key = _cache_field(out)
        cache = getattr(out, key, None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return {}
        cache.batch_repeat_interleave(G)
        return {key: cache}

    def uses_shared_decoder(self) -> bool:
        """Whether this model samples through the shared-prompt decoder (probed once)."""
        if self.decoder == "generate":
            return False
        cls = type(self.model)
        if cls not in self._shared_ok:
            ok, reason = check_decoder(self.model, self._vocab_size())
            if not ok and self.decoder == "shared":
                raise ConfigError(f"rollout.decoder shared: {cls.__name__}: {reason}")
            if not ok:
                log.warning(
                    "%s: shared-prompt decoder off, using generate (%s)", cls.__name__, reason
                )
            self._shared_ok[cls] = ok
        return self._shared_ok[cls]

    def _vocab_size(self) -> int:
        emb = self.model.get_input_embeddings()
        return int(emb.weight.shape[0]) if emb is not None else len(self.tokenizer)

    def eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return [ids] if isinstance(ids, int) else list(ids)

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        G = params.num_generations
        ids_BP, mask_BP = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        comp, logp_NT = self._sample(ids_BP, mask_BP, params)
        ids = ids_BP.repeat_interleave(G, dim=0)
        mask = mask_BP.repeat_interleave(G, dim=0)
        comp_mask, truncated = completion_mask_from_eos(comp, self.eos_ids())
        comp = torch.where(comp_mask.bool(), comp, torch.full_like(comp, tok.pad_token_id))
        texts = tok.batch_decode(comp, skip_special_tokens=True)
        return Rollouts(
            prompt_ids_NP=ids,
            prompt_mask_NP=mask.float(),
            completion_ids_NT=comp,
            attention_mask_NT=comp_mask,
            loss_mask_NT=comp_mask.clone(),
            truncated_N=truncated,
            completions=texts,
            group_size=G,
            sampling_logp_NT=None
            if logp_NT is None
            else torch.where(comp_mask.bool(), logp_NT[:, : comp.shape[1]], 0.0),
        )

    @torch.no_grad()
    def sample_token_ids(
        self, contexts: list[list[int]], params: SamplingParams
    ) -> list[tuple[list[int], list[float] | None]]:
        """`params.num_generations` continuations of each token-id context (rows of a context
        contiguous), each through its first EOS (kept) or `max_new_tokens`: the sampled ids
        exactly, never re-tokenized, with the sampler's log-probs when it reports them."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        P = max(len(c) for c in contexts)
        ids_BP = torch.full((len(contexts), P), pad, dtype=torch.long, device=device)
        mask_BP = torch.zeros((len(contexts), P), dtype=torch.long, device=device)
        for b, c in enumerate(contexts):  # left-padded, as generate pads prompts
            if c:
                ids_BP[b, P - len(c) :] = torch.tensor(c, device=device)
                mask_BP[b, P - len(c) :] = 1
        comp, logp_NT = self._sample(ids_BP, mask_BP, params)
        real, _ = completion_mask_from_eos(comp, self.eos_ids())
        out = []
        for n in range(comp.shape[0]):
            k = int(real[n].sum())
            lp = None if logp_NT is None else logp_NT[n, :k].tolist()
            out.append((comp[n, :k].tolist(), lp))
        return out

    def _sample(
        self, ids_BP: torch.Tensor, mask_BP: torch.Tensor, params: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Completion ids [B*G, T] (pad after EOS not applied yet) and, when this engine
        reports them, the sampler's log-probs [B*G, >= T]."""
        tok = self.tokenizer
        device = ids_BP.device
        G = params.num_generations
        ids = ids_BP.repeat_interleave(G, dim=0)
        mask = mask_BP.repeat_interleave(G, dim=0)
        greedy = params.temperature == 0
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            pad_token_id=tok.pad_token_id,
            eos_token_id=self.eos_ids(),
        )
        if not greedy:
            gen_kwargs.update(
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k
            )
        was_training = self.model.training
        self.model.eval()
        logp_NT = None
        if self.reports_sampling_logp:
            logp_NT = torch.zeros(
                (ids.shape[0], max(params.max_new_tokens, 1)), dtype=torch.float32, device=device
            )
        try:
            if self.uses_shared_decoder():
                gen = None
                if params.seed is not None:
                    gen = torch.Generator(device=device).manual_seed(params.seed)
                comp = sample_groups(
                    self.model,
                    ids_BP,
                    mask_BP,
                    G=G,
                    max_new_tokens=params.max_new_tokens,
                    eos_ids=self.eos_ids(),
                    pad_id=tok.pad_token_id,
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    generator=gen,
                    logp_out_NT=logp_NT,
                    draw=self.draw,
                )
            else:
                if params.seed is not None:
                    raise ValueError("SamplingParams.seed needs rollout.decoder shared")
                # only the configured warpers: transformers fills unset values of a passed
                # config from the model's own generation_config (e.g. a repetition penalty,
                # which the trainer's log-probs know nothing of), so that one is swapped out
                cache = (
                    self._prefill_once(ids_BP, mask_BP, G) if self.share_prefill and G > 1 else {}
                )
                own = self.model.generation_config
                self.model.generation_config = GenerationConfig()
                try:
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=GenerationConfig(**gen_kwargs),
                        **cache,
                    )
                finally:
                    self.model.generation_config = own
                comp = out[:, ids.shape[1] :]
        finally:
            self.model.train(was_training)
        if comp.shape[1] == 0:  # nothing generated at all: keep one pad column
            comp = torch.full((ids.shape[0], 1), tok.pad_token_id, dtype=ids.dtype, device=device)
        return comp, logp_NT
