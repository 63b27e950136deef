"""`train.ema_reference`: an exponential moving average of the policy that scores rollouts.

GRPO-CARE ("GRPO-CARE: Consistency-Aware Reinforcement Learning for Multimodal
Reasoning", arXiv 2506.16141; TencentARC/GRPO-CARE `grpo_trainer_ref_ema.py`) replaces the
KL reference by a slowly moving copy of the policy, θ_ema ← decay·θ_ema + (1 − decay)·θ
every `every` optimizer steps (0.995, 10), and asks it how likely each completion's answer
is given the completion's own reasoning:

    c_i = min(0.95, exp(mean over the answer tokens of log π_ema(y_t | prompt, y_<t)))

The answer tokens are those after `answer_tag` (default "<answer>") up to its closing
tag; a completion without the tag counts every token. c_i goes to every reward as the
`care_consistency` column (the `care_bonus` reward reads it). The copy is saved in each
checkpoint (`ema_reference/model.safetensors`) and restored on resume.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from grouprl.config import check_ema_spec
from grouprl.models.forward import completion_logprobs
from grouprl.rewards.model_rewards import care_consistency_N, ema_update_
from grouprl.rollout.base import Rollouts

log = logging.getLogger(__name__)

# in a folder of its own: the checkpoint loader reads every *.safetensors beside the weights
FILE = "ema_reference/model.safetensors"


def answer_mask_NT(ro: Rollouts, token_texts: list[str], tag: str) -> torch.Tensor:
    """1.0 on the completion tokens whose text overlaps the span between `tag` and its
    closing tag (`</...>`), per row, from each token's own decoded text; a row without the
    tag, or with an empty answer: every real token."""
    close = tag.replace("<", "</", 1) if tag.startswith("<") else ""
    real = ro.attention_mask_NT.bool()
    out = torch.zeros(real.shape, dtype=torch.float32)
    for i in range(real.shape[0]):
        cols = real[i].nonzero().squeeze(-1)
        ids = ro.completion_ids_NT[i][cols].tolist()
        starts, text = [], ""
        for tid in ids:  # each token's first character offset in the completion
            starts.append(len(text))
            text += token_texts[tid] if tid < len(token_texts) else ""
        at = text.find(tag) if tag else -1
        if at < 0:
            out[i, cols] = 1.0
            continue
        begin = at + len(tag)
        end = text.find(close, begin) if close else -1
        end = len(text) if end < 0 else end
        ends = [*starts[1:], len(text)]
        # a token counts when its text overlaps the answer (a tokenizer may merge the tag's
        # ">" with the answer's first characters); an empty answer: every token
        row = torch.tensor(
            [1.0 if a < end and b > begin else 0.0 for a, b in zip(starts, ends, strict=True)]
        )
        out[i, cols] = row if bool(row.any()) else 1.0
    return out


class EMAReference:
    """The EMA copy of the policy and what it computes (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, spec: dict[str, Any], *, temperature: float
    ) -> None:
        spec = check_ema_spec(spec)
        self.decay, self.every = float(spec["decay"]), int(spec["every"])
        self.tag, self.cap = str(spec["answer_tag"]), float(spec["cap"])
        self.temperature = temperature
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]

    def after_step(self, policy: torch.nn.Module, step: int) -> bool:
        """After optimizer step `step` (1-based count of steps done): update every `every`."""
        if step % self.every:
            return False
        ema_update_(self.model, policy, self.decay)
        return True

    @torch.no_grad()
    def columns(self, ro: Rollouts) -> dict[str, list[float]]:
        """{"care_consistency": c_i per row} for the rewards."""
        if ro.num_rollouts == 0:
            return {"care_consistency": []}
        logp, _ = completion_logprobs(
            self.model,
            ro.prompt_ids_NP,
            ro.prompt_mask_NP,
            ro.completion_ids_NT,
            ro.attention_mask_NT,
            temperature=self.temperature,
        )
        mask = answer_mask_NT(ro, self._texts, self.tag).to(logp.device)
        c = care_consistency_N(logp, mask, cap=self.cap)
        return {"care_consistency": [float(x) if math.isfinite(float(x)) else 0.0 for x in c]}

    def save(self, checkpoint_dir: Path) -> None:
        path = Path(checkpoint_dir) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(path))  # handles tied weights

    def load(self, checkpoint_dir: Path, policy: torch.nn.Module) -> bool:
        """The EMA weights saved with `checkpoint_dir`; without them, the restored policy's
        (said in a warning)."""
        path = Path(checkpoint_dir) / FILE
        if not path.is_file():
            log.warning(
                "%s has no %s: the EMA reference restarts from the restored policy",
                checkpoint_dir,
                FILE,
            )
            ema_update_(self.model, policy, 0.0)  # decay 0: a copy
            return False
        load_model(self.model, str(path), strict=True)
        return True
