"""LoRA through PEFT (`model.lora`): only adapters train, the reference is the base with the
adapters off, checkpoints hold the adapter and resume exactly, export merges, the
shared-prefix forward holds through the PEFT wrapper."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.cli import main as cli_main
from grouprl.config import ConfigError, ModelConfig, load_recipe, recipe_names, required_keys
from grouprl.models.forward import completion_logprobs
from grouprl.models.lora import LoraSettings, apply_lora, merged_state_dict
from grouprl.training.checkpoint import latest_checkpoint
from grouprl.training.trainer import Trainer

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8}
KL = [{"name": "kl", "beta": 0.1, "estimator": "k3"}]


def even_first_digit(prompts, completions, **kw):
    return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]


def starts_with_digit(prompts, completions, **kw):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def lora_config(out, model_dir, **train):
    cfg = base_config(out, model_dir, **train)
    cfg["model"]["lora"] = dict(LORA)
    cfg["regularizers"] = KL
    cfg["train"]["learning_rate"] = 5e-3
    return cfg


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batch(tok, prompts=("12+3=", "7+8=", "1+1="), completions=("15", "150", "2")):
    P = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    C = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    wp, wc = max(map(len, P)), max(map(len, C))
    pad = tok.pad_token_id
    prompt = torch.tensor([[pad] * (wp - len(p)) + p for p in P])
    pmask = torch.tensor([[0] * (wp - len(p)) + [1] * len(p) for p in P])
    comp = torch.tensor([c + [pad] * (wc - len(c)) for c in C])
    cmask = torch.tensor([[1] * len(c) + [0] * (wc - len(c)) for c in C])
    return prompt, pmask, comp, cmask


def test_settings_are_checked():
    assert LoraSettings.from_dict({}) is None
    assert LoraSettings.from_dict({"r": 8}).alpha == 32
    with pytest.raises(ConfigError, match="model.lora.rank: unknown key"):
        LoraSettings.from_dict({"rank": 8})
    with pytest.raises(ConfigError, match="model.lora.r:"):
        LoraSettings.from_dict({"r": 0})
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        LoraSettings.from_dict({"dropout": 1.5})


def test_qlora_on_cpu_stops_with_a_message(tiny_model_dir):
    from grouprl.models.loading import load_model_and_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", lora={"quantize": "4bit"})
    with pytest.raises(ConfigError, match="4bit \\(QLoRA\\) needs a CUDA device"):
        load_model_and_tokenizer(cfg)


def test_only_adapters_train_and_no_reference_copy_is_kept(tmp_path, tiny_model_dir):
    cfg = lora_config(tmp_path / "run", tiny_model_dir)
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=["exact_match", length_reward])
    assert tr.learner.ref_model is None and tr.learner.ref_is_base
    assert tr.shared_prefix  # the shared-prefix self-check passes through the PEFT wrapper
    opt_params = [p for g in tr.learner.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in tr.model.named_parameters()}
    assert opt_params and all("lora_" in names[id(p)] for p in opt_params)
    before = params(tr.model)
    res = tr.train()
    after = params(tr.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_B" in k or "lora_A" in k for k in changed), changed
    assert any("lora_B" in k for k in changed)
    assert not (tmp_path / "run" / "reference").exists()
    kls = [m["kl"] for m in res.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-9) and kls[-1] > 0  # base == policy at step 1
    ckpt = latest_checkpoint(tmp_path / "run")
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()
    # optimizer state: adapter tensors only
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    n_adapter = sum(p.numel() for n, p in tr.model.named_parameters() if "lora_" in n)
    n_state = sum(s["exp_avg"].numel() for s in opt["state"].values())
    assert n_state == n_adapter


def test_reference_with_the_adapter_off_is_the_base_model(tmp_path, tiny_model_dir, tiny):
    """After training, π_ref's log-probs (adapters switched off) equal those of an explicit
    copy of the base model, and differ from the adapted policy's."""
    base_model, tok = tiny
    base_copy = copy.deepcopy(base_model)
    cfg = lora_config(tmp_path / "run", tiny_model_dir)
    with Trainer(
        cfg,
        model=base_model,
        tokenizer=tok,
        train_dataset=arith_rows(),
        reward_funcs=["exact_match", length_reward],
    ) as tr:
        tr.train()
        from grouprl.rollout.vllm_common import build_rollouts

        prompt, pmask, comp, cmask = batch(tok)
        ref = completion_logprobs(base_copy, prompt, pmask, comp, cmask)[0]
        pol = completion_logprobs(tr.model, prompt, pmask, comp, cmask)[0]
        ids = [prompt[i][pmask[i].bool()].tolist() for i in range(3)]
        samples = [
            [(comp[i][cmask[i].bool()].tolist(), [0.0] * int(cmask[i].sum()))] for i in range(3)
        ]
        ro = build_rollouts(ids, samples, tokenizer=tok, eos=[tok.eos_token_id], device="cpu")
        got = tr.learner._ref_logp(ro)
    assert got is not None
    mask = ro.attention_mask_NT.bool()
    want = completion_logprobs(
        base_copy, ro.prompt_ids_NP, ro.prompt_mask_NP, ro.completion_ids_NT, ro.attention_mask_NT
    )[0]
    assert (got - want)[mask].abs().max() <= 1e-6
    assert ((pol - ref) * cmask).abs().max() > 1e-4  # the adapter did move the policy


def test_shared_prefix_holds_through_peft(tiny):
    """Packed (shared-prefix) and repeated layouts give the same log-probs and the same
    adapter gradients through the PEFT wrapper."""
    model, tok = tiny
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # non-zero B so the adapter takes part
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    prompt, pmask, comp, cmask = batch(tok, ("12+3=",) * 3, ("15", "150", "2"))
    out = {}
    for shared in (False, True):
        model.zero_grad()
        lp, _ = completion_logprobs(model, prompt, pmask, comp, cmask, shared_prefix=shared)
        (lp * cmask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[shared] = (lp.detach(), grads)
    assert (out[True][0] - out[False][0]).abs().max() <= 1e-5
    assert out[True][1].keys() == out[False][1].keys() and out[True][1]
    for n in out[True][1]:
        assert torch.allclose(out[True][1][n], out[False][1][n], atol=1e-5), n


def test_resume_is_exact_with_lora(tmp_path, tiny_model_dir):
    rows = arith_rows(10)

    def config(out, **kw):
        return lora_config(out, tiny_model_dir, max_steps=4, save_every=2, **kw)

    full = Trainer(
        config(tmp_path / "full"), train_dataset=rows, reward_funcs=["exact_match", length_reward]
    )
    full.train()

    class Killed(Exception):
        pass

    def kill_after_2(step, metrics):
        if step == 2:
            raise Killed

    first = Trainer(
        config(tmp_path / "half"), train_dataset=rows, reward_funcs=["exact_match", length_reward]
    )
    first.callbacks.append(kill_after_2)
    with pytest.raises(Killed):
        first.train()
    second = Trainer(
        config(tmp_path / "half", resume=True),
        train_dataset=rows,
        reward_funcs=["exact_match", length_reward],
    )
    second.train()
    a, b = params(full.model), params(second.model)
    assert any("lora_" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_export_merges_the_adapter_into_a_plain_model(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    cfg = lora_config(tmp_path / "run", tiny_model_dir)
    with Trainer(
        cfg, train_dataset=arith_rows(), reward_funcs=["exact_match", length_reward]
    ) as tr:
        tr.train()
        adapted = tr.model
        tok = tr.tokenizer
        merged_sd = merged_state_dict(adapted)
    out = tmp_path / "exported"
    assert cli_main(["export", str(tmp_path / "run"), "--output", str(out)]) == 0
    assert "LoRA adapter merged" in capsys.readouterr().out
    card = (out / "README.md").read_text()  # a model card: how it was trained, results
    assert "trained with grouprl" in card and "| LoRA | {'r': 4, 'alpha': 8} |" in card
    assert "| reward |" in card
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert not hasattr(plain, "peft_config")
    prompt, pmask, comp, cmask = batch(tok)
    with torch.no_grad():
        a = completion_logprobs(adapted, prompt, pmask, comp, cmask)[0]
        b = completion_logprobs(plain, prompt, pmask, comp, cmask)[0]
    assert ((a - b) * cmask).abs().max() <= 1e-5
    # the out-of-place merge (what vLLM is sent) is the exported model
    for k, v in plain.state_dict().items():
        assert torch.allclose(merged_sd[k], v, atol=1e-6), k
    # a non-empty output directory is refused; a checkpoint loads for eval as its merge
    assert cli_main(["export", str(tmp_path / "run"), "--output", str(out)]) == 2
    from grouprl.models.loading import load_model_and_tokenizer

    m, _, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(latest_checkpoint(tmp_path / "run")), device="cpu")
    )
    with torch.no_grad():
        c = completion_logprobs(m, prompt, pmask, comp, cmask)[0]
    assert ((a - c) * cmask).abs().max() <= 1e-5
    state = json.loads((latest_checkpoint(tmp_path / "run") / "adapter_config.json").read_text())
    assert state["r"] == 4


OWN_TASK = {"crpo", "crpo_gdpo", "ttrl", "rank_grpo"}  # own data / rewards: tested elsewhere
# recipes whose reward needs the user's model or judge (tests/test_recipes.py runs them)
NEEDS_MODEL = {n for n in recipe_names() if required_keys(load_recipe(n))}


@pytest.mark.parametrize(
    "name", [n for n in recipe_names() if n not in OWN_TASK | NEEDS_MODEL] + ["crpo"]
)
def test_every_recipe_trains_through_the_adapter(tmp_path, tiny_model_dir, name):
    """Two steps of each recipe with `model.lora`: finite loss, only adapters move, the
    reference (when the recipe has one) is the base with adapters off."""
    model_dir, kw = tiny_model_dir, {}
    if name == "crpo":  # the clinical task, its tokenizer and the recipe's own rewards
        from grouprl.data.tasks.clinical import clinical_tokenizer
        from grouprl.models.tiny import build_tiny_model, save_model

        tok = clinical_tokenizer()
        model_dir = save_model(
            build_tiny_model(tok, hidden_size=32, num_layers=1), tok, tmp_path / "m"
        )
    else:
        rewards = [
            {"fn": even_first_digit, "weight": 0.5},
            {"fn": starts_with_digit, "weight": 0.5},
        ]
        kw = {"train_dataset": arith_rows(), "reward_funcs": rewards}
    cfg = base_config(tmp_path / name, model_dir, max_steps=2, micro_batch_size=4)
    for key in ("advantage", "loss", "regularizers", "rewards"):
        cfg.pop(key)  # let the recipe decide
    cfg["recipe"] = name
    cfg["model"]["lora"] = dict(LORA)
    cfg["rollout"]["num_generations"] = 1 if name == "single_stream" else 4
    if name == "spine":  # it trains on a subset of the votes (32 of 64): 2 of 4 here
        cfg["rollout"]["num_train_samples"] = 2
    if name == "crpo":
        cfg["data"] = {"task": "clinical", "task_params": {"num_train": 8, "num_eval": 2}}
        cfg["rollout"]["max_new_tokens"] = 12
    tr = Trainer(cfg, **kw)
    assert tr.learner.ref_model is None
    before = params(tr.model)
    res = tr.train()
    last = res.history[-1]
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    after = params(tr.model)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_" not in k)


def test_combinations_that_cannot_work_are_refused(tmp_path, tiny_model_dir):
    cfg = lora_config(tmp_path / "a", tiny_model_dir)
    cfg["model"]["lora"]["quantize"] = "4bit"
    cfg["rollout"]["engine"] = "vllm"
    with pytest.raises(ConfigError, match="model.lora.quantize: 4bit cannot send vLLM"):
        Trainer(cfg, train_dataset=arith_rows())
    cfg["rollout"]["engine"] = "hf"
    cfg["train"]["strategy"] = "fsdp2"
    with pytest.raises(ConfigError, match="cannot be sharded with train.strategy: fsdp2"):
        Trainer(cfg, train_dataset=arith_rows())
    # tied embeddings (the tiny model ties them) with a separately trained copy
    cfg = lora_config(tmp_path / "b", tiny_model_dir)
    cfg["model"]["lora"]["modules_to_save"] = ["lm_head"]
    with pytest.raises(ConfigError, match="model.lora.modules_to_save.*tied"):
        Trainer(cfg, train_dataset=arith_rows())


def test_resume_refuses_another_adapter_shape_and_a_checkpoint_as_new_base(
    tmp_path, tiny_model_dir
):
    cfg = lora_config(tmp_path / "run", tiny_model_dir, max_steps=1)
    Trainer(cfg, train_dataset=arith_rows(), reward_funcs=["exact_match", length_reward]).train()
    cfg = lora_config(tmp_path / "run", tiny_model_dir, max_steps=2, resume=True)
    cfg["model"]["lora"]["r"] = 8
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=["exact_match", length_reward])
    with pytest.raises(ConfigError, match="model.lora.r: 4 in the checkpoint, 8 now"):
        tr.train()
    ckpt = latest_checkpoint(tmp_path / "run")
    cfg = lora_config(tmp_path / "again", ckpt)
    with pytest.raises(ConfigError, match="is a LoRA checkpoint.*grouprl export"):
        Trainer(cfg, train_dataset=arith_rows())
