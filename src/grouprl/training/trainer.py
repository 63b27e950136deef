"""The training loop: collect -> plan -> learn, with evaluation, checkpoints and logging.

One step: the `Collector` samples and scores a batch (training/collect.py), `plan_batch`
turns it into a `TrainBatch` on the whole batch (training/plan.py), the `Learner` runs the
micro-batched update and publishes the weights to the rollout engine (training/learner.py).
Every formula comes from a registered component (`grouprl.components`): methods change by
config, never by editing this loop.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grouprl.components import Components, build_components, build_rewards, load_config
from grouprl.config import Config, ConfigError, dump_config, recipe_info, yaml_load
from grouprl.data.datasets import PromptDataset, prompt_renderer
from grouprl.data.samplers import build_sampler
from grouprl.models.loading import load_model_and_tokenizer
from grouprl.models.lora import adapt, check_combination
from grouprl.monitor.collapse import CollapseMonitor
from grouprl.monitor.progress import ProgressBar
from grouprl.monitor.report import write_run_report
from grouprl.monitor.sinks import MetricsLogger, read_metrics
from grouprl.monitor.trackers import build_trackers
from grouprl.rewards.base import TrainerState
from grouprl.rewards.health import NoRewardError, RewardFailureError
from grouprl.rollout.base import RolloutEngineError, build_engine, sampling_params
from grouprl.training.checkpoint import checkpoint_dir, rng_state, save_checkpoint
from grouprl.training.collect import Collector
from grouprl.training.distributed import init_distributed
from grouprl.training.ema import EMAReference
from grouprl.training.learner import Learner
from grouprl.training.metrics import (
    completion_metrics,
    completion_rows,
    reward_metrics,
    timing_metrics,
)
from grouprl.training.pipeline import Pipeline
from grouprl.training.plan import plan_batch
from grouprl.training.resume import resume_run
from grouprl.training.rundir import RunLock, check_run_dir, move_aside
from grouprl.training.setup import (
    build_multi_turn,
    check_dataset_size,
    decide_shared_prefix,
    environment_tools,
    load_dataset_from_config,
    resolve_mismatch,
    resolve_rewards,
    seed_everything,
    training_prompts,
)
from grouprl.training.signals import StopRequests

log = logging.getLogger("grouprl")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    history: list[dict[str, float]]
    stopped_early: bool = False  # train.stop_on_collapse ended the run
    # what ended the run before max_steps: a signal name ("SIGTERM") or "SystemExit(...)"
    interrupted: str | None = None
    checkpoint: Path | None = None  # the last checkpoint written


class _NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def plain_config(cfg: Config) -> dict[str, Any]:
    """The config as YAML-safe data (what a checkpoint keeps to compare on resume)."""
    return yaml_load(dump_config(cfg))


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
        resolve_rewards(cfg, reward_funcs)
        check_combination(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.dist = init_distributed(cfg.train.strategy)
        if self.dist.active and torch.cuda.is_available() and cfg.model.device == "auto":
            cfg.model.device = f"cuda:{self.dist.local_rank}"
        # before anything loads: a folder that holds another run is refused here
        if self.dist.is_main:
            check_run_dir(self.run_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite)
        self.dist.barrier()
        self.components: Components = build_components(cfg)
        adv = self.components.advantage
        if adv.caps.offline_probe and adv.instance is not None and cfg.data.environment:
            if int(adv.instance.offline_samples) > 0:
                raise ConfigError(
                    "advantage.offline_init: the offline probe samples single-turn "
                    "completions; it cannot run with data.environment (set offline_init: 0)"
                )
        self.rewards = build_rewards(cfg)
        self.rewards.configure_health(
            cfg.train.reward_failure_limit, cfg.train.reward_failure_window
        )
        seed_everything(cfg.train.seed)
        if model is None:
            model, tokenizer, self.device = load_model_and_tokenizer(cfg.model)
        else:
            if tokenizer is None:
                raise ConfigError("a model object was given without its tokenizer")
            self.device = next(model.parameters()).device
        model = adapt(model, cfg.model)
        self.tokenizer = tokenizer
        self.multi_turn = build_multi_turn(cfg, tokenizer)  # data.environment, or None
        self.dataset = training_prompts(
            cfg, tokenizer, train_dataset, environment_tools(self.multi_turn)
        )
        check_dataset_size(cfg, len(self.dataset))
        self._eval_set: Any = None
        self.sampling = sampling_params(cfg.rollout)
        overlap = cfg.train.async_ != "off"
        self.engine = build_engine(
            cfg.rollout,
            model,
            tokenizer,
            max_prompt_length=cfg.data.max_prompt_length,
            overlap=overlap,
        )
        if self.multi_turn is not None and not getattr(self.engine, "multi_turn", False):
            raise ConfigError(
                f"data.environment: rollout.engine {cfg.rollout.engine!r} cannot run "
                "multi-turn rollouts yet (it does not declare multi_turn); use rollout.engine hf"
            )
        resolve_mismatch(cfg, self.components, self.engine)
        self.learner = Learner(
            model,
            cfg,
            self.components,
            shared_prefix=decide_shared_prefix(model, cfg.model.shared_prefix),
            temperature=self.sampling.temperature,
            dist=self.dist,
        )
        if self.dist.is_main:
            self._log_startup()
        # train.ema_reference: GRPO-CARE's slowly moving copy of the policy (training/ema.py)
        self.ema = (
            EMAReference(
                self.learner.model,
                tokenizer,
                cfg.train.ema_reference,
                temperature=self.sampling.temperature,
            )
            if cfg.train.ema_reference is not None
            else None
        )
        wants_ema = self.rewards.needs_ema_reference
        if wants_ema and self.ema is None:
            raise ConfigError(
                f"rewards: {', '.join(wants_ema)} reads the EMA reference's answer consistency; "
                "set train.ema_reference (e.g. {decay: 0.995, every: 10}) or use recipe=grpo_care"
            )
        self.collector = Collector(
            engine=self.engine,
            rewards=self.rewards,
            dataset=self.dataset,
            sampler=self._build_sampler(),
            sampling=self.sampling,
            pad_token_id=tokenizer.pad_token_id,
            refill=self.components.refill,
            want_baseline="baseline_B" in self.components.advantage_inputs(),
            num_train_samples=cfg.rollout.num_train_samples,
            # a background collection gathers over its own group (training/pipeline.py)
            dist=self.dist.split() if overlap else self.dist,
            device=self.device,
            missing_rewards=cfg.train.missing_rewards,
            multi_turn=self.multi_turn,
            strategy=self._build_strategy(),
            row_columns=self.ema.columns if self.ema is not None else None,
            render=prompt_renderer(
                tokenizer,
                chat_template=cfg.data.chat_template,
                system_prompt=cfg.data.system_prompt,
            ),
        )
        self.pipeline = Pipeline(self.collector, mode=cfg.train.async_, seed=cfg.train.seed)
        self._newlines: dict[int, int] | None = None
        self.step = 0
        self._unrewarded = 0  # consecutive steps without a single rewarded sample
        self._last_batch: tuple[Any, Any] | None = None
        self.stopped_early = False
        self.interrupted: str | None = None
        # data cursor and RNG as the current step began: what a mid-step exit saves
        self._step_start: tuple[dict[str, Any], dict[str, Any]] | None = None
        mode = cfg.train.collapse_monitor
        self.monitor = (
            CollapseMonitor()
            if mode == "on" or (mode == "auto" and self.rewards.collapse_risk)
            else None
        )
        self.history: list[dict[str, float]] = []
        self.callbacks: list[Callable[[int, dict[str, float]], None]] = []

    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    def _build_sampler(self) -> Any:
        """data.sampler over the training prompts; a bad name or parameter is a ConfigError."""
        cfg = self.cfg
        try:
            sampler = build_sampler(
                cfg.data.sampler, len(self.dataset), seed=cfg.train.seed, shuffle=cfg.data.shuffle
            )
        except ValueError as exc:  # RegistryError is a ValueError
            msg = str(exc)
            raise ConfigError(
                msg if msg.startswith("data.sampler") else f"data.sampler: {msg}"
            ) from None
        if hasattr(sampler, "budget"):  # rollouts per prompt vary: groups of different sizes
            name = cfg.data.sampler["name"]
            comps = self.components
            clashes = {
                # padding rows would count in their group statistics
                "sample_filters": bool(comps.sample_filters),
                "token_mask": comps.token_mask is not None,
                f"loss {comps.loss_name!r} (whole groups)": comps.whole_groups,
                "rollout.num_train_samples": cfg.rollout.num_train_samples > 0,
                "data.environment": cfg.data.environment is not None,
                "rollout.strategy": cfg.rollout.strategy.get("name", "plain") != "plain",
            }
            for key, clash in clashes.items():
                if clash:
                    raise ConfigError(
                        f"data.sampler: {name!r} gives prompts different numbers of rollouts, "
                        f"which {key} (as configured) does not support yet"
                    )
        return sampler

    def _newline_ids(self) -> dict[int, int] | None:
        """Token id -> newlines in its text, when a component needs each token's item (line):
        decoded once per run."""
        comps = self.components
        if not (comps.loss_caps.needs_items or "item_index_NT" in comps.wanted_inputs()):
            return None
        if self._newlines is None:
            from grouprl.algorithms.segments import newline_counts

            tok = self.tokenizer
            self._newlines = newline_counts([tok.decode([i]) for i in range(len(tok))])
        return self._newlines

    def _build_strategy(self) -> Any:
        """rollout.strategy (None for plain sampling); a bad parameter is a ConfigError."""
        from grouprl.training.strategies import build_strategy

        spec = self.cfg.rollout.strategy
        if spec.get("name", "plain") == "plain":
            return None
        try:
            strategy = build_strategy(spec)
        except ValueError as exc:
            msg = str(exc)
            raise ConfigError(
                msg if msg.startswith("rollout.strategy") else f"rollout.strategy: {msg}"
            ) from None
        if strategy.needs_continuation and not getattr(self.engine, "multi_turn", False):
            raise ConfigError(
                f"rollout.strategy: {spec['name']!r} continues rollouts from token ids, which "
                f"rollout.engine {self.cfg.rollout.engine!r} cannot; use rollout.engine hf or vllm"
            )
        if self.cfg.rollout.num_train_samples > 0:
            raise ConfigError(
                f"rollout.strategy: {spec['name']!r} with rollout.num_train_samples "
                f"{self.cfg.rollout.num_train_samples}: keeping the first rows of each group "
                "would drop the rows the strategy adds; set rollout.num_train_samples: 0"
            )
        if not strategy.refill_safe and any(f.caps.refills for f in self.components.sample_filters):
            raise ConfigError(
                f"rollout.strategy: {spec['name']!r} cannot run with a refilling sample filter "
                "(its rows would be judged by the groups they land in, round after round); "
                "remove the filter or the strategy"
            )
        if strategy.makes_sft_rows and not any(
            c.trains_sft_rows for c in self.components.regularizer_caps
        ):
            raise ConfigError(
                f"rollout.strategy: {spec['name']!r} adds demonstration rows that only a "
                "regularizer with trains_sft_rows trains; add regularizers: [{name: sft_rows}]"
            )
        return strategy

    def _log_startup(self) -> None:
        """What this run is, in a few lines: the recipe and every value of it the config
        changed, the model, the data, the batch, and the engine's choices."""
        cfg, lr = self.cfg, self.learner
        for line in cfg.trl_mappings:
            log.info("%s", line)
        if cfg.recipe:
            info = recipe_info(cfg.recipe)
            log.info("recipe %s: %s (%s)", cfg.recipe, info["description"], info["source"])
            for key, (theirs, yours) in cfg.recipe_overrides.items():
                log.info("  your config overrides the recipe's %s: %r -> %r", key, theirs, yours)
        params = sum(p.numel() for p in lr.model.parameters())
        trainable = sum(p.numel() for p in lr.model.parameters() if p.requires_grad)
        p0 = next(lr.model.parameters())
        reference = (
            "the base with adapters off"
            if lr.ref_is_base
            else ("a frozen copy" if lr.ref_model is not None else "none (no KL term)")
        )
        log.info(
            "model %s: %s parameters (%s trainable), %s on %s; reference policy: %s",
            cfg.model.name_or_path or type(lr.model).__name__,
            f"{params:,}",
            f"{trainable:,}",
            str(p0.dtype).removeprefix("torch."),
            p0.device,
            reference,
        )
        if self.dist.active:
            log.info(
                "%d processes (%s), train.strategy %s: each samples its share of the %d "
                "prompts per step; planning sees the whole batch",
                self.dist.world,
                "nccl" if torch.cuda.is_available() else "gloo",
                lr.strategy.name,
                cfg.train.prompts_per_step,
            )
        log.info(
            "data: %d prompts; %d prompts x %d samples per step, %d steps; engine %s; "
            "shared prefix %s; run folder %s",
            len(self.dataset),
            cfg.train.prompts_per_step,
            cfg.rollout.num_generations,
            cfg.train.max_steps,
            cfg.rollout.engine,
            "on" if lr.shared_prefix else "off",
            self.run_dir,
        )

    def close(self) -> None:
        """Release the rollout engine (GPU memory, server connections) and the reward worker."""
        self.pipeline.close()
        self.engine.close()
        self.rewards.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shared_prefix(self) -> bool:
        return self.learner.shared_prefix

    # ------------------------------------------------------------------ checkpoints
    def _maybe_resume(self) -> None:
        """With train.resume: continue from the newest usable checkpoint (see resume.py)."""
        if self.cfg.train.resume:
            self.step = resume_run(
                self.run_dir,
                self.cfg,
                plain_config(self.cfg),
                learner=self.learner,
                collector=self.collector,
                components=self.components,
                monitor=self.monitor,
                device=self.device,
            )
            if self.ema is not None and self.step:
                # the checkpoint resume_run restored (it skips a damaged newest one)
                self.ema.load(checkpoint_dir(self.run_dir, self.step), self.learner.model)

    def _offline_probe(self) -> None:
        """An estimator declared `offline_probe` with `offline_samples` K > 0 (single_stream's
        `offline_init`) starts from K samples per training prompt of the initial policy,
        drawn here, before the first step (a resumed run has its state from the checkpoint)."""
        adv = self.components.advantage
        if not adv.caps.offline_probe or adv.instance is None:
            return
        k = int(adv.instance.offline_samples)
        if k <= 0:
            return
        n = len(self.collector.dataset)
        if self.dist.is_main:
            log.info("offline probe: %d samples of each of %d prompts (%d rollouts)", k, n, k * n)

        def report(done: int, total: int) -> None:
            if self.dist.is_main and (done == total or done % 1024 < 64):
                log.info("offline probe: %d/%d prompts", done, total)

        self._tell_rewards(0)
        with self.learner.sampling(self.engine):  # every process in step (fsdp2 gathers)
            keys, wins = self.collector.probe(k, progress=report)
        adv.instance.init_offline(keys, wins, k)

    def _save(self, *, at_step_start: bool = False) -> Path:
        """A checkpoint of step `self.step`; `at_step_start` saves the data cursor and RNG of
        the moment the interrupted step began, so a resume repeats that step. Every process
        calls it: sharded weights are gathered, each process's RNG state is kept, process 0
        writes."""
        lr = self.learner
        cursor, rng = self.pipeline.cursor(), rng_state()
        if at_step_start and self._step_start is not None:
            cursor, rng = self._step_start
        weights = lr.model_state()  # collective under fsdp2
        opt_state = lr.strategy.optimizer_state(lr.optimizer)
        rngs = self.dist.gather(rng)
        if not self.dist.is_main:  # process 0 writes; the others wait for its path
            return Path(self.dist.gather(None)[0])
        path = save_checkpoint(
            self.run_dir,
            self.step,
            model=lr.model,
            tokenizer=self.tokenizer,
            optimizer=lr.optimizer,
            scheduler=lr.scheduler,
            trainer_state={
                "data_cursor": cursor,
                "components": {k: c.state_dict() for k, c in self.components.stateful().items()},
                "collapse_monitor": self.monitor.state_dict() if self.monitor else None,
                "config": plain_config(self.cfg),
                "world_size": self.dist.world,
            },
            keep=self.cfg.train.keep_checkpoints,
            rng=rngs[0],
            state_dict=weights,
            optimizer_state=opt_state,
            rank_rngs=rngs[1:],
            extra=self.ema.save if self.ema is not None else None,
        )
        self.dist.gather(str(path))  # (a no-op with one process)
        return path

    # ------------------------------------------------------------------ one step
    def _tell_rewards(self, step: int) -> None:
        sampler = self.collector.sampler
        self.rewards.trainer_state = TrainerState(  # `trainer_state`, as TRL passes it
            global_step=step,
            max_steps=self.cfg.train.max_steps,
            epoch=sampler.progress,
        )

    def _prefetch_next(self) -> bool:
        """train.async one_step: collect the next step's batch during this step's update,
        except past the end and for the first step after a checkpoint (it samples from the
        saved weights, so a resume repeats it exactly; training/pipeline.py)."""
        cfg, nxt = self.cfg.train, self.step + 1
        if not self.pipeline.overlaps or nxt >= cfg.max_steps:
            return False
        return not (cfg.save_every and nxt % cfg.save_every == 0)

    def train_step(self) -> dict[str, float]:
        """Collect, plan, update, publish the weights; returns the step's metrics."""
        cfg = self.cfg
        B = cfg.train.prompts_per_step
        t0 = time.perf_counter()
        ahead = self.pipeline.take(self.step)
        if ahead is None:
            self._tell_rewards(self.step)
            with self.learner.sampling(self.engine):
                batch, metrics = self.pipeline.collect_now(B, self.step)
            collect_s = None
        else:
            batch, metrics, collect_s = ahead
        if self._prefetch_next():
            self._tell_rewards(self.step + 1)
            self.pipeline.start(B, self.step + 1)
        t1 = time.perf_counter()
        train_batch, plan_metrics = plan_batch(
            batch,
            self.components,
            weights_K=self.rewards.weights_K,
            prepass=self.learner.prepass,
            step=self.step,
            max_steps=cfg.train.max_steps,
            max_new_tokens=self.sampling.max_new_tokens,
            newline_ids=self._newline_ids(),
        )
        t2 = time.perf_counter()
        train_stats = self.learner.update(train_batch, step=self.step)
        if self.collector.strategy is not None:  # e.g. AEPO steers by the update's entropy
            self.collector.strategy.observe(train_stats)
        if self.ema is not None and self.ema.after_step(self.model, self.step + 1):
            train_stats["ema_reference/updated"] = 1.0
        waited = self.pipeline.wait()  # the engine is idle before its weights change
        try:
            self.learner.publish_weights(self.engine, self.step + 1)
        except RolloutEngineError as exc:
            exc.after_update = True  # type: ignore[attr-defined]  # the step's update is done
            raise
        t3 = time.perf_counter()
        self._last_batch = (batch, train_batch)  # for the completions table
        metrics.update(plan_metrics)
        metrics.update(reward_metrics(batch, self.rewards.names))
        metrics.update(completion_metrics(batch))
        metrics.update(train_stats)
        metrics.update(timing_metrics(batch, t1 - t0, t2 - t1, t3 - t2))
        if self.pipeline.overlaps:
            # staleness: updates between the batch's sampling weights and this update's
            metrics["async/staleness"] = 0.0 if collect_s is None else 1.0
            metrics["async/wait"] = waited  # seconds the update waited for the next batch
            if collect_s is not None:
                metrics["time/collect_background"] = collect_s
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out pass@1 / pass@n / maj@n and reward means (`eval/...` metrics)."""
        from grouprl.eval.run import evaluate

        if self._eval_set is None:
            data = load_dataset_from_config(self.cfg, self.tokenizer, split="eval")
            limit = self.cfg.train.eval_limit
            self._eval_set = data if not limit else [data[i] for i in range(min(limit, len(data)))]
        n = self.cfg.train.eval_samples
        with self.learner.sampling(self.engine):
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
                engine=self.engine,
                multi_turn=self.multi_turn,
            )
        return {f"eval/{k}": v for k, v in res.items()}

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run to `train.max_steps`. SIGTERM / SIGINT / SIGHUP (or a SystemExit inside a step)
        end it early with a checkpoint and `TrainResult.interrupted` set; a second signal
        exits at once."""
        cfg = self.cfg.train
        main = self.dist.is_main  # rank 0 alone writes files, logs and draws the bar
        lock = RunLock(self.run_dir) if main else contextlib.nullcontext()
        with lock, StopRequests() as stops:
            if main and cfg.overwrite:
                move_aside(self.run_dir)
            elif main:  # checked in __init__; again now that no other process can start here
                check_run_dir(self.run_dir, resume=cfg.resume, overwrite=False)
            if main:
                (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            self.dist.barrier()
            self._maybe_resume()
            if self.step == 0:
                self._offline_probe()
            if self.step:  # the engine was built from the weights before the resume
                self.learner.publish_weights(self.engine, self.step)
            ref = self.learner.ref_model
            if ref is not None and self.step == 0:
                # Keep π_ref beside the run so a resumed run regularizes toward the same policy.
                weights = self.learner.model_state(reference=True)  # collective under fsdp2
                if main and not (self.run_dir / "reference").is_dir():
                    ref.save_pretrained(
                        self.run_dir / "reference", safe_serialization=True, state_dict=weights
                    )
            logger = (
                MetricsLogger(
                    self.run_dir,
                    tensorboard=cfg.tensorboard or "tensorboard" in cfg.report_to,
                    resume_step=self.step,
                    trackers=build_trackers(
                        cfg.report_to,
                        project=cfg.report_project,
                        run_dir=self.run_dir,
                        config=plain_config(self.cfg),
                    ),
                )
                if main
                else _NullLogger()
            )
            try:
                with ProgressBar(
                    cfg.max_steps,
                    description=self.cfg.recipe or "grpo",
                    enabled=cfg.progress and main,
                    initial=self.step,
                ) as bar:
                    mid_step = self._loop(bar, logger, stops)
                    path = self._save(at_step_start=mid_step)
                    if self.interrupted:
                        bar.warn(
                            f"stopped ({self.interrupted}) after step {self.step}: checkpoint "
                            f"{path}; resume with train.resume=true and the same "
                            f"train.output_dir ({self.run_dir})"
                        )
            finally:
                logger.close()
            if main:
                self._report(path)
        return TrainResult(
            self.run_dir, self.step, self.history, self.stopped_early, self.interrupted, path
        )

    def _loop(self, bar: ProgressBar, logger: MetricsLogger, stops: StopRequests) -> bool:
        """Steps until max_steps or a stop; True when a step was cut short (SystemExit)."""
        cfg = self.cfg.train
        while self.step < cfg.max_steps:
            requested = self._agreed_stop(stops.requested)
            if requested:
                self.interrupted = requested
                return False
            self._step_start = (self.pipeline.cursor(), rng_state())
            try:
                metrics = self.train_step()
            except SystemExit as exc:  # user code asked to exit: keep what is done
                if self.dist.active:  # one process alone cannot save; torchrun ends the rest
                    raise
                self.interrupted = f"SystemExit({exc.code!r}) during step {self.step + 1}"
                return True
            except RolloutEngineError as exc:  # a stuck or dead engine: keep what is done
                if self.dist.active:
                    raise
                if getattr(exc, "after_update", False):
                    self.step += 1
                path = self._save(at_step_start=not getattr(exc, "after_update", False))
                exc.args = (
                    f"{exc} The run is saved at step {self.step} ({path}); once the engine "
                    "is back, continue with train.resume=true.",
                )
                raise
            self.step += 1
            try:
                stop = self._after_step(metrics, bar, logger)
            except RolloutEngineError as exc:  # the evaluation's engine failed: keep the step
                if self.dist.active:
                    raise
                path = self._save()
                exc.args = (
                    f"{exc} The run is saved at step {self.step} ({path}); once the engine "
                    "is back, continue with train.resume=true.",
                )
                raise
            if stop:
                return False
            self._check_rewarded(metrics)
            failure = self.rewards.check_health()
            if self.dist.active:  # rewards run where their samples are: agree on stopping
                mine = failure.fields() if failure is not None else None
                seen = [f for f in self.dist.gather(mine) if f is not None]
                if seen and failure is None:
                    failure = RewardFailureError(*seen[0])
            if failure is not None:  # keep the steps done, then stop with the reason
                path = self._save()
                failure.args = (
                    f"{failure}. Stopped after step {self.step}, checkpoint {path} "
                    "(train.reward_failure_limit / train.reward_failure_window; a slow "
                    "function may need a longer rewards[*].timeout)",
                )
                raise failure
        if stops.requested:  # arrived during the last step
            self.interrupted = stops.requested
        return False

    def _report(self, checkpoint: Path) -> None:
        """summary.md and curves.png in the run folder (a report must not fail the run)."""
        try:
            write_run_report(
                self.run_dir,
                read_metrics(self.run_dir),
                {
                    "recipe": self.cfg.recipe or "(none: the config's components)",
                    "model": self.cfg.model.name_or_path or type(self.model).__name__,
                    "steps": self.step,
                    "last checkpoint": str(checkpoint),
                    "stopped": self.interrupted or ("early" if self.stopped_early else "no"),
                },
            )
        except Exception as exc:  # e.g. a read-only folder
            log.warning("could not write the run report: %s", exc)

    def _check_rewarded(self, metrics: dict[str, float]) -> None:
        """Stop, after a checkpoint, when no sample has had a reward for
        `train.nan_reward_steps` steps in a row: the run would train on nothing. (The
        metrics are of the whole batch, so every process decides alike.)"""
        limit = self.cfg.train.nan_reward_steps
        self._unrewarded = self._unrewarded + 1 if math.isnan(metrics["reward"]) else 0
        if not limit or self._unrewarded < limit:
            return
        why = []
        for name in self.rewards.names:
            last = self.rewards.last_error(name)
            nan = int(metrics.get(f"rewards/{name}/nan_count", 0))
            why.append(f"{name}: {nan} NaN" + (f", last error: {last}" if last else " (None)"))
        path = self._save()
        raise NoRewardError(
            f"no sample had a reward in the last {self._unrewarded} steps (every weighted "
            f"reward was None or failed): {'; '.join(why)}. Stopped after step {self.step}, "
            f"checkpoint {path} (train.nan_reward_steps)"
        )

    def _agreed_stop(self, requested: str | None) -> str | None:
        """A stop request (signal) as all processes see it: each receives its own signal at
        its own moment, and they must leave the loop at the same step."""
        if not self.dist.active:
            return requested
        reasons = [r for r in self.dist.gather(requested) if r]
        return reasons[0] if reasons else None

    def _after_step(self, metrics: dict[str, float], bar: ProgressBar, logger: Any) -> bool:
        """Evaluation, monitors, logging, checkpoint cadence, callbacks; True to stop."""
        cfg = self.cfg.train
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
            with bar.phase(f"evaluating after step {self.step}"):
                held_out = self.evaluate()
            metrics.update(held_out)
            shown = [
                f"{k.removeprefix('eval/')} {v:.4g}"
                for k, v in held_out.items()
                if isinstance(v, float) and "ci_" not in k and "num_" not in k
            ]
            bar.note(f"step {self.step}: held-out " + ", ".join(shown[:8]))
        every = cfg.log_completions_every
        if every and self.step % every == 0 and self._last_batch is not None:
            logger.log_completions(
                self.step, completion_rows(*self._last_batch, self.rewards.names)
            )
        warnings_now = self.monitor.check(metrics) if self.monitor else []
        if warnings_now:
            metrics["collapse/warning"] = 1.0
        logger.log(self.step, metrics)
        self.history.append({"step": self.step, **metrics})
        bar.update(self.step, metrics)
        for msg in warnings_now:
            bar.warn(f"step {self.step}: {msg}")
        # (a reward that failed on this batch was reported once, by the RewardSet)
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
            self._save()
        for cb in self.callbacks:
            cb(self.step, metrics)
        if warnings_now and cfg.stop_on_collapse:
            bar.warn(f"step {self.step}: stopping (train.stop_on_collapse=true)")
            self.stopped_early = True
            return True
        return False


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
        from grouprl.config import read_yaml_file

        base = read_yaml_file(Path(config))
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
    with Trainer(
        cfg,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        reward_funcs=reward_funcs,
    ) as trainer:
        return trainer.train()
