"""Guided sampling (training/strategies/guided.py: guide_hints, icpo, expo) and entropy
steering (training/strategies/entropy.py: aepo), with the engine pieces they rest on:
rows trained with another prompt than they were sampled from (π_old in the sampling
context), demonstration rows trained by likelihood only (`sft_rows`), rows with a fixed
advantage outside their group's statistics."""

from __future__ import annotations

import json
import re
import string

import pytest
import torch
from conftest import arith_rows, base_config, strategy_collector, text_rollouts

from grouprl.algorithms.types import PolicyInputs
from grouprl.config import ConfigError
from grouprl.data.datasets import load_prompts
from grouprl.models.forward import completion_logprobs
from grouprl.models.tiny import build_char_tokenizer
from grouprl.rollout.base import Rollouts, SamplingParams
from grouprl.training.collect import concat_rollouts
from grouprl.training.metrics import reward_metrics
from grouprl.training.plan import make_train_batch
from grouprl.training.strategies import build_strategy
from grouprl.training.strategies.entropy import AEPO, group_advantages
from grouprl.training.strategies.guided import ICPO, demonstrations
from grouprl.training.trainer import Trainer

TOK = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")


class HelpedEngine:
    """Answers "x" to a plain prompt; the text after the last "Hint: " to a hinted one; to a
    prompt holding "The answer is A." it answers A; at temperature `hot` it answers the
    `hot_answers` in turn. Records (prompts, temperature) of every call."""

    samples_from_policy = False

    def __init__(self, hot: float = -1.0, hot_answers: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[list[str], float]] = []
        self.hot, self.hot_answers = hot, hot_answers

    def answer(self, prompt: str, i: int, temperature: float) -> str:
        if temperature == self.hot and self.hot_answers:
            return self.hot_answers[i % len(self.hot_answers)]
        given = re.findall(r"The answer is (\S+?)\.", prompt)
        if given:
            return given[-1]
        found = re.findall(r"Hint: ?(\S+)", prompt)
        return found[-1] if found else "x"

    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        self.calls.append((list(prompts), params.temperature))
        G = params.num_generations
        texts = [self.answer(p, i, params.temperature) for p in prompts for i in range(G)]
        return text_rollouts(TOK, prompts, texts, G)


def collector(rows, strategy, engine, G=3):
    return strategy_collector(TOK, rows, strategy, engine, G)


def decode(ids_NP: torch.Tensor) -> list[str]:
    return TOK.batch_decode(ids_NP, skip_special_tokens=True)


# ------------------------------------------------------------------ Rollouts pieces
def _ro(prompts: list[str], n_tok: int = 2) -> Rollouts:
    enc = TOK(prompts, padding=True, return_tensors="pt")
    N = len(prompts)
    return Rollouts(
        prompt_ids_NP=enc["input_ids"],
        prompt_mask_NP=enc["attention_mask"].float(),
        completion_ids_NT=torch.full((N, n_tok), 5),
        attention_mask_NT=torch.ones(N, n_tok),
        loss_mask_NT=torch.ones(N, n_tok),
        truncated_N=torch.zeros(N, dtype=torch.bool),
        completions=["ab"] * N,
        group_size=N,
    )


def test_trained_with_keeps_the_sampling_prompt_and_flags_only_changed_rows():
    hinted = _ro(["1+1= Hint: 2", "1+1="])
    plain = _ro(["1+1=", "1+1="])
    ro = hinted.trained_with(plain.prompt_ids_NP, plain.prompt_mask_NP)
    assert decode(ro.prompt_ids_NP) == ["1+1=", "1+1="]
    assert decode(ro.behavior_view().prompt_ids_NP) == ["1+1= Hint: 2", "1+1="]
    assert ro.behavior_N.tolist() == [True, False]  # same tokens, other padding: False
    assert hinted.behavior_N is None and hinted.behavior_view() is hinted
    # rows and joins keep them; a part without sampling prompts joins with its own prompts
    assert ro.select(torch.tensor([1, 0])).behavior_N.tolist() == [False, True]
    both = concat_rollouts([_ro(["22+22="]), ro], TOK.pad_token_id)
    assert both.behavior_N.tolist() == [False, True, False]
    assert decode(both.behavior_view().prompt_ids_NP)[0] == "22+22="
    with pytest.raises(ValueError, match="give both or neither"):
        Rollouts(**{**vars(_ro(["a"])), "behavior_prompt_ids_NP": torch.zeros(1, 1)})


def test_sample_n_leaves_out_padding_demonstrations_and_fixed_advantage_rows():
    ro = _ro(["a", "a", "a", "a"])
    ro.pad_N = torch.tensor([False, False, False, True])
    ro.sft_N = torch.tensor([True, False, False, False])
    ro.fixed_adv_N = torch.tensor([float("nan"), 1.0, float("nan"), float("nan")])
    assert ro.sample_N.tolist() == [False, False, True, False]


# ------------------------------------------------------------------ the learner
def _trainer(tmp_path, tiny_model_dir, **extra):
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=1, max_grad_norm=1e9)
    cfg["loss"] = {"name": "ppo_clip", "eps_low": 1e6, "eps_high": 1e6}  # no clipping
    cfg.update(extra)
    tr = Trainer(cfg, train_dataset=arith_rows())
    opt = torch.optim.SGD(tr.model.parameters(), lr=0.0)
    tr.learner.optimizer = opt
    tr.learner.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return tr


def _group(enc, comp_NT, mask_NT, **fields):
    """One group of len(comp_NT) rows: the tokenized prompts `enc`, given completions."""
    N = comp_NT.shape[0]
    return Rollouts(
        prompt_ids_NP=enc["input_ids"],
        prompt_mask_NP=enc["attention_mask"].float(),
        completion_ids_NT=comp_NT,
        attention_mask_NT=mask_NT,
        loss_mask_NT=mask_NT.clone(),
        truncated_N=torch.zeros(N, dtype=torch.bool),
        completions=["a"] * N,
        group_size=N,
        **fields,
    )


def _grads(tr, ro, adv):
    tr.model.zero_grad(set_to_none=True)
    stats = tr.learner.update(make_train_batch(ro, adv, max_new_tokens=4), step=0)
    return stats, {n: p.grad.clone() for n, p in tr.model.named_parameters()}


def _lp(tr, ids, mask, ro, grad=True):
    with torch.set_grad_enabled(grad):
        return completion_logprobs(tr.model, ids, mask, ro.completion_ids_NT, ro.attention_mask_NT)[
            0
        ]


def test_a_row_sampled_with_a_hint_has_its_ratio_against_the_hinted_context(
    tmp_path, tiny_model_dir
):
    """Guide-GRPO's ratio π_θ(o | q) / π_old(o | q, h): the gradient of ppo_clip (no clip,
    token mean) is −(1/Σm) Σ A_n ρ_nt ∇log π_θ, with ρ = exp(log π_θ(·|q) − log π_old(·|q,h))
    on the hinted row and 1 on the others."""
    tr = _trainer(tmp_path, tiny_model_dir)
    tok = tr.tokenizer
    enc = tok(["12+3=", "12+3=", "12+3="], padding=True, return_tensors="pt")
    hint = tok(["12+3=", "12+3=", "12+3=15"], padding=True, return_tensors="pt")
    comp = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 5, 2]])
    mask = torch.ones(3, 3)
    mask[1, 2] = 0
    ro = _group(hint, comp, mask).trained_with(enc["input_ids"], enc["attention_mask"].float())
    assert ro.behavior_N.tolist() == [False, False, True]
    adv = torch.tensor([1.0, -0.5, 0.7])
    _, got = _grads(tr, ro, adv)
    old_h = _lp(tr, hint["input_ids"], hint["attention_mask"].float(), ro, grad=False)
    tr.model.zero_grad(set_to_none=True)
    lp = _lp(tr, enc["input_ids"], enc["attention_mask"].float(), ro)
    rho = torch.ones_like(lp)
    rho[2] = (lp[2] - old_h[2]).detach().exp()
    assert float((rho[2] - 1).abs().max()) > 1e-3  # the hint changes π_old
    (-(adv[:, None] * rho * mask * lp).sum() / mask.sum()).backward()
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    # trained with its sampling prompt instead, every ratio is 1: another gradient
    _, same = _grads(tr, ro.behavior_view(), adv)
    assert any(not torch.allclose(got[n], same[n]) for n in got)


def test_demonstration_rows_get_only_the_sft_rows_term(tmp_path, tiny_model_dir):
    """Row 2 is a demonstration (sft_N): no policy term, −β·log π on its tokens. Policy term
    normalized over the other rows' tokens, the regularizer over every loss token."""
    beta = 0.3
    tr = _trainer(tmp_path, tiny_model_dir, regularizers=[{"name": "sft_rows", "beta": beta}])
    tok = tr.tokenizer
    enc = tok(["12+3="] * 3, return_tensors="pt")
    comp = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 5, 2]])
    mask = torch.ones(3, 3)
    ro = _group(enc, comp, mask, sft_N=torch.tensor([False, False, True]))
    adv = torch.tensor([1.0, -1.0, 5.0])  # row 2's advantage must not count
    stats, got = _grads(tr, ro, adv)
    tr.model.zero_grad(set_to_none=True)
    lp = _lp(tr, enc["input_ids"], enc["attention_mask"].float(), ro)
    policy = -(adv[:2, None] * lp[:2]).sum() / 6.0
    sft = beta * (-lp[2]).sum() / 9.0
    (policy + sft).backward()
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert stats["sft_rows/nll"] == pytest.approx(float(-lp[2].detach().mean()), rel=1e-4)


def test_fixed_advantage_rows_stay_out_of_the_group_statistics(tmp_path, tiny_model_dir):
    from grouprl.components import build_components
    from grouprl.config import load_config
    from grouprl.training.collect import ScoredBatch
    from grouprl.training.plan import plan_batch

    ro = _ro(["a"] * 4)
    ro.fixed_adv_N = torch.tensor([1.0, float("nan"), float("nan"), float("nan")])
    rewards = torch.tensor([float("nan"), 1.0, 0.0, 0.0])
    batch = ScoredBatch(
        examples=[None],  # type: ignore[list-item]
        indices=[0],
        rollouts=ro,
        rewards_NK=rewards[:, None],
        rewards_N=rewards,
    )
    comps = build_components(load_config({}))
    tb, _ = plan_batch(
        batch,
        comps,
        weights_K=torch.ones(1),
        prepass=lambda *a, **k: {},
        step=0,
        max_steps=1,
        max_new_tokens=4,
    )
    # GRPO over rows 1..3 only: mean 1/3, std (unbiased) 0.577
    r = torch.tensor([1.0, 0.0, 0.0])
    want = ((r - r.mean()) / (r.std() + 1e-4)).tolist()
    assert tb.adv_N[0] == 1.0
    assert tb.adv_N[1:].tolist() == pytest.approx(want, abs=1e-3)


# ------------------------------------------------------------------ guide_hints
def test_guide_puts_hinted_samples_in_a_failed_group_trained_without_the_hint():
    rows = [
        {"prompt": "5+7=", "answer": "12", "hints": ["12"]},
        {"prompt": "1+1=", "answer": "x", "hints": "2"},  # solved: untouched
        {"prompt": "2+2=", "answer": "4"},  # no hint: untouched
    ]
    eng = HelpedEngine()
    guide = build_strategy(
        {"name": "guide_hints", "replace_num": 2, "hint_template": " Hint: {hint}"}
    )
    batch, metrics = collector(rows, guide, eng).collect(3)
    assert batch.rollouts.completions == ["x", "12", "12", "x", "x", "x", "x", "x", "x"]
    assert batch.rewards_N.tolist()[:3] == [0, 1, 1]
    assert decode(batch.rollouts.prompt_ids_NP)[:3] == ["5+7="] * 3  # trained plain
    assert decode(batch.rollouts.behavior_view().prompt_ids_NP)[:3] == [
        "5+7=",
        "5+7= Hint: 12",
        "5+7= Hint: 12",
    ]
    assert batch.rollouts.behavior_N.tolist() == [False, True, True] + [False] * 6
    assert batch.rollouts.offpolicy_N.tolist() == [False, True, True] + [False] * 6
    assert eng.calls[1][0] == ["5+7= Hint: 12"]
    assert metrics["hint/rescued_groups"] == 1 and metrics["guide/hinted_success_frac"] == 1
    # train_prompt "sampled": the hint stays in the training prompt (Scaf-GRPO's way)
    kept = build_strategy(
        {
            "name": "guide_hints",
            "hint_template": " Hint: {hint}",
            "train_prompt": "sampled",
            "replace_num": 1,
        }
    )
    batch, _ = collector(rows[:1], kept, HelpedEngine()).collect(1)
    assert batch.rollouts.behavior_N is None
    assert decode(batch.rollouts.prompt_ids_NP)[-1] == "5+7= Hint: 12"
    # the default re-samples the whole group, kept only with signal (not all right)
    whole = build_strategy({"name": "guide_hints", "hint_template": " Hint: {hint}"})
    batch, metrics = collector(rows[:1], whole, HelpedEngine()).collect(1)
    assert batch.rollouts.completions == ["x", "x", "x"] and metrics["hint/rescued_groups"] == 0
    with pytest.raises(ValueError, match="rollout.strategy.train_prompt"):
        build_strategy({"name": "guide_hints", "train_prompt": "hinted"})


# ------------------------------------------------------------------ icpo
def test_icpo_demonstrations_come_from_other_rows_of_the_batch():
    rows = load_prompts(
        [
            {"prompt": "a", "solution": "s1"},
            {"prompt": "b"},
            {"prompt": "c", "solution": "s3"},
        ],
        tokenizer=TOK,
    )
    exs = [rows[i] for i in range(3)]
    assert demonstrations(exs, 0, 2, "solution") == [("c", "s3")]
    assert demonstrations(exs, 1, 1, "solution") == [("c", "s3")]
    assert demonstrations(exs, 2, 5, "solution") == [("a", "s1")]


def test_icpo_keeps_correct_steered_rollouts_with_an_annealed_bonus():
    """The demonstrations say "The answer is 12." for prompt 0 (the engine copies it: right)
    and "The answer is 9." for prompt 1 (wrong: rejected, the group is kept as sampled)."""
    rows = [
        {"prompt": "5+7=", "answer": "12", "solution": "The answer is 9."},
        {"prompt": "4+5=", "answer": "3", "solution": "The answer is 12."},
    ]
    icpo = ICPO(expert_num=2, bonus=0.5, anneal_steps=10)
    batch, metrics = collector(rows, icpo, HelpedEngine()).collect(2, step=4)
    # group 0 (demo: row 1's solution "12"): both steered samples right, reward 1 + 0.5·0.6
    assert batch.rollouts.completions[:3] == ["x", "12", "12"]
    assert batch.rewards_N[:3].tolist() == pytest.approx([0.0, 1.3, 1.3])
    assert batch.rollouts.completions[3:] == ["x", "x", "x"]  # row 0's "9" is wrong for 4+5
    assert decode(batch.rollouts.prompt_ids_NP)[1] == "5+7="
    assert "The answer is 12." in decode(batch.rollouts.behavior_view().prompt_ids_NP)[1]
    assert metrics["icpo/kept_frac"] == 0.5 and metrics["icpo/expert_rows"] == 2
    assert icpo.bonus_at(0) == 0.5 and icpo.bonus_at(10) == 0.0 and icpo.bonus_at(20) == 0.0


# ------------------------------------------------------------------ expo
def test_expo_appends_one_self_explanation_per_group_as_a_demonstration_row():
    rows = [{"prompt": "5+7=", "answer": "12"}, {"prompt": "1+1=", "answer": "x"}]
    eng = HelpedEngine()
    expo = build_strategy({"name": "expo", "explain_template": " The answer is {answer}."})
    batch, metrics = collector(rows, expo, eng, G=2).collect(2)
    ro = batch.rollouts
    assert ro.group_size == 3 and ro.completions == ["x", "x", "12", "x", "x", "x"]
    assert ro.sft_N.tolist() == [False, False, True, False, False, True]
    assert decode(ro.prompt_ids_NP)[2] == "5+7="  # trained without the answer
    assert eng.calls[1][0] == ["5+7= The answer is 12.", "1+1= The answer is x."]
    assert torch.isnan(batch.rewards_N[2]) and batch.rewards_N[:2].tolist() == [0, 0]
    assert metrics["expo/trained_rows"] == 2.0
    # an explanation that misses the answer is not trained (require_correct)
    eng2 = HelpedEngine(hot=1.0, hot_answers=("zz",))
    batch, metrics = collector(rows[:1], expo, eng2, G=2).collect(1)
    assert batch.rollouts.loss_mask_NT[2].sum() == 0 and metrics["expo/trained_rows"] == 0


def test_expo_without_the_sft_rows_regularizer_is_refused(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "r", tiny_model_dir, max_steps=1)
    cfg["rollout"]["strategy"] = {"name": "expo"}
    with pytest.raises(ConfigError, match="sft_rows"):
        Trainer(cfg, train_dataset=arith_rows())


# ------------------------------------------------------------------ aepo
def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, float("nan")], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r)
    std = (1 / 3) ** 0.5  # unbiased std of (1, 0, 0): sqrt(((2/3)² + 2·(1/3)²) / 2)
    want = [(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6)]
    assert a[0, :3].tolist() == pytest.approx(want, rel=1e-5)
    assert torch.isnan(a[0, 3]) and a[1].tolist() == [0.0] * 4


def test_aepo_samples_hotter_below_the_target_and_keeps_positive_extras():
    rows = [{"prompt": "5+7=", "answer": "12"}, {"prompt": "1+1=", "answer": "2"}]
    eng = HelpedEngine(hot=1.2, hot_answers=("12", "x"))
    aepo = AEPO(target=0.5, prompt_frac=0.5, replace_low=1)
    col = collector(rows, aepo, eng, G=2)
    batch, metrics = col.collect(2)
    assert eng.calls[-1][1] == 1.2  # no entropy read yet: 0, as the code starts
    aepo.observe({"entropy": 0.9})
    col.collect(2)
    assert eng.calls[-1][1] == 1.2  # observed, but no collection began since: unchanged
    aepo.observe({"entropy": 0.2})
    col.begin()  # the training thread, before a collection (the pipeline does this)
    batch, metrics = col.collect(2)
    assert eng.calls[-1] == (["5+7="], 1.2)  # ⌈0.5·2⌉ = 1 prompt, hotter
    # the extra "12" (advantage > 0.05) replaces the batch's first row, at most replace_low
    assert batch.rollouts.completions[0] == "12" and metrics["aepo/kept_rows"] == 1
    assert batch.rollouts.fixed_adv_N.tolist()[:2] == [
        1.0,
        pytest.approx(float("nan"), nan_ok=True),
    ]
    assert torch.isnan(batch.rewards_N[0]) and torch.isnan(batch.rewards_NK[0]).all()
    assert reward_metrics(batch, ["exact_match"])["reward/nan_frac"] == 0.0  # not unscorable
    aepo.observe({"entropy": 0.9})  # above the target: colder
    col.begin()
    col.collect(2)
    assert eng.calls[-1][1] == 0.8
    restored = AEPO()
    restored.load_state_dict(json.loads(json.dumps(aepo.state_dict())))
    assert restored.entropy == aepo.entropy == 0.9 and restored.observed == 0.9


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    "strategy,regs",
    [
        ({"name": "guide_hints", "hint_template": "{hint}", "replace_num": 2}, []),
        ({"name": "icpo", "demo_template": "{question}{solution}"}, []),
        (
            {"name": "expo", "explain_template": "{answer}", "require_correct": False},
            [{"name": "sft_rows"}],
        ),
        ({"name": "aepo"}, []),
    ],
    ids=["guide_hints", "icpo", "expo", "aepo"],
)
def test_trainer_runs_the_strategy_end_to_end(tmp_path, tiny_model_dir, strategy, regs):
    cfg = base_config(tmp_path / "r", tiny_model_dir, max_steps=3)
    cfg["rollout"]["strategy"] = strategy
    cfg["regularizers"] = regs
    rows = [{**r, "hints": [r["answer"]], "solution": r["answer"]} for r in arith_rows()]
    tr = Trainer(cfg, train_dataset=rows)
    res = tr.train()
    tr.close()
    assert res.steps == 3
    for h in res.history:
        assert torch.isfinite(torch.tensor(h["loss"]))
    last = res.history[-1]
    name = strategy["name"]
    if name == "expo":
        assert last["completions/sft_rows"] >= 1 and "sft_rows/nll" in last
    if name == "aepo":
        assert "aepo/temperature" in last  # the steps after the first read the entropy
    if name == "guide_hints":
        assert last["hint/failed_groups"] >= 1


def test_ppo_clip_shapes_off_policy_rows_by_hand():
    """offpolicy shaped: off-policy rows get J = f(x)·A, f(x) = x/(x + γ), unclipped, with x
    the ratio to π_old ("old") or π_θ itself ("none"); on-policy rows keep the clip."""
    from grouprl.algorithms.losses import ppo_clip

    logp = torch.log(torch.tensor([[0.5, 0.2], [0.4, 0.9]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.25, 0.2], [0.4, 0.3]]))
    inp = PolicyInputs(
        logp_NT=logp,
        old_logp_NT=old,
        mask_NT=torch.ones(2, 2),
        adv_N=torch.tensor([1.0, 2.0]),
        offpolicy_N=torch.tensor([False, True]),
    )
    out = ppo_clip(inp, offpolicy="shaped", offpolicy_gamma=0.5).per_token_NT
    # row 0 (on-policy): ratio 2 clipped to 1.2 for A > 0; 1 -> 1
    # row 1: x = 1 and 3: f = 1/1.5, 3/3.5, times A = 2
    want = torch.tensor([[-1.2, -1.0], [-2 / 1.5, -2 * 3 / 3.5]])
    torch.testing.assert_close(out.detach(), want)
    none = ppo_clip(inp, offpolicy="shaped", offpolicy_ratio="none", offpolicy_gamma=0.1)
    torch.testing.assert_close(
        none.per_token_NT[1].detach(), torch.tensor([-2 * 0.4 / 0.5, -2 * 0.9 / 1.0])
    )
    # d/dlogp of −A·x/(x+γ) with x = exp(logp − old): −A·γ·x/(x+γ)²
    out[1, 1].backward()
    assert float(logp.grad[1, 1]) == pytest.approx(-2 * 0.5 * 3 / 3.5**2, rel=1e-5)
    plain = ppo_clip(inp).per_token_NT.detach()  # offpolicy clip: row 1's ratio 3 -> 1.2
    assert float(plain[1, 1]) == pytest.approx(-2 * 1.2)
    with pytest.raises(ValueError, match="offpolicy must be"):
        ppo_clip(inp, offpolicy="luffy")


def test_policy_inputs_know_demonstration_and_off_policy_rows():
    assert {"sft_N", "offpolicy_N"} <= set(PolicyInputs.__dataclass_fields__)


def test_strategies_that_add_rows_refuse_num_train_samples_and_aepo_refuses_refills(
    tmp_path, tiny_model_dir
):
    cfg = base_config(tmp_path / "n", tiny_model_dir, max_steps=1)
    cfg["rollout"]["strategy"] = {"name": "guide_hints"}
    cfg["rollout"]["num_train_samples"] = 2
    with pytest.raises(ConfigError, match="num_train_samples"):
        Trainer(cfg, train_dataset=arith_rows())
    cfg = base_config(tmp_path / "r", tiny_model_dir, max_steps=1)
    cfg["rollout"]["strategy"] = {"name": "aepo"}
    cfg["sample_filters"] = [{"name": "dynamic_sampling"}]
    with pytest.raises(ConfigError, match="refilling sample filter"):
        Trainer(cfg, train_dataset=arith_rows())
