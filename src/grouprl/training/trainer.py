"""The GRPO-family trainer: rollouts -> rewards -> advantages -> clipped policy updates.

The trainer orchestrates; every formula it applies comes from a registered component
(`grouprl.components`), so methods change by config, not by editing this loop.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from grouprl.algorithms.advantages import combine_rewards, group_reward_stats
from grouprl.algorithms.types import BatchNorm, PolicyInputs
from grouprl.components import Components, build_components, build_rewards
from grouprl.config import Config, ConfigError, dump_config, load_config
from grouprl.data.datasets import PromptDataset, load_prompts
from grouprl.data.sampler import PromptSampler
from grouprl.eval.answers import extract_answer
from grouprl.models.forward import completion_logprobs
from grouprl.models.loading import load_model_and_tokenizer
from grouprl.monitor.collapse import CollapseMonitor
from grouprl.monitor.progress import ProgressBar
from grouprl.monitor.sinks import MetricsLogger
from grouprl.rollout.base import ROLLOUT_ENGINES, Rollouts, SamplingParams
from grouprl.training.batching import micro_batches, reward_inputs, rollout_columns
from grouprl.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from grouprl.training.collect import (
    ScoredBatch,
    batch_inputs,
    concat_batches,
    first_per_group,
)
from grouprl.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("grouprl")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    history: list[dict[str, float]]
    stopped_early: bool = False  # train.stop_on_collapse ended the run


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _task(cfg: Config) -> Any:
    from grouprl.data.tasks import get_task

    try:
        return get_task(str(cfg.data.task), **cfg.data.task_params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data.task: {exc}") from None


def _benchmark_rows(name: str, path: str | Path, params: dict[str, Any]) -> list[dict]:
    from grouprl.data.benchmarks import load_benchmark
    from grouprl.registry import RegistryError

    try:
        return load_benchmark(name, path, **params)
    except RegistryError as exc:
        raise ConfigError(f"data.benchmark: {exc}") from None


def load_dataset_from_config(
    cfg: Config, tokenizer: Any, split: str = "train", source: Any = None
) -> PromptDataset:
    """The prompts of `split` (train: data.path or data.task; eval: data.eval_path or the
    task's held-out split), or of `source` (a path or a list of dicts) when given."""
    d = cfg.data
    if source is None:
        if d.task:
            source = _task(cfg).rows(split)
        else:
            source = d.path if split == "train" else d.eval_path
    if source is None:
        key = "data.path" if split == "train" else "data.eval_path"
        raise ConfigError(
            f"{key}: no {split} data given (a file path, or data.task for a built-in task)"
        )
    if d.benchmark and isinstance(source, (str, Path)):
        source = _benchmark_rows(d.benchmark, source, d.benchmark_params)
    return load_prompts(
        source if isinstance(source, (str, Path)) else list(source),
        tokenizer=tokenizer,
        prompt_column=d.prompt_column,
        max_prompt_length=d.max_prompt_length,
        on_bad_row=d.on_bad_row,
        chat_template=d.chat_template,
        split=d.split,
        system_prompt=d.system_prompt,
    )


class Trainer:
    """Runs `train.max_steps` GRPO-family steps as configured.

    >>> Trainer(load_config("run.yaml")).train()  # doctest: +SKIP

    model/tokenizer/train_dataset/reward_funcs, when given, replace what the config names;
    reward_funcs may mix TRL-style callables, built-in names and reward spec dicts.
    """

    def __init__(
        self,
        config: Config | dict[str, Any] | str | Path,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        train_dataset: PromptDataset | Sequence[dict[str, Any]] | str | None = None,
        reward_funcs: Sequence[Any] | None = None,
        overrides: Sequence[str] | None = None,
    ) -> None:
        cfg = config if isinstance(config, Config) else load_config(config, list(overrides or []))
        if reward_funcs is not None:
            cfg.rewards = list(reward_funcs)
        elif not cfg.rewards and cfg.data.task:
            cfg.rewards = list(_task(cfg).rewards)  # a built-in task knows how it is scored
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.components: Components = build_components(cfg)
        self.rewards = build_rewards(cfg)
        seed_everything(cfg.train.seed)
        if model is None:
            model, tokenizer, self.device = load_model_and_tokenizer(cfg.model)
        else:
            if tokenizer is None:
                raise ConfigError("a model object was given without its tokenizer")
            self.device = next(model.parameters()).device
        self.model, self.tokenizer = model, tokenizer
        if isinstance(train_dataset, PromptDataset):
            self.dataset = train_dataset
        else:
            self.dataset = load_dataset_from_config(cfg, tokenizer, source=train_dataset)
        if self.dataset.skipped:
            log.warning(
                "%s: skipped %d bad rows (data.on_bad_row=skip); first: %s",
                self.dataset.source,
                self.dataset.skipped,
                "; ".join(self.dataset.skipped_reasons[:3]),
            )
        self._eval_set: PromptDataset | None = None
        self.sampler = PromptSampler(
            len(self.dataset), seed=cfg.train.seed, shuffle=cfg.data.shuffle
        )
        self.sampling = SamplingParams(
            num_generations=cfg.rollout.num_generations,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        try:
            engine_cls = ROLLOUT_ENGINES.get(cfg.rollout.engine)
        except Exception as exc:
            raise ConfigError(f"rollout.engine: {exc}") from None
        self.engine = engine_cls(
            self.model,
            self.tokenizer,
            max_prompt_length=cfg.data.max_prompt_length,
            share_prefill=cfg.rollout.share_prefill,
        )
        self.shared_prefix = self._decide_shared_prefix()
        # No reference model unless a regularizer asks for one (e.g. kl with beta > 0).
        self.ref_model = self._make_reference() if self.components.needs_ref else None
        self.optimizer = build_optimizer(self.model, cfg.train)
        total_updates = cfg.train.max_steps * cfg.train.num_iterations
        self.scheduler = build_scheduler(self.optimizer, cfg.train, total_updates)
        self.step = 0
        self.stopped_early = False
        mode = cfg.train.collapse_monitor
        self.monitor = (
            CollapseMonitor()
            if mode == "on" or (mode == "auto" and "majority_vote" in self.rewards.names)
            else None
        )
        self.history: list[dict[str, float]] = []
        self.callbacks: list[Callable[[int, dict[str, float]], None]] = []

    # ------------------------------------------------------------------ setup helpers
    def _decide_shared_prefix(self) -> bool:
        from grouprl.models.shared_prefix import check_support

        mode = self.cfg.model.shared_prefix
        if mode == "off":
            return False
        ok, reason = check_support(self.model)
        if ok:
            return True
        if mode == "on":
            raise ConfigError(f"model.shared_prefix=on: this model cannot use it: {reason}")
        log.warning(
            "shared prefix off (model.shared_prefix=auto): %s; using the repeated layout", reason
        )
        return False

    def _make_reference(self) -> torch.nn.Module:
        ref = copy.deepcopy(self.model)
        ref.eval()
        ref.requires_grad_(False)
        return ref

    def _maybe_resume(self) -> None:
        if not self.cfg.train.resume:
            return
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            log.warning(
                "train.resume=true but no checkpoint in %s: starting from step 0", self.run_dir
            )
            return
        state = load_checkpoint(
            ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        if self.ref_model is not None and (self.run_dir / "reference").is_dir():
            from grouprl.training.checkpoint import load_weights

            load_weights(self.ref_model, self.run_dir / "reference")
        self.sampler.load_state_dict(state["data_cursor"])
        if self.monitor and state.get("collapse_monitor"):
            self.monitor.load_state_dict(state["collapse_monitor"])
        for key, comp_state in state.get("components", {}).items():
            stateful = self.components.stateful()
            if key in stateful:
                stateful[key].load_state_dict(comp_state)
        self.step = int(state["step"])
        log.info("resumed from %s (step %d)", ckpt, self.step)

    def _save(self) -> Path:
        return save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state={
                "data_cursor": self.sampler.state_dict(),
                "components": {k: c.state_dict() for k, c in self.components.stateful().items()},
                "collapse_monitor": self.monitor.state_dict() if self.monitor else None,
            },
            keep=self.cfg.train.keep_checkpoints,
        )

    # ------------------------------------------------------------------ one step
    def _forward(
        self,
        model: torch.nn.Module,
        ro: Rollouts,
        *,
        with_entropy: bool,
        entropy_grad: bool = False,
    ):
        return completion_logprobs(
            model,
            ro.prompt_ids_NP,
            ro.prompt_mask_NP,
            ro.completion_ids_NT,
            ro.completion_mask_NT,
            temperature=self.sampling.temperature,
            with_entropy=with_entropy,
            shared_prefix=self.shared_prefix,
            chunk_size=self.cfg.model.logprob_chunk_size,
            attn_backend=self.cfg.model.shared_prefix_backend,
            entropy_grad=entropy_grad,
        )

    # ------------------------------------------------------------------ sampling and scoring
    def _generate_and_score(self, n_prompts: int) -> ScoredBatch:
        indices = self.sampler.next(n_prompts)
        examples = [self.dataset[i] for i in indices]
        ro = self.engine.generate([ex.text for ex in examples], self.sampling)
        prompts, comps, columns = reward_inputs(examples, ro.completions, ro.group_size)
        for key, values in rollout_columns(ro, self.sampling.max_new_tokens).items():
            columns.setdefault(key, values)
        result = self.rewards(prompts, comps, columns)
        return ScoredBatch(
            examples, indices, ro, result.rewards_NK, dict(result.errors), dict(result.metrics)
        )

    def collect(self, B: int) -> tuple[ScoredBatch, dict[str, float]]:
        """B scored groups; a refilling filter (dynamic sampling) replaces dropped groups."""
        refill = next((f for f in self.components.sample_filters if f.refill), None)
        if refill is None:
            return self._generate_and_score(B), {}
        parts, kept, dropped, tries = [], 0, 0, 0
        while True:
            batch = self._generate_and_score(B - kept)
            tries += 1
            rewards_N = combine_rewards(batch.rewards_NK, self.rewards.weights_K)
            out = refill(batch_inputs(batch, rewards_N, self.rewards.weights_K))
            keep = [g for g in range(batch.num_groups) if not bool(out.drop_groups_B[g])]
            dropped += batch.num_groups - len(keep)
            if keep:
                parts.append(batch.select_groups(keep))
                kept += len(keep)
            if kept >= B or tries > out.max_tries:
                break
        stats = {
            f"{refill.name}/dropped_groups": float(dropped),
            f"{refill.name}/sampling_rounds": float(tries),
            f"{refill.name}/kept_groups": float(kept),
        }
        if not parts:  # every group was dropped: train on the last batch (its advantages are 0)
            return batch, stats
        return concat_batches(parts, self.tokenizer.pad_token_id), stats

    def _greedy_baseline(self, batch: ScoredBatch) -> torch.Tensor:
        """ReMax's baseline: the combined reward of one greedy completion per prompt."""
        params = replace(self.sampling, num_generations=1, temperature=0.0)
        ro = self.engine.generate([ex.text for ex in batch.examples], params)
        prompts, comps, columns = reward_inputs(batch.examples, ro.completions, 1)
        for key, values in rollout_columns(ro, self.sampling.max_new_tokens).items():
            columns.setdefault(key, values)
        res = self.rewards(prompts, comps, columns)
        return combine_rewards(res.rewards_NK, self.rewards.weights_K)

    def compute_advantages(
        self, batch: ScoredBatch, rewards_N: torch.Tensor, old: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """adv_N from the configured estimator and modifiers, fed by the inputs they name."""
        comp = self.components
        inputs = batch_inputs(batch, rewards_N, self.rewards.weights_K)
        B, G = batch.num_groups, batch.rollouts.group_size
        wanted = comp.advantage_inputs()
        if "baseline_B" in wanted:
            inputs["baseline_B"] = self._greedy_baseline(batch)
        if "seq_logp_BG" in wanted:
            inputs["seq_logp_BG"] = old["old_logp_NT"].sum(1).view(B, G)
        if "answers_BG" in wanted:
            ans = [extract_answer(c) for c in batch.rollouts.completions]
            inputs["answers_BG"] = [ans[b * G : (b + 1) * G] for b in range(B)]
        adv_BG = comp.advantage(inputs)
        for mod in comp.modifiers:
            adv_BG = mod({**inputs, "adv_BG": adv_BG})
        return adv_BG.reshape(-1).float()

    # ------------------------------------------------------------------ the update
    def _micro_batches(self, ro: Rollouts) -> list[slice]:
        size = self.cfg.train.micro_batch_size
        if self.components.needs_whole_groups:  # losses that couple a group's rows
            G = ro.group_size
            size = max(G, size - size % G)
        return micro_batches(ro.num_rollouts, size)

    @torch.no_grad()
    def _no_grad_pass(
        self, ro: Rollouts, *, with_entropy: bool, model: torch.nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """Log-probs (and entropy) of the batch under `model` (default: the policy as it is
        now, i.e. the sampling policy), in the update's micro-batches."""
        model = self.model if model is None else model
        logps, ents = [], []
        for s in self._micro_batches(ro):
            lp, ent = self._forward(model, ro.select(s), with_entropy=with_entropy)
            logps.append(lp)
            if ent is not None:
                ents.append(ent)
        out = {"old_logp_NT": torch.cat(logps)}
        if ents:
            out["entropy_NT"] = torch.cat(ents)
        return out

    def optimize(
        self,
        ro: Rollouts,
        adv_N: torch.Tensor,
        *,
        rewards_N: torch.Tensor | None = None,
        token_weight_NT: torch.Tensor | None = None,
        denominator: str = "all",
        old_logp_NT: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """`num_iterations` optimizer steps over the batch, micro-batched with exact normalization.

        The policy term is normalized over the tokens it trains on (all completion tokens,
        or only the selected ones for a token mask with denominator "selected"); the
        regularizers over all completion tokens. Both normalizers span the whole batch.
        """
        cfg, comp = self.cfg.train, self.components
        mask = ro.completion_mask_NT
        G = ro.group_size
        num_groups = ro.num_rollouts // G
        group_N = torch.arange(ro.num_rollouts, device=mask.device) // G
        policy_mask = (
            mask
            if token_weight_NT is None or denominator == "all"
            else mask * (token_weight_NT > 0)
        )
        policy_norm = BatchNorm.of(policy_mask, self.sampling.max_new_tokens, num_groups)
        reg_norm = BatchNorm.of(mask, self.sampling.max_new_tokens, num_groups)
        # With one iteration the policy has not moved when each micro-batch runs, so
        # logp.detach() *is* π_old: same forward, ratio exactly 1, one forward saved.
        if old_logp_NT is None and cfg.num_iterations > 1:
            old_logp_NT = self._no_grad_pass(ro, with_entropy=False)["old_logp_NT"]
        ref_logp = (
            self._no_grad_pass(ro, with_entropy=False, model=self.ref_model)["old_logp_NT"]
            if self.ref_model is not None
            else None
        )
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        scalar_stats: dict[str, list[float]] = defaultdict(list)
        self.model.train()
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for s in self._micro_batches(ro):
                mb = ro.select(s)
                logp, ent = self._forward(
                    self.model, mb, with_entropy=True, entropy_grad=comp.needs_entropy_grad
                )
                mask_mb = mask[s]
                inp = PolicyInputs(
                    logp_NT=logp,
                    old_logp_NT=old_logp_NT[s] if old_logp_NT is not None else logp.detach(),
                    mask_NT=mask_mb,
                    adv_N=adv_N[s],
                    entropy_NT=ent if comp.needs_entropy_grad else ent.detach(),
                    ref_logp_NT=ref_logp[s] if ref_logp is not None else None,
                    rewards_N=rewards_N[s] if rewards_N is not None else None,
                    group_N=group_N[s],
                    token_weight_NT=token_weight_NT[s] if token_weight_NT is not None else None,
                    norm=policy_norm,
                    step=self.step * cfg.num_iterations + it,
                )
                policy = comp.loss(inp)
                inp.norm = reg_norm
                regs = [reg(inp) for reg in comp.regularizers]
                loss = self._aggregate(policy, policy_mask[s], policy_norm)
                for term in regs:
                    loss = loss + self._aggregate(term, mask_mb, reg_norm)
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
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if not math.isfinite(float(grad_norm)):
                # A NaN/inf gradient would poison the weights: skip this update, keep the run.
                self.optimizer.zero_grad(set_to_none=True)
                sums["train/skipped_updates"] += 1
                counts["train/skipped_updates"] = 1
                log.warning("step %d: non-finite gradient norm, update skipped", self.step + 1)
                with warnings.catch_warnings():  # the schedule still advances one update
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
            else:
                self.optimizer.step()
                self.scheduler.step()
        out = {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
        out.update({k: sum(v) / len(v) for k, v in scalar_stats.items()})
        out["loss"] = total_loss
        out["grad_norm"] = float(grad_norm)
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    def _aggregate(self, term: Any, mask_NT: torch.Tensor, norm: BatchNorm) -> torch.Tensor:
        if term.aggregated is not None:  # a term that normalizes itself (e.g. DisCO)
            return term.aggregated
        return self.components.aggregation(term.per_token_NT, mask_NT, norm)

    def train_step(self) -> dict[str, float]:
        cfg, comp = self.cfg, self.components
        t0 = time.perf_counter()
        batch, metrics = self.collect(cfg.train.prompts_per_step)
        k = cfg.rollout.num_train_samples
        if 0 < k < batch.rollouts.group_size:
            batch = first_per_group(batch, k)
        ro = batch.rollouts
        B, G = batch.num_groups, ro.group_size
        t1 = time.perf_counter()
        rewards_N = combine_rewards(batch.rewards_NK, self.rewards.weights_K)
        # One no-grad pass of the sampling policy when a component needs its entropy or
        # log-probs over the whole batch (token masks, SEED-GRPO, XRPO, ...).
        mask_inputs = set(comp.token_mask.input_names) if comp.token_mask else set()
        calibrating = [r for r in comp.regularizers if getattr(r, "needs_calibration", False)]
        need_entropy = "entropy_NT" in mask_inputs or bool(calibrating)
        need_old = (
            need_entropy or "old_logp_NT" in mask_inputs or "seq_logp_BG" in comp.advantage_inputs()
        )
        old = self._no_grad_pass(ro, with_entropy=need_entropy) if need_old else {}
        adv_N = self.compute_advantages(batch, rewards_N, old)
        t2 = time.perf_counter()
        token_weight, denominator = None, "all"
        inputs = batch_inputs(batch, rewards_N, self.rewards.weights_K)
        inputs["adv_BG"] = adv_N.view(B, G)
        for flt in comp.sample_filters:
            if flt.refill:
                continue
            out = flt(inputs)
            row_w = out.keep_BG.reshape(-1, 1).to(ro.completion_mask_NT.dtype)
            token_weight = (
                row_w * ro.completion_mask_NT if token_weight is None else token_weight * row_w
            )
            metrics.update(out.stats)
        if comp.token_mask is not None:
            sel = comp.token_mask(
                {
                    "entropy_NT": old.get("entropy_NT"),
                    "old_logp_NT": old.get("old_logp_NT"),
                    "mask_NT": ro.completion_mask_NT,
                    "adv_N": adv_N,
                    "completion_ids_NT": ro.completion_ids_NT,
                    "group_N": torch.arange(ro.num_rollouts) // G,
                    "step": self.step,
                    "max_steps": cfg.train.max_steps,
                }
            )
            token_weight = (
                sel.token_weight_NT if token_weight is None else token_weight * sel.token_weight_NT
            )
            denominator = sel.denominator
            if sel.adv_N is not None:
                adv_N = sel.adv_N.float()
            metrics.update(sel.stats)
        for reg in calibrating:  # e.g. entropy-band bounds from the first batch's distribution
            reg.calibrate(old["entropy_NT"], ro.completion_mask_NT, token_weight)
        # with num_iterations == 1, the pre-pass log-probs are the same numbers the update's
        # forward gives (same inputs, same micro-batches), so reuse keeps the ratio exactly 1
        train_stats = self.optimize(
            ro,
            adv_N,
            rewards_N=rewards_N,
            token_weight_NT=token_weight,
            denominator=denominator,
            old_logp_NT=old.get("old_logp_NT") if cfg.train.num_iterations > 1 else None,
        )
        t3 = time.perf_counter()
        metrics.update(group_reward_stats(rewards_N.view(B, G)))
        metrics.update(batch.reward_metrics)
        for k, name in enumerate(self.rewards.names):
            col = batch.rewards_NK[:, k]
            valid = col[~torch.isnan(col)]
            metrics[f"rewards/{name}/mean"] = float(valid.mean()) if valid.numel() else float("nan")
            metrics[f"rewards/{name}/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
            metrics[f"rewards/{name}/errors"] = float(batch.errors.get(name, 0))
            metrics[f"rewards/{name}/nan_count"] = float(torch.isnan(col).sum())
        lengths = ro.lengths_N
        metrics["completions/mean_length"] = float(lengths.mean())
        metrics["completions/min_length"] = float(lengths.min())
        metrics["completions/max_length"] = float(lengths.max())
        metrics["completions/clipped_ratio"] = float(ro.truncated_N.float().mean())
        metrics["advantage/abs_mean"] = float(adv_N.abs().mean())
        if token_weight is not None:
            kept = (token_weight > 0).float() * ro.completion_mask_NT
            metrics["selection/kept_token_frac"] = float(
                kept.sum() / ro.completion_mask_NT.sum().clamp(min=1)
            )
        metrics.update(train_stats)
        tokens = float(ro.prompt_mask_NP.sum() + ro.completion_mask_NT.sum())
        metrics["time/generate"] = t1 - t0
        metrics["time/reward"] = t2 - t1
        metrics["time/train"] = t3 - t2
        metrics["time/step"] = t3 - t0
        metrics["tokens_per_second"] = tokens / max(t3 - t0, 1e-9)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out pass@1 / pass@n / maj@n and reward means (`eval/...` metrics)."""
        from grouprl.eval.run import evaluate

        if self._eval_set is None:
            data = load_dataset_from_config(self.cfg, self.tokenizer, split="eval")
            limit = self.cfg.train.eval_limit
            self._eval_set = data if not limit else [data[i] for i in range(min(limit, len(data)))]
        n = self.cfg.train.eval_samples
        res = evaluate(
            self.model,
            self.tokenizer,
            self._eval_set,
            self.rewards,
            n=n,
            ks=(1, n),
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            max_new_tokens=self.sampling.max_new_tokens,
            seed=self.cfg.train.seed,
        )
        return {f"eval/{k}": v for k, v in res.items()}

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        self._maybe_resume()
        if (
            self.ref_model is not None
            and not (self.run_dir / "reference").is_dir()
            and self.step == 0
        ):
            # Keep π_ref beside the run so a resumed run regularizes toward the same policy.
            self.ref_model.save_pretrained(self.run_dir / "reference", safe_serialization=True)
        logger = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, resume_step=self.step)
        try:
            with ProgressBar(
                cfg.max_steps, description="grpo", enabled=cfg.progress, initial=self.step
            ) as bar:
                while self.step < cfg.max_steps:
                    metrics = self.train_step()
                    self.step += 1
                    if cfg.eval_every and (
                        self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
                    ):
                        metrics.update(self.evaluate())
                    warnings_now = self.monitor.check(metrics) if self.monitor else []
                    if warnings_now:
                        metrics["collapse/warning"] = 1.0
                    logger.log(self.step, metrics)
                    self.history.append({"step": self.step, **metrics})
                    bar.update(self.step, metrics)
                    for msg in warnings_now:
                        bar.warn(f"step {self.step}: {msg}")
                    for name, n in (
                        (n, metrics.get(f"rewards/{n}/errors", 0)) for n in self.rewards.names
                    ):
                        if n:
                            bar.warn(
                                f"step {self.step}: reward {name!r} failed on this batch (NaN rewards, run continues)"
                            )
                    if (
                        cfg.save_every
                        and self.step % cfg.save_every == 0
                        and self.step < cfg.max_steps
                    ):
                        self._save()
                    for cb in self.callbacks:
                        cb(self.step, metrics)
                    if warnings_now and cfg.stop_on_collapse:
                        bar.warn(f"step {self.step}: stopping (train.stop_on_collapse=true)")
                        self.stopped_early = True
                        break
            self._save()
        finally:
            logger.close()
        return TrainResult(self.run_dir, self.step, self.history, self.stopped_early)


def train(
    config: Config | dict[str, Any] | str | Path | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: Any = None,
    reward_funcs: Sequence[Any] | None = None,
    overrides: Sequence[str] | None = None,
    **sections: Any,
) -> TrainResult:
    """One-call training: `grouprl.train(model="path", data={"path": ...}, rewards=[...])`.

    Keyword sections (model=..., data=..., train=..., loss=...) are merged into `config`;
    a string `model` is a model path, an object `model` is used as is.
    """
    base: dict[str, Any] = {}
    if isinstance(config, (str, Path)):
        from grouprl.config import yaml_load

        base = yaml_load(Path(config).read_text()) or {}
    elif isinstance(config, dict):
        base = copy.deepcopy(config)
    elif isinstance(config, Config):
        base = config.to_dict()
    if isinstance(model, str):
        base.setdefault("model", {})["name_or_path"] = model
        model = None
    for key, val in sections.items():
        base[key] = val
    cfg = load_config(base, list(overrides or []), check=True)
    return Trainer(
        cfg,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        reward_funcs=reward_funcs,
    ).train()
