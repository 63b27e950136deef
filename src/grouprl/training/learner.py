"""The learner: policy, reference, optimizer and schedule, and the micro-batched update.

It is the only code that runs the policy forward for training, so it is where data
parallelism (DDP / FSDP2) and adapters (LoRA) plug in. Every forward goes through the
`PolicyLogProbs` module, whose `forward` wrappers see. After each step it publishes the new
weights to the rollout engine (`publish_weights`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from grouprl.algorithms.mismatch import mismatch_stats
from grouprl.algorithms.types import BatchNorm, PolicyInputs
from grouprl.components import Components
from grouprl.config import Config
from grouprl.models.forward import PolicyLogProbs, completion_logprobs
from grouprl.models.lora import is_adapted, merged_state_dict
from grouprl.models.whole import whole
from grouprl.rollout.base import RolloutEngine, Rollouts
from grouprl.training.batching import micro_batches, packed_micro_batches, token_micro_batches
from grouprl.training.distributed import Dist
from grouprl.training.optim import build_optimizer, build_scheduler
from grouprl.training.parallel import build_strategy
from grouprl.training.plan import TrainBatch

log = logging.getLogger("grouprl")


def make_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the policy as it is now (π_ref)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


class Learner:
    """Owns the trainable policy; `update(TrainBatch)` runs `train.num_iterations` steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        components: Components,
        *,
        shared_prefix: bool,
        temperature: float,
        dist: Dist | None = None,
    ) -> None:
        self.model = model
        self.dist = dist or Dist()
        self.cfg = cfg
        self.components = components
        self.temperature = temperature
        self.policy = PolicyLogProbs(
            model,
            shared_prefix=shared_prefix,
            chunk_size=cfg.model.logprob_chunk_size,
            attn_backend=cfg.model.shared_prefix_backend,
        )
        # No reference model unless a component asks for one (e.g. kl with beta > 0). With
        # LoRA the reference is the base model itself: the adapters switched off, no copy.
        self.ref_is_base = components.needs_ref and is_adapted(model)
        self.ref_model = (
            make_reference(model) if components.needs_ref and not self.ref_is_base else None
        )
        self.ref_policy = (
            PolicyLogProbs(
                self.ref_model,
                shared_prefix=shared_prefix,
                chunk_size=cfg.model.logprob_chunk_size,
                attn_backend=cfg.model.shared_prefix_backend,
            )
            if self.ref_model is not None
            else None
        )
        # lay the weights out over the processes before the optimizer sees them
        self.strategy = build_strategy(cfg.train.strategy, self.dist)
        self.strategy.prepare(self.policy, self.ref_policy)
        self.optimizer = build_optimizer(model, cfg.train)
        total_updates = cfg.train.max_steps * cfg.train.num_iterations
        self.scheduler = build_scheduler(self.optimizer, cfg.train, total_updates)

    @property
    def shared_prefix(self) -> bool:
        return self.policy.shared_prefix

    def sampling(self, engine: RolloutEngine) -> contextlib.AbstractContextManager[None]:
        """Around a sampling phase (collect, evaluate), entered by every process: the policy's
        weights as an engine that samples from the live module needs them (gathered under
        fsdp2; an engine with weights of its own, like vLLM, needs nothing)."""
        if not getattr(engine, "samples_from_policy", True):
            return contextlib.nullcontext()
        return self.strategy.generation(self.policy)

    def model_state(self, *, reference: bool = False) -> dict[str, Tensor]:
        """The policy's (or reference's) weights, whole (collective: every process calls)."""
        model = self.ref_model if reference else self.model
        assert model is not None
        return self.strategy.model_state(model)

    # ------------------------------------------------------------------ forwards
    def logprobs(
        self,
        ro: Rollouts,
        *,
        policy: torch.nn.Module | None = None,
        with_entropy: bool,
        entropy_grad: bool = False,
        temperature_scale: float = 1.0,
        second: str | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropy) of every real completion token, at the
        sampling temperature (times `temperature_scale`); 0 on padding."""
        return completion_logprobs(
            self.policy if policy is None else policy,
            ro.prompt_ids_NP,
            ro.prompt_mask_NP,
            ro.completion_ids_NT,
            ro.attention_mask_NT,
            temperature=self.temperature * temperature_scale,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            second=second,
        )

    def micro_batches(self, ro: Rollouts) -> list[slice]:
        """By `train.micro_batch_tokens` when set (padded tokens per forward), else by
        `train.micro_batch_size` rows; losses that couple a group's rows, and the packed
        layout under a token budget, get whole groups."""
        budget = self.cfg.train.micro_batch_tokens
        if budget <= 0:
            G = ro.group_size if self.components.whole_groups else 1
            return micro_batches(ro.num_rollouts, self.cfg.train.micro_batch_size, G)
        G = ro.group_size if (self.components.whole_groups or self.shared_prefix) else 1
        prompt_N = ro.prompt_mask_NP.sum(1).long()
        comp_N = ro.attention_mask_NT.sum(1).long()
        if self.shared_prefix:  # groups [prompt; c_1; ...; c_G], several to a packed row
            pid, pmask = ro.prompt_ids_NP, ro.prompt_mask_NP
            pack = self.policy.pack_rows  # the forward's layout decides the cost
            return packed_micro_batches(pid, pmask, comp_N.tolist(), G, budget, pack)
        length_U = (prompt_N + comp_N).view(-1, G).amax(1).tolist()
        return token_micro_batches(length_U, G, G, budget)

    def _own_micro_batches(self, ro: Rollouts, spare: Rollouts | None) -> list[slice | None]:
        """The micro-batches of `ro`. With `spare` (this process's share of a batch split over
        processes) and collective forwards (fsdp2), padded with None up to the most any
        process has: each None is a zero-weight forward on `spare` (`_idle_forward`)."""
        mbs: list[slice | None] = list(self.micro_batches(ro)) if ro.num_rollouts else []
        if spare is not None and self.strategy.aligned_forwards:
            most = max(self.dist.gather(len(mbs)))
            mbs += [None] * (most - len(mbs))
        return mbs

    def _idle_forward(
        self, spare: Rollouts, *, backward: bool, policy: torch.nn.Module | None = None
    ) -> None:
        """A forward (and backward) that changes nothing, on `spare` (one row of the step's
        batch): the collectives of a micro-batch this process does not have."""
        lp, _ = self.logprobs(spare, policy=policy, with_entropy=False)
        if backward:
            (lp.sum() * 0.0).backward()

    @torch.no_grad()
    def prepass(
        self,
        ro: Rollouts,
        with_entropy: bool,
        *,
        policy: torch.nn.Module | None = None,
        spare: Rollouts | None = None,
        temperature_scale: float = 1.0,
        second: str | None = None,
    ) -> dict[str, Tensor]:
        """Log-probs (and entropy) of the batch under `policy` (default: the policy as it is
        now, i.e. the sampling policy), in the update's micro-batches (`spare`: see
        `_own_micro_batches`); `temperature_scale` rescales the sampling temperature (DCPO
        re-scores the sampled tokens at another temperature); `second="curvature"`: the
        "entropy_NT" entry holds CAPO's head curvature instead."""
        logps, ents = [], []
        for s in self._own_micro_batches(ro, spare):
            if s is None:
                assert spare is not None
                self._idle_forward(spare, backward=False, policy=policy)
                continue
            if _only_padding(ro, s):  # no token to score: zeros (and an aligned forward)
                if spare is not None and self.strategy.aligned_forwards:
                    self._idle_forward(spare, backward=False, policy=policy)
                zeros = ro.attention_mask_NT[s].new_zeros(ro.attention_mask_NT[s].shape).float()
                logps.append(zeros)
                if with_entropy:
                    ents.append(zeros.clone())
                continue
            lp, ent = self.logprobs(
                ro.select(s),
                policy=policy,
                with_entropy=with_entropy,
                temperature_scale=temperature_scale,
                second=second,
            )
            logps.append(lp)
            if ent is not None:
                ents.append(ent)
        if not logps:  # no rows of its own
            return {
                "old_logp_NT": ro.attention_mask_NT.new_zeros(
                    ro.attention_mask_NT.shape, dtype=torch.float32
                )
            }
        out = {"old_logp_NT": torch.cat(logps)}
        if ents:
            out["entropy_NT"] = torch.cat(ents)
        return out

    def _ref_logp(self, ro: Rollouts, spare: Rollouts | None = None) -> Tensor | None:
        """π_ref's log-probs of the batch: the frozen copy's, or with LoRA the policy's own
        forward with its adapters switched off (PEFT's `disable_adapter`)."""
        if self.ref_policy is not None:
            return self.prepass(ro, False, policy=self.ref_policy, spare=spare)["old_logp_NT"]
        if self.ref_is_base:
            with self.model.disable_adapter():  # type: ignore[operator]
                return self.prepass(ro, False, spare=spare)["old_logp_NT"]
        return None

    # ------------------------------------------------------------------ the update
    def update(self, tb: TrainBatch, *, step: int) -> dict[str, float]:
        """`num_iterations` optimizer steps over the batch, micro-batched with exact
        normalization: the policy term over `tb.policy_mask_NT`, the regularizers over the
        loss mask, both normalizers spanning the whole batch (`TrainBatch`)."""
        cfg, comp = self.cfg.train, self.components
        spare = None
        # rows a strategy sampled from another prompt (Guide-GRPO): decided on the whole
        # batch, so that every process runs the same forwards
        in_context = tb.rollouts.behavior_prompt_ids_NP is not None
        if self.dist.active:  # this rank's groups; normalizers stay those of the whole batch
            G = tb.rollouts.group_size
            mine = self.dist.shard(tb.rollouts.num_rollouts // G)
            spare = tb.rollouts.select(slice(0, 1))
            tb = tb.rows(slice(mine.start * G, mine.stop * G))
        ro, mask = tb.rollouts, tb.loss_mask_NT
        group_N = torch.arange(ro.num_rollouts, device=mask.device) // ro.group_size
        # With one iteration the policy has not moved when each micro-batch runs, so
        # logp.detach() *is* π_old: same forward, ratio exactly 1, one forward saved.
        old_logp_NT = tb.old_logp_NT if cfg.num_iterations > 1 else None
        if old_logp_NT is None and cfg.num_iterations > 1:
            old_logp_NT = self.prepass(ro, False, spare=spare)["old_logp_NT"]
        ref_logp = self._ref_logp(ro, spare)
        # π_old of such rows is the sampling policy in the context they were sampled from:
        # ratio = π_θ(o | training prompt) / π_old(o | sampling prompt)
        behavior_N = ro.behavior_N if in_context else None
        behavior_logp = (
            self.prepass(ro.behavior_view(), False, spare=spare)["old_logp_NT"]
            if behavior_N is not None
            else None
        )
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        scalar_stats: dict[str, list[float]] = defaultdict(list)
        minmax: dict[str, float] = {}
        self.model.train()
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for s in self._own_micro_batches(ro, spare):
                if s is None:
                    assert spare is not None
                    self._idle_forward(spare, backward=True)
                    continue
                if _only_padding(ro, s):  # padding rows of ragged groups: no loss, no tokens
                    if spare is not None and self.strategy.aligned_forwards:
                        self._idle_forward(spare, backward=True)
                    continue
                mb = ro.select(s)
                logp, ent = self.logprobs(
                    mb, with_entropy=True, entropy_grad=comp.needs_entropy_grad
                )
                assert ent is not None
                mask_mb = mask[s]
                old = old_logp_NT[s] if old_logp_NT is not None else logp.detach()
                if behavior_N is not None and behavior_logp is not None:
                    old = torch.where(behavior_N[s].to(old.device)[:, None], behavior_logp[s], old)
                inp = PolicyInputs(
                    logp_NT=logp,
                    old_logp_NT=old,
                    mask_NT=mask_mb,
                    adv_N=tb.adv_N[s],
                    entropy_NT=ent if comp.needs_entropy_grad else ent.detach(),
                    ref_logp_NT=ref_logp[s] if ref_logp is not None else None,
                    rewards_N=tb.rewards_N[s] if tb.rewards_N is not None else None,
                    group_N=group_N[s],
                    token_weight_NT=tb.token_weight_NT[s]
                    if tb.token_weight_NT is not None
                    else None,
                    norm=tb.policy_norm,
                    step=step * cfg.num_iterations + it,
                    item_index_NT=tb.item_index_NT[s] if tb.item_index_NT is not None else None,
                    sft_N=mb.sft_N,
                    offpolicy_N=mb.offpolicy_N,
                )
                policy = comp.loss(inp)
                extra, mm_mask = self._mismatch(policy, inp, mb.sampling_logp_NT, minmax)
                inp.norm = tb.reg_norm
                regs = [reg(inp) for reg in comp.regularizers]
                loss = self._aggregate(policy, tb.policy_mask_NT[s], tb.policy_norm)
                for term in regs:
                    loss = loss + self._aggregate(term, mask_mb, tb.reg_norm)
                loss.backward()
                total_loss += float(loss.detach())
                n_tok = float(mask_mb.sum())
                stats = {"entropy": ent.detach()}
                for term in [policy, *regs]:
                    stats.update(term.stats_NT)
                    for k, v in term.stats.items():
                        scalar_stats[k].append(float(v))
                for k, v in stats.items():
                    sums[k] += float((v.detach() * mask_mb).sum())
                    counts[k] += n_tok
                for k, v in extra.items():  # over the tokens with sampler log-probs
                    sums[k] += float((v.detach() * mm_mask).sum())
                    counts[k] += float(mm_mask.sum())
            self.strategy.sync_gradients(self.model)
            grad_norm = self._step(step, sums, counts)
        if self.dist.active:
            sums, counts, scalar_stats, minmax, total_loss = self._merge_stats(
                sums, counts, scalar_stats, minmax, total_loss
            )
        out = {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
        out.update({k: sum(v) / len(v) for k, v in scalar_stats.items()})
        out.update(minmax)
        out["loss"] = total_loss
        out["grad_norm"] = grad_norm
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    def _mismatch(
        self,
        policy: Any,
        inp: PolicyInputs,
        sampling_logp_NT: Tensor | None,
        minmax: dict[str, float],
    ) -> tuple[dict[str, Tensor], Tensor]:
        """With the sampler's own log-probs: the mismatch metrics, and the configured
        importance weights applied to the per-token policy term (algorithms/mismatch.py).
        Returns per-token stats and the tokens to average them over."""
        if sampling_logp_NT is None:
            return {}, inp.mask_NT
        # tokens with no sampler log-prob (NaN: a strategy's inserted rows) and
        # demonstration rows (sampled in another context, no policy term) are left out:
        # ratio 1, no stats
        known_NT = torch.isfinite(sampling_logp_NT) & (inp.mask_NT != 0)
        if inp.sft_N is not None:
            known_NT &= ~inp.sft_N.to(known_NT.device)[:, None]
        old_NT = inp.old_logp_NT.detach()
        sampling_logp_NT = torch.where(known_NT, sampling_logp_NT, old_NT)
        mask_NT = inp.mask_NT * known_NT.to(inp.mask_NT.dtype)
        mm = mismatch_stats(inp.old_logp_NT, sampling_logp_NT, mask_NT)
        lo, hi = float(mm["mismatch/ratio_min"]), float(mm["mismatch/ratio_max"])
        minmax["mismatch/ratio_min"] = min(minmax.get("mismatch/ratio_min", lo), lo)
        minmax["mismatch/ratio_max"] = max(minmax.get("mismatch/ratio_max", hi), hi)
        extra = {"mismatch/kl": mm["mismatch/kl"], "mismatch/ratio_mean": mm["mismatch/ratio"]}
        correction = self.components.mismatch
        if correction is not None and policy.aggregated is None:
            w_NT = correction(
                {
                    "logp_NT": inp.old_logp_NT,
                    "sampling_logp_NT": sampling_logp_NT,
                    "mask_NT": inp.mask_NT,
                }
            ).to(policy.per_token_NT.dtype)
            # tokens with no sampler log-prob are trained as they are (weight 1)
            w_NT = torch.where(known_NT | (inp.mask_NT == 0), w_NT, torch.ones_like(w_NT))
            policy.per_token_NT = policy.per_token_NT * w_NT
            extra["mismatch/weight_mean"] = w_NT
        return extra, mask_NT

    def _merge_stats(
        self,
        sums: dict[str, float],
        counts: dict[str, float],
        scalar_stats: dict[str, list[float]],
        minmax: dict[str, float],
        total_loss: float,
    ) -> tuple[Any, Any, Any, Any, float]:
        """The update's metrics over all ranks' rows (token sums and counts added)."""
        parts = self.dist.gather((dict(sums), dict(counts), dict(scalar_stats), minmax, total_loss))
        S: dict[str, float] = defaultdict(float)
        C: dict[str, float] = defaultdict(float)
        L: dict[str, list[float]] = defaultdict(list)
        M: dict[str, float] = {}
        for s, c, sc, mm, _ in parts:
            for k, v in s.items():
                S[k] += v
            for k, v in c.items():
                C[k] += v
            for k, v in sc.items():
                L[k].extend(v)
            for k, v in mm.items():
                M[k] = (min if k.endswith("_min") else max)(M.get(k, v), v)
        if "train/skipped_updates" in S:  # every rank skipped the same update
            S["train/skipped_updates"] /= self.dist.world
            C["train/skipped_updates"] = 1
        return S, C, L, M, sum(p[4] for p in parts)

    def _step(self, step: int, sums: dict[str, float], counts: dict[str, float]) -> float:
        """Clip, then one optimizer and schedule step; a non-finite gradient skips the update."""
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.train.max_grad_norm
        )
        grad_norm = whole(grad_norm)  # fsdp2: a DTensor
        if not math.isfinite(float(grad_norm)):
            # A NaN/inf gradient would poison the weights: skip this update, keep the run.
            self.optimizer.zero_grad(set_to_none=True)
            sums["train/skipped_updates"] += 1
            counts["train/skipped_updates"] = 1
            log.warning("step %d: non-finite gradient norm, update skipped", step + 1)
            with warnings.catch_warnings():  # the schedule still advances one update
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.optimizer.step()
            self.scheduler.step()
        return float(grad_norm)

    def _aggregate(self, term: Any, mask_NT: Tensor, norm: BatchNorm) -> Tensor:
        if term.aggregated is not None:  # a term that normalizes itself (e.g. DisCO)
            return term.aggregated
        return self.components.aggregation(term.per_token_NT, mask_NT, norm)

    def publish_weights(self, engine: RolloutEngine, step: int) -> None:
        """Hand the updated policy to the rollout engine (a no-op for one that samples from
        the live module). An engine that all processes share (one vLLM server) is updated
        once, by process 0, with the weights gathered whole; the others wait for it, so no
        process samples from the old weights."""
        if self.dist.active and getattr(engine, "shared_by_processes", False):
            weights = (  # both collective under fsdp2: every process computes them
                merged_state_dict(self.model)  # LoRA: the merged weights, base names
                if is_adapted(self.model)
                else self.strategy.model_state(self.model)
            )
            if self.dist.is_main:
                engine.update_weights(self.model, step=step, weights=weights)  # type: ignore[call-arg]
            self.dist.barrier()
            return
        engine.update_weights(self.model, step=step)


def _only_padding(ro: Rollouts, s: slice) -> bool:
    """Whether micro-batch `s` holds padding rows only (groups of different sizes filled up
    to one: `Rollouts.pad_N`); such a slice has no token to score or train."""
    return ro.pad_N is not None and bool(ro.pad_N[s].all())
