"""A short run for tests/test_distributed.py: under `torchrun --nproc_per_node=N` or as one
process. Sampling is scripted (fixed, distinct completions per prompt) so that 1 and N ranks
train on the same global batch. Usage: dist_run.py MODEL_DIR OUT_DIR RECIPE [STEPS [resume]]

Environment: DIST_RUN_STRATEGY (train.strategy, default auto), DIST_RUN_ENGINE (scripted_dist
or hf: real sampling, per-process RNG), DIST_RUN_PROMPTS (prompts per step, default 6),
DIST_RUN_FAIL_RANK (that rank's sampling raises), DIST_RUN_KILL_RANK (that rank is
killed with SIGKILL while sampling), DIST_RUN_ASYNC (train.async, and no checkpoint before
the end, so every step but the first is collected ahead), DIST_RUN_SERVER (engine vllm in server
mode at that URL), DIST_RUN_CHECKPOINTING (model.gradient_checkpointing), DIST_RUN_LORA (model.lora.r: LoRA adapters, and a KL term), DIST_RUN_REWARD_FAIL_RANK (the
reward raises on that rank; failure window of 1 call), DIST_RUN_ROLLOUT_STRATEGY (a JSON
rollout.strategy; rows get `hints` and `solution` columns), DIST_RUN_COUNT_DIR (each process
appends how many completions it scored to a file there)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from grouprl.rollout.base import ROLLOUT_ENGINES
from grouprl.rollout.vllm_common import build_rollouts
from grouprl.training.trainer import Trainer


@ROLLOUT_ENGINES.register("scripted_dist")
class Scripted:
    reports_sampling_logp = False
    default_mismatch_correction = "none"
    overlaps_training = True  # its samples do not depend on the weights

    def __init__(self, model, tok) -> None:
        self.model, self.tok = model, tok

    @classmethod
    def from_config(cls, rollout_cfg, model, tokenizer, *, max_prompt_length=None):
        return cls(model, tokenizer)

    def generate(self, prompts, params):
        fail_rank = os.environ.get("DIST_RUN_FAIL_RANK")
        if fail_rank is not None and os.environ.get("RANK") == fail_rank:
            raise RuntimeError(f"injected failure on rank {fail_rank}")
        if os.environ.get("DIST_RUN_KILL_RANK") == os.environ.get("RANK", "-"):
            os.kill(os.getpid(), 9)  # dies without a word, as an OOM kill would
        G, tok = params.num_generations, self.tok
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        samples = []
        for p in prompts:
            h = sum(map(ord, p))
            texts = [str((h * 7 + j * 13) % 97)[: 1 + (h + j) % 2] for j in range(G)]
            ids = [
                tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts
            ]
            samples.append([(x, [0.0] * len(x)) for x in ids])
        device = next(self.model.parameters()).device
        ro = build_rollouts(
            prompt_ids, samples, tokenizer=tok, eos=[tok.eos_token_id], device=device
        )
        return replace(ro, sampling_logp_NT=None)  # like HF: no sampler log-probs of its own

    def update_weights(self, model, *, step):
        pass

    def close(self):
        pass


def has_seven(completions, **_):
    if os.environ.get("DIST_RUN_REWARD_FAIL_RANK") == os.environ.get("RANK", "-"):
        raise RuntimeError("judge unreachable from this rank")
    if os.environ.get("DIST_RUN_COUNT_DIR"):  # how many completions this process scored
        path = Path(os.environ["DIST_RUN_COUNT_DIR"]) / f"rank{os.environ.get('RANK', '0')}"
        with path.open("a") as f:
            f.write(f"{len(completions)}\n")
    return [float("7" in c) + 0.1 * len(c) for c in completions]


if __name__ == "__main__":
    model_dir, out, recipe = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    resume = len(sys.argv) > 5 and sys.argv[5] == "resume"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 22) for b in (3, 5)]
    cfg = {
        "recipe": recipe,
        "model": {"name_or_path": model_dir},
        "rollout": {
            "engine": os.environ.get("DIST_RUN_ENGINE", "scripted_dist"),
            "num_generations": 4,
            "max_new_tokens": 4,
            "num_train_samples": 0,
        },
        "train": {
            "output_dir": str(out / "run"),
            "max_steps": max_steps,
            "prompts_per_step": int(os.environ.get("DIST_RUN_PROMPTS", "6")),
            "micro_batch_size": 4,
            "learning_rate": 1e-3,
            "save_every": 1,
            "progress": False,
            "seed": 0,
            "resume": resume,
            "strategy": os.environ.get("DIST_RUN_STRATEGY", "auto"),
        },
    }
    if os.environ.get("DIST_RUN_CHECKPOINTING"):
        cfg["model"]["gradient_checkpointing"] = True
    if os.environ.get("DIST_RUN_LORA"):
        cfg["model"]["lora"] = {"r": int(os.environ["DIST_RUN_LORA"]), "alpha": 8}
        cfg["regularizers"] = [{"name": "kl", "beta": 0.1}]
        cfg["train"]["learning_rate"] = 1e-2
    if os.environ.get("DIST_RUN_ASYNC"):
        cfg["train"]["async"] = os.environ["DIST_RUN_ASYNC"]
        cfg["train"]["save_every"] = 0
    if os.environ.get("DIST_RUN_REWARD_FAIL_RANK"):
        cfg["train"]["reward_failure_window"] = 1
    if os.environ.get("DIST_RUN_SERVER"):
        cfg["rollout"]["engine"] = "vllm"
        cfg["rollout"]["vllm"] = {"mode": "server", "server_url": os.environ["DIST_RUN_SERVER"]}
    if os.environ.get("DIST_RUN_ROLLOUT_STRATEGY"):
        cfg["rollout"]["strategy"] = json.loads(os.environ["DIST_RUN_ROLLOUT_STRATEGY"])
        rows = [{**r, "hints": r["prompt"][:2], "solution": r["answer"]} for r in rows]
    with Trainer(cfg, train_dataset=rows, reward_funcs=[has_seven]) as tr:
        res = tr.train()
        params = tr.learner.model_state()  # whole tensors (collective under fsdp2)
        if tr.dist.is_main:
            torch.save({k: v.cpu() for k, v in params.items()}, out / "params.pt")
            (out / "world.txt").write_text(str(tr.dist.world))
            torch.save([m.get("loss") for m in res.history], out / "loss.pt")
