"""`rollout.vllm.mode: colocate` (the default of `rollout.engine: vllm`): vLLM in the trainer's
own process.

 vLLM is built from the policy's config with placeholder weights and the policy's
own weights are loaded in place right away, then after every optimizer step, through vLLM's
supported in-place reload (`reload_weights`); the prefix cache is reset after each sync.
On CUDA it sleeps during the update (`rollout.vllm.sleep_level`) so the optimizer gets the
memory back.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from grouprl.rollout.base import RolloutEngineError, SamplingParams
from grouprl.rollout.vllm_common import (
    LOGPROBS_MODE,
    VLLM_MODES,
    VLLMEngine,
    VLLMSettings,
    expand_greedy,
    full_state_dict,
    require_vllm,
    samples_per_request,
)


class ColocatedVLLM(VLLMEngine):
    """An in-process `vllm.LLM` on the policy's device, fed the policy's weights in place."""

    overlaps_training = False  # train.async with vLLM in the trainer's process: not yet

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        settings: VLLMSettings,
        *,
        max_model_len: int,
    ) -> None:
        vllm = require_vllm(in_process=True)
        super().__init__(model, tokenizer, settings, max_model_len=max_model_len)
        self.policy = model
        cuda = self.device.type == "cuda"
        self.sleep_level = settings.sleep_level if cuda else 0  # sleep is a no-op on CPU
        self._asleep = False
        self._weights_stale = False
        self._broken = ""  # set when vLLM failed mid-batch (see generate)
        if not cuda:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_gb)
        # vLLM reads the architecture from a folder: write the config alone; the weights
        # start as placeholders and the policy's are loaded in place just below.
        self._dir = tempfile.TemporaryDirectory(prefix="grouprl-vllm-")
        model.config.save_pretrained(self._dir.name)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self._dir.name)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        kwargs: dict[str, Any] = dict(
            model=self._dir.name,
            dtype=dtype,
            load_format="dummy",
            skip_tokenizer_init=True,  # prompts go in as token ids; texts are decoded here
            max_model_len=max_model_len,
            enforce_eager=(not cuda) if settings.enforce_eager is None else settings.enforce_eager,
            enable_prefix_caching=settings.enable_prefix_caching,
            logprobs_mode=LOGPROBS_MODE,
            seed=0,  # every request carries its own seed (request_seeds)
        )
        if cuda:
            kwargs.update(
                gpu_memory_utilization=settings.gpu_memory_utilization,
                enable_sleep_mode=self.sleep_level > 0,
            )
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise RolloutEngineError(
                f"vLLM could not start on {self.device} for this model ({exc}); see the lines "
                "above for vLLM's own report"
            ) from exc
        self._vllm = vllm
        try:
            self._push(model, step=0)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ weights
    def _push(self, model: torch.nn.Module, *, step: int) -> None:
        weights = list(full_state_dict(model).items())
        try:
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
            )
        except Exception as exc:
            raise RolloutEngineError(
                f"step {step}: loading the policy's weights into the colocated vLLM failed: {exc}"
            ) from exc
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._weights_stale = False

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module, *, step: int) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        self._push(model, step=step)
        self._step = step

    # ------------------------------------------------------------------ sampling
    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
            self._weights_stale = self.sleep_level >= 2

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
            if self._weights_stale:  # level 2 dropped them: the policy's are the current ones
                self._push(self.policy, step=self._step)

    @torch.no_grad()
    def _sample(
        self, prompt_ids: list[list[int]], params: SamplingParams
    ) -> list[list[tuple[list[int], list[float]]]]:
        if self._broken:
            raise RolloutEngineError(
                f"step {self._step + 1}: the colocated vLLM failed earlier ({self._broken}) "
                "and cannot sample again in this process; resume the run (train.resume=true)"
            )
        seeds = self._seeds(len(prompt_ids), params)
        sp = [
            self._vllm.SamplingParams(
                n=samples_per_request(params),
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=params.max_new_tokens,
                stop_token_ids=self.eos,
                logprobs=0,  # the sampled token's own log-prob
                seed=seed,
                detokenize=False,
            )
            for seed in seeds
        ]
        try:
            self._wake()
            outs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompt_ids], sp, use_tqdm=False
            )
            self._sleep()
        except Exception as exc:  # vLLM's own failure: the trainer saves what is done
            # its unfinished requests stay queued in the engine, and a next generate would
            # wait on them forever: this engine is done
            self._broken = f"{type(exc).__name__}: {exc}"
            raise RolloutEngineError(
                f"step {self._step + 1}: sampling with the colocated vLLM failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        samples = [
            expand_greedy(
                [
                    (
                        list(c.token_ids),
                        [c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids)],
                    )
                    for c in sorted(out.outputs, key=lambda c: c.index)
                ],
                params,
            )
            for out in outs
        ]
        return samples

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:  # the engine core holds the model and KV cache; vLLM 0.32 shuts it down here
            core = getattr(llm.llm_engine, "engine_core", None)
            shutdown = getattr(core, "shutdown", None) or getattr(llm.llm_engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
        finally:
            del llm
            self._dir.cleanup()


VLLM_MODES["colocate"] = ColocatedVLLM
