"""Reward models (rewards/models.py) and the rewards that compose them (rewards/model_rewards.py).

The classifier tests use a real tiny Qwen2ForSequenceClassification, trained here on
synthetic preferences (the correct sum of two digits over a wrong one); the LLM-judge tests
talk HTTP to a real local server (http.server in a thread) that answers in the OpenAI chat
and completions shapes from a deterministic rule. Every number below is computed by hand or
from an independent forward of the same weights.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from grouprl.models.loading import load_tokenizer
from grouprl.models.tiny import build_char_tokenizer, save_model
from grouprl.rewards import REWARDS, RewardSet
from grouprl.rewards.model_rewards import (
    CareBonus,
    care_bonus_BG,
    care_consistency_N,
    difficulty_weights_B,
    ema_update_,
    ensemble_N,
    gate_by_flags_N,
    posterior_gate_N,
    rubric_items,
    rubric_score,
    standardize_NK,
    weighted_heads_N,
    winrates_G,
)
from grouprl.rewards.models import (
    REWARD_MODELS,
    ClassifierScorer,
    LRUCache,
    PairwiseScorer,
    ScorerError,
    bradley_terry_prob,
    build_scorer,
    build_tiny_classifier,
    parse_judge_reply,
    train_bradley_terry,
)

CHARS = "0123456789+="
PROBLEMS = [(a, b) for a in range(5) for b in range(5)]  # sums 0..8: one-digit answers


def _pairs() -> list[tuple[str, str]]:
    """(chosen, rejected) texts: 'a+b=' + the correct sum over 'a+b=' + any other digit."""
    return [
        (f"{a}+{b}={a + b}", f"{a}+{b}={w}") for a, b in PROBLEMS for w in range(10) if w != a + b
    ]


@pytest.fixture(scope="module")
def one_thread():
    # two cores shared with other jobs: one intra-op thread is ~30x faster for tiny models
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, one_thread):
    """A 2-layer classifier reward model trained (Bradley–Terry) to prefer correct sums."""
    tok = build_char_tokenizer(CHARS)
    model = build_tiny_classifier(
        tok, num_labels=1, hidden_size=64, num_layers=2, num_heads=2, seed=0
    )
    t0 = time.perf_counter()
    # lr 3e-3 sat at the edge of divergence (91% on transformers 5.24); 1e-3 reaches 100%
    loss = train_bradley_terry(model, tok, _pairs(), steps=800, batch_size=32, lr=1e-3, seed=0)
    assert time.perf_counter() - t0 < 20 and loss < 0.3
    return save_model(model, tok, tmp_path_factory.mktemp("rm") / "model")


@pytest.fixture(scope="module")
def two_head_dir(tmp_path_factory, one_thread):
    """An untrained 2-head classifier (its heads are just two fixed functions of the text)."""
    tok = build_char_tokenizer(CHARS)
    model = build_tiny_classifier(tok, num_labels=2, seed=3)
    return save_model(model, tok, tmp_path_factory.mktemp("rm2") / "model")


def _direct_logits(path, texts: list[str]) -> torch.Tensor:
    """Each text's logits from its own unpadded forward, loaded independently of the scorer."""
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = load_tokenizer(str(path))
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt")).logits[0] for t in texts])


# ---------------------------------------------------------------- the classifier


def test_tiny_classifier_prefers_correct_sums(rm_dir, one_thread):
    scorer = build_scorer({"kind": "classifier", "path": str(rm_dir), "batch_size": 64}, "rm")
    prompts, completions, correct = [], [], []
    for a, b in PROBLEMS:
        for w in range(10):
            prompts.append(f"{a}+{b}=")
            completions.append(str(w))
            correct.append(w == a + b)
    s = scorer.score(prompts, completions)[:, 0].view(len(PROBLEMS), 10)
    mask = torch.tensor(correct).view(len(PROBLEMS), 10)
    good = s[mask]  # the one correct answer of each problem
    share = (good[:, None] > s).sum().item() / (len(PROBLEMS) * 9)  # strict: never itself
    assert share >= 0.95, share  # the correct sum outscores the 9 wrong digits
    assert scorer.num_heads == 1


def test_classifier_scores_equal_unbatched_forwards(rm_dir, one_thread):
    prompts = ["1+2=", "3+4=", "0+0=", "4+4="]
    completions = ["3", "12", "0", "8"]  # different lengths: padded in one batch
    scorer = ClassifierScorer(path=str(rm_dir), batch_size=3, chat_template=False, cache_size=0)
    got = scorer.score(prompts, completions)
    want = _direct_logits(rm_dir, [p + c for p, c in zip(prompts, completions, strict=True)])
    assert torch.allclose(got, want, atol=1e-5)
    # conversational inputs are read as text without a chat template
    conv = scorer.score(
        [[{"role": "user", "content": "1+2="}]], [[{"role": "assistant", "content": "3"}]]
    )
    assert torch.allclose(conv, want[:1], atol=1e-5)


def test_classifier_cache_skips_forwards(rm_dir, one_thread):
    scorer = ClassifierScorer(
        path=str(rm_dir), batch_size=2, cache_size=8, chat_template=False, dtype="float32"
    )
    calls = []
    scorer.engine.load(scorer.where)
    hook = scorer.engine.model.register_forward_hook(
        lambda m, a, kw, o: calls.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        first = scorer.score(["1+1=", "1+1=", "2+2="], ["2", "2", "5"])  # 2 distinct texts
        assert calls == [2]  # one batch of the two distinct rows
        again = scorer.score(["2+2=", "1+1="], ["5", "2"])
        assert calls == [2] and torch.equal(again, first[[2, 0]])
    finally:
        hook.remove()
    # a second scorer on the same model shares the loaded copy and its cache
    other = ClassifierScorer(
        path=str(rm_dir), batch_size=4, cache_size=8, chat_template=False, dtype="float32"
    )
    assert other.engine is scorer.engine


def test_lru_cache_forgets_least_recent():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert (cache.hits, cache.misses) == (3, 0)
    assert cache.get("b") is None and cache.misses == 1
    off = LRUCache(0)
    off.put("a", 1)
    assert len(off) == 0


def test_scorer_errors_name_the_key(tmp_path, rm_dir):
    with pytest.raises(
        ValueError,
        match=r"rewards\.x\.model\.kind: unknown reward model 'clasifier' \(did you mean \"classifier\"\?\)",
    ):
        build_scorer({"kind": "clasifier", "path": str(rm_dir)}, "rewards.x.model")
    with pytest.raises(ValueError, match=r"rewards\.x\.model\.path: no model at /nonexistent/rm"):
        build_scorer({"kind": "classifier", "path": "/nonexistent/rm"}, "rewards.x.model")
    with pytest.raises(
        ValueError, match=r"rewards\.x\.model\.path: no model at .* \(no config.json"
    ):
        build_scorer({"kind": "classifier", "path": str(tmp_path)}, "rewards.x.model")
    with pytest.raises(
        ValueError,
        match=r"rewards\.x\.model\.batch_sise: reward model 'classifier' has no parameter",
    ):
        build_scorer(
            {"kind": "classifier", "path": str(rm_dir), "batch_sise": 4}, "rewards.x.model"
        )
    with pytest.raises(ValueError, match=r"rewards\.x\.model\.batch_size: must be an integer >= 1"):
        build_scorer(
            {"kind": "classifier", "path": str(rm_dir), "batch_size": 0}, "rewards.x.model"
        )
    with pytest.raises(ValueError, match=r"rewards\.x\.model\.kind: required"):
        build_scorer({"path": str(rm_dir)}, "rewards.x.model")
    if not torch.cuda.is_available():
        scorer = build_scorer(
            {"kind": "classifier", "path": str(rm_dir), "device": "cuda"}, "rewards.x.model"
        )
        with pytest.raises(
            ScorerError, match=r"rewards\.x\.model\.device: 'cuda' but CUDA is not available"
        ):
            scorer.score(["1+1="], ["2"])
    # through a RewardSet: the reward's own key path
    with pytest.raises(
        ValueError, match=r"rewards\.pairwise_winrate\.judge\.path: no model at /nope/rm"
    ):
        RewardSet(
            [
                {
                    "name": "pairwise_winrate",
                    "params": {"judge": {"kind": "pairwise", "path": "/nope/rm"}},
                }
            ]
        )
    assert REWARD_MODELS.names() == ["classifier", "generative", "pairwise"]


# ---------------------------------------------------------------- pairwise judges


def test_bradley_terry_judge(rm_dir, one_thread):
    judge = PairwiseScorer(path=str(rm_dir), temperature=2.0, chat_template=False)
    prompts, a, b = ["1+2=", "1+2=", "4+4="], ["3", "4", "8"], ["4", "3", "8"]
    p = judge.prefer(prompts, a, b)
    r = _direct_logits(rm_dir, ["1+2=3", "1+2=4", "4+4=8"])[:, 0]
    want = torch.sigmoid((torch.stack([r[0], r[1], r[2]]) - torch.stack([r[1], r[0], r[2]])) / 2.0)
    assert torch.allclose(p, want, atol=1e-5)
    assert p[0] > 0.5 and abs(p[0] + p[1] - 1.0) < 1e-6 and p[2] == 0.5
    assert torch.allclose(
        bradley_terry_prob(torch.tensor([2.0]), torch.tensor([0.0])),
        torch.tensor([1 / (1 + math.exp(-2))]),
    )


def test_joint_judge_averages_both_orders(rm_dir, one_thread):
    # a joint judge reads the pair as one text; here the RM itself stands in for one
    judge = PairwiseScorer(path=str(rm_dir), mode="joint", template="{prompt}{a}={b}")
    p = judge.prefer(["1+2="], ["3"], ["4"])
    q = judge.prefer(["1+2="], ["4"], ["3"])
    logits = _direct_logits(rm_dir, ["1+2=3=4", "1+2=4=3"])[:, 0]
    p_ab, p_ba = torch.sigmoid(logits[0]), torch.sigmoid(logits[1])
    assert torch.allclose(p, 0.5 * (p_ab + 1 - p_ba).reshape(1), atol=1e-5)
    assert abs(p.item() + q.item() - 1.0) < 1e-6
    one_way = PairwiseScorer(
        path=str(rm_dir), mode="joint", template="{prompt}{a}={b}", both_orders=False
    )
    assert torch.allclose(one_way.prefer(["1+2="], ["3"], ["4"]), p_ab.reshape(1), atol=1e-5)
    with pytest.raises(ScorerError, match="joint pairwise judge has no pointwise score"):
        judge.score(["1+2="], ["3"])
    with pytest.raises(ValueError, match=r"x\.template: unknown placeholder \{c\}"):
        PairwiseScorer("x", path=str(rm_dir), mode="joint", template="{prompt}{c}")


def test_winrates_by_hand():
    pref = torch.tensor([[0.0, 0.9, 0.5], [0.1, 0.0, 0.2], [0.5, 0.8, 0.0]])
    assert torch.allclose(winrates_G(pref), torch.tensor([0.75, 0.0, 0.75], dtype=torch.float64))
    assert torch.allclose(
        winrates_G(pref, soft=True), torch.tensor([0.7, 0.15, 0.65], dtype=torch.float64)
    )


def test_pairwise_winrate_reward(rm_dir, one_thread):
    fn = REWARDS.get("pairwise_winrate")(
        judge={"kind": "pairwise", "path": str(rm_dir), "chat_template": False}
    )
    prompts = ["1+2="] * 3 + ["2+2="] * 2 + ["0+1="]
    completions = ["3", "5", "3", "4", "1", "1"]
    out = fn(prompts, completions, group_index=[0, 0, 0, 1, 1, 2])
    # "3" beats "5" and ties its twin (1/2): (1 + 0.5) / 2; "5" loses both; a group of one: None
    assert out == [0.75, 0.0, 0.75, 1.0, 0.0, None]
    assert fn.last_metrics["pairwise_winrate/pairs"] == 4.0
    assert fn.last_metrics["pairwise_winrate/ties"] == 0.25
    # without group_index: runs of equal prompts
    assert fn(prompts, completions) == out


# ---------------------------------------------------------------- pointwise rewards


def test_reward_model_and_ensemble(rm_dir, one_thread):
    r = _direct_logits(rm_dir, ["1+2=3", "1+2=4"])[:, 0].double()
    model = {
        "kind": "classifier",
        "path": str(rm_dir),
        "chat_template": False,
        "ref_mean": 1.0,
        "ref_std": 2.0,
    }
    single = REWARDS.get("reward_model")(model=model)
    got = single(["1+2=", "1+2="], ["3", "4"])
    assert got == pytest.approx(((r - 1.0) / 2.0).tolist(), abs=1e-5)
    members = [{"reward": "exact_match"}, model]
    rm = (r - 1.0) / 2.0
    gold = torch.tensor([1.0, 0.0], dtype=torch.float64)
    cols = {"answer": ["3", "3"]}
    for aggregate, want in (
        ("mean", (gold + rm) / 2),
        ("min", torch.minimum(gold, rm)),
        ("uwo", (gold + rm) / 2 - 0.5 * ((gold - rm) / 2) ** 2),
    ):
        fn = REWARDS.get("reward_ensemble")(members=members, aggregate=aggregate)
        assert fn(["1+2=", "1+2="], ["3", "4"], **cols) == pytest.approx(want.tolist(), abs=1e-5)
    assert fn.last_metrics["reward_ensemble/member_0"] == 0.5
    with pytest.raises(
        ValueError, match=r"rewards\.reward_ensemble\.members: must be a list of at least 2"
    ):
        REWARDS.get("reward_ensemble")(members=[model])
    with pytest.raises(
        ValueError, match=r"rewards\.reward_ensemble\.members\.0\.reward: .*'exact_mach'"
    ):
        REWARDS.get("reward_ensemble")(members=[{"reward": "exact_mach"}, model])


def test_ensemble_math_by_hand():
    scores = torch.tensor([[1.0, 3.0], [2.0, 2.0], [math.nan, 4.0], [0.0, 4.0]])
    assert ensemble_N(scores, "mean").tolist() == [2.0, 2.0, 4.0, 2.0]
    assert ensemble_N(scores, "min").tolist() == [1.0, 2.0, 4.0, 0.0]
    # UWO: mean − λ·Var (population variance over the members); row 3: var 4, std 2
    assert ensemble_N(scores, "uwo", lam=0.5).tolist() == [1.5, 2.0, 4.0, 0.0]
    assert ensemble_N(scores, "uwo", lam=0.5, penalty="std").tolist() == [1.5, 2.0, 4.0, 1.0]
    assert math.isnan(ensemble_N(torch.tensor([[math.nan, math.nan]]), "mean").item())
    z = standardize_NK(torch.tensor([[1.0, 5.0], [3.0, 5.0], [math.nan, 5.0]]))
    assert (
        z[:2, 0].tolist() == [-1.0, 1.0]
        and math.isnan(z[2, 0])
        and z[:, 1].tolist() == [0.0, 0.0, 0.0]
    )


def test_multihead_rm(two_head_dir, one_thread):
    fn = REWARDS.get("multihead_rm")(
        model={"kind": "classifier", "path": str(two_head_dir)}, weights=[0.25, -1.0]
    )
    logits = _direct_logits(two_head_dir, ["1+1=2", "3+3=9"]).double()
    got = fn(["1+1=", "3+3="], ["2", "9"])
    assert got == pytest.approx((0.25 * logits[:, 0] - logits[:, 1]).tolist(), abs=1e-5)
    assert fn.last_metrics["multihead_rm/head_1"] == pytest.approx(
        logits[:, 1].mean().item(), abs=1e-5
    )
    equal = REWARDS.get("multihead_rm")(model={"kind": "classifier", "path": str(two_head_dir)})
    assert equal(["1+1="], ["2"]) == pytest.approx([logits[0].mean().item()], abs=1e-5)
    bad = REWARDS.get("multihead_rm")(
        model={"kind": "classifier", "path": str(two_head_dir)}, weights=[1, 2, 3]
    )
    with pytest.raises(
        ScorerError, match=r"rewards\.multihead_rm\.weights: 3 weights for a model with 2 heads"
    ):
        bad(["1+1="], ["2"])
    with pytest.raises(ValueError, match=r"rewards\.multihead_rm\.model\.head: not used"):
        REWARDS.get("multihead_rm")(
            model={"kind": "classifier", "path": str(two_head_dir), "head": 1}
        )
    assert weighted_heads_N(torch.tensor([[1.0, 2.0]]), torch.tensor([3.0, -1.0])).tolist() == [1.0]
    # the same model, head by head, as two rewards (for gdpo): one loaded copy
    h1 = REWARDS.get("reward_model")(
        model={"kind": "classifier", "path": str(two_head_dir), "head": 1}
    )
    assert h1(["3+3="], ["9"]) == pytest.approx([logits[1, 1].item()], abs=1e-5)
    with pytest.raises(
        ScorerError, match=r"rewards\.reward_model\.model\.head: 2, but the model has 2 heads"
    ):
        REWARDS.get("reward_model")(
            model={"kind": "classifier", "path": str(two_head_dir), "head": 2}
        )(["1+1="], ["2"])


def test_judge_constraints():
    flags = torch.tensor([[False, True, False], [False, False, True]])
    assert gate_by_flags_N(torch.tensor([1.0, 2.0, 3.0]), flags, floor=-1.0).tolist() == [
        1.0,
        -1.0,
        -1.0,
    ]
    fn = REWARDS.get("judge_constraints")(
        reward={"reward": "exact_match"},
        judges=[
            {
                "reward": "overlong_penalty",
                "params": {"max_length": 4, "buffer": 1},
                "flag_below": 0.0,
                "name": "length",
            }
        ],
        floor=-0.5,
    )
    # lengths 1, 4, 1, 5 chars: L_max − L_c = 3, so the 4- and 5-char answers are flagged
    out = fn(["q"] * 4, ["7", "7777", "8", "77777"], answer=["7", "7777", "7", "7"])
    assert out == [1.0, -0.5, 0.0, -0.5]
    assert fn.last_metrics["judge_constraints/violations"] == 0.5
    assert fn.last_metrics["judge_constraints/length/violations"] == 0.5
    with pytest.raises(
        ValueError,
        match=r"rewards\.judge_constraints\.judges\.0: needs flag_above and/or flag_below",
    ):
        REWARDS.get("judge_constraints")(reward="exact_match", judges=[{"reward": "format"}])


def test_posterior_gate(rm_dir, one_thread):
    got = posterior_gate_N(
        torch.tensor([0.0, 1.0, 0.5]),
        torch.tensor([1.0, 0.0, 1.0]),
        torch.tensor([0.7, 0.9, math.nan]),
    )
    assert got.tolist() == pytest.approx([1.7, 1.0, 1.5])
    think = {"kind": "classifier", "path": str(rm_dir), "chat_template": False, "cache_size": 0}
    fn = REWARDS.get("posterior_gate")(outcome={"reward": "exact_match"}, think=think)
    engine = fn.think.scorer.engine
    engine.load("t")
    rows = []
    hook = engine.model.register_forward_hook(
        lambda m, a, kw, o: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        out = fn(["1+2=", "1+2=", "2+2="], ["3", "5", "4"], answer=["3", "3", "4"])
    finally:
        hook.remove()
    assert rows == [2]  # the reasoning scorer ran on the correct rows only
    r = _direct_logits(rm_dir, ["1+2=3", "2+2=4"])[:, 0].double()
    assert out == pytest.approx([1.0 + r[0].item(), 0.0, 1.0 + r[1].item()], abs=1e-5)
    assert fn.last_metrics["posterior_gate/correct"] == pytest.approx(2 / 3)


def test_difficulty_scale():
    w = difficulty_weights_B(
        torch.tensor([0.5, 0.0, 1.0, math.nan]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    )
    # d = [0.5, 2, 0, nan], mean of the finite d = 2.5/3: w = d / (2.5/3); NaN group: 1
    assert w.tolist() == pytest.approx([0.6, 2.4, 0.0, 1.0])
    assert difficulty_weights_B(torch.tensor([1.0, 1.0]), torch.ones(2)).tolist() == [1.0, 1.0]
    fn = REWARDS.get("difficulty_scale")(reward="exact_match", hardness_column="hardness")
    prompts = ["a"] * 2 + ["b"] * 2
    out = fn(
        prompts,
        ["1", "0", "1", "1"],
        answer=["1"] * 4,
        hardness=[2.0, 2.0, 1.0, 1.0],
        group_index=[0, 0, 1, 1],
    )
    # group a: mean 0.5, d = 2·0.5 = 1; group b: mean 1, d = 0; mean d = 0.5: w = [2, 0]
    assert out == [2.0, 0.0, 0.0, 0.0]
    with pytest.raises(
        ValueError, match=r"rewards\.difficulty_scale\.hardness_column \(hardness\): row 0"
    ):
        fn(["a"], ["1"], answer=["1"], hardness=[-1.0])


def test_care_pure_parts():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.99, 0.3, 1.0]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    c = care_consistency_N(logp, mask)
    assert c.tolist() == pytest.approx([0.5, 0.95], abs=1e-6)  # the second capped at 0.95
    acc = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    cons = torch.tensor([[0.9, 0.5, 0.99, 0.8], [0.9, 0.9, 0.9, 0.9]])
    # group 0: accurate rows 0, 1, 3 (acc > 0.1, >= mean 0.75); their mean c = 0.7333;
    # consistent: c >= 0.7233 -> rows 0 and 3 get b·acc = 0.5; group 1: nobody accurate
    bonus = care_bonus_BG(acc, cons)
    assert bonus.tolist() == [[0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
    target, source = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        (
            target.weight.fill_(1.0),
            target.bias.fill_(0.0),
            source.weight.fill_(3.0),
            source.bias.fill_(-1.0),
        )
    ema_update_(target, source, decay=0.9)
    assert target.weight[0].tolist() == pytest.approx(
        [1.2, 1.2]
    ) and target.bias.item() == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="decay must be in"):
        ema_update_(target, source, decay=1.5)
    # the reward form: accuracy from exact_match, consistency from the trainer's column
    care = CareBonus(accuracy="exact_match")
    out = care(
        ["a"] * 4 + ["b"] * 2,
        ["1", "1", "0", "1", "0", "0"],
        answer=["1"] * 6,
        care_consistency=[0.9, 0.5, 0.99, 0.8, 0.9, 0.9],
        group_index=[0, 0, 0, 0, 1, 1],
    )
    assert out == [0.5, 0.0, 0.0, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="no 'care_consistency' column"):
        care(["a"], ["1"], answer=["1"])


# ---------------------------------------------------------------- the HTTP judge


class _Judge(BaseHTTPRequestHandler):
    """OpenAI-shaped answers from a rule: the reply scores the response part of the prompt.

    chat: the user message holds 'A: <completion>' (and maybe 'C: <criterion>'); the score
    is the number of digits in the completion (``Score: k/10``), or, with a criterion,
    ``Score: 1`` when the criterion's text is in the completion, else ``Score: 0``; 'JSON'
    in the message asks for a JSON reply. Markers: 'FLAKY' fails with 503 on its first try,
    'SLOW' sleeps past the client's timeout, 'GARBLED' has no score.
    """

    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass

    def do_POST(self) -> None:
        st = self.server.state  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with st["lock"]:
            st["requests"].append(body)
            st["inflight"] += 1
            st["max_inflight"] = max(st["max_inflight"], st["inflight"])
        try:
            self._answer(st, body)
        finally:
            with st["lock"]:
                st["inflight"] -= 1

    def _answer(self, st: dict, body: dict) -> None:
        if st.get("key") and self.headers.get("Authorization") != f"Bearer {st['key']}":
            return self._send(401, {"error": {"message": "bad key"}})
        if body.get("model") != "judge":
            return self._send(
                404, {"error": {"message": f"The model {body.get('model')} does not exist."}}
            )
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            return self._send(404, {"error": {"message": "no such route"}})
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        time.sleep(st.get("delay", 0.0))
        if "FLAKY" in text:
            with st["lock"]:
                st["flaky"] = st.get("flaky", 0) + 1
                first = st["flaky"] == 1
            if first:
                return self._send(503, {"error": {"message": "overloaded"}})
        if "SLOW" in text:
            time.sleep(1.0)
        answer = re.search(r"A: (.*)", text).group(1)
        criterion = re.search(r"C: (.*)", text)
        if "GARBLED" in text:
            reply = "I cannot decide."
        elif criterion:
            reply = f"Checked.\nScore: {int(criterion.group(1) in answer)}"
        else:
            k = sum(ch.isdigit() for ch in answer)
            reply = (
                f'Here: {{"score": {k}, "note": "ok"}}'
                if "JSON" in text
                else f"{k} digits.\nScore: {k}/10"
            )
        choice = {"index": 0, "finish_reason": "stop"}
        choice |= {"message": {"role": "assistant", "content": reply}} if chat else {"text": reply}
        self._send(
            200, {"id": "x", "object": "chat.completion", "model": "judge", "choices": [choice]}
        )


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.state = {"lock": threading.Lock(), "requests": [], "inflight": 0, "max_inflight": 0}  # type: ignore[attr-defined]
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_parse_judge_reply():
    assert (
        parse_judge_reply("Reasoning 1, 2, 3.\nScore: 7/10") == 7.0
    )  # Score: beats the last number
    assert parse_judge_reply("**Score:** 0.5") == 0.5
    assert parse_judge_reply("first 3 then 4.5") == 4.5
    assert parse_judge_reply("no number") is None
    assert parse_judge_reply('x {"score": 1} y ```json\n{"score": "0.25"}\n```', "json") == 0.25
    assert parse_judge_reply('{"a": {"score": 2}}', "json") is None  # only a top-level key counts
    assert parse_judge_reply("grade=B, points 3", "regex", pattern=r"points (\d+)") == 3.0


def test_generative_judge_over_http(judge_server):
    server, url = judge_server
    judge = build_scorer(
        {
            "kind": "generative",
            "base_url": url,
            "model": "judge",
            "template": "Q: {prompt}\nA: {completion}",
            "min_score": 0,
            "max_score": 10,
            "concurrency": 2,
        },
        "rewards.reward_model.model",
    )
    server.state["delay"] = 0.05
    got = judge.score(["q"] * 4, ["1", "12", "123", "none"])
    assert got[:, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.0])
    assert len(server.state["requests"]) == 4 and server.state["max_inflight"] == 2  # concurrency
    body = server.state["requests"][0]
    assert (
        body["model"] == "judge"
        and body["temperature"] == 0.0
        and body["messages"][0]["role"] == "user"
    )
    again = judge.score(["q", "q"], ["123", "GARBLED"])  # one cached, one new without a score
    assert again[0, 0].item() == pytest.approx(0.3) and math.isnan(again[1, 0].item())
    assert len(server.state["requests"]) == 5 and judge.last_stats["unparsed"] == 1.0
    # a transient 503 is retried; the completions endpoint and JSON replies
    flaky = build_scorer(
        {
            "kind": "generative",
            "base_url": url,
            "model": "judge",
            "endpoint": "completions",
            "parse": "json",
            "template": "JSON FLAKY\nA: {completion}",
            "backoff": 0.0,
        },
        "j",
    )
    assert flaky.score(["q"], ["12"])[0, 0].item() == 2.0
    assert server.state["flaky"] == 2 and "prompt" in server.state["requests"][-1]


def test_generative_judge_failures(judge_server, monkeypatch):
    server, url = judge_server
    spec = {
        "kind": "generative",
        "base_url": url,
        "model": "judge",
        "template": "Q: {prompt}\nA: {completion}",
    }
    slow = build_scorer({**spec, "timeout": 0.3, "retries": 1, "backoff": 0.0}, "rewards.r.model")
    got = slow.score(["q", "q"], ["SLOW", "7"])  # the slow request times out twice: NaN
    assert math.isnan(got[0, 0].item()) and got[1, 0].item() == 1.0
    assert slow.last_stats["failed_requests"] == 1.0
    with pytest.raises(
        ScorerError,
        match=r"rewards\.r\.model\.base_url: every request of this batch failed.*2 tries",
    ):
        slow.score(["q"], ["SLOW again"])
    with pytest.raises(
        ScorerError,
        match=r"rewards\.r\.model\.base_url: every request.*(Connection refused|URLError)",
    ):
        build_scorer(
            {**spec, "base_url": "http://127.0.0.1:9/v1", "retries": 0}, "rewards.r.model"
        ).score(["q"], ["1"])
    wrong = build_scorer({**spec, "model": "nobody"}, "rewards.r.model")
    with pytest.raises(
        ScorerError, match=r"rewards\.r\.model\.model: POST .* answered HTTP 404: .*does not exist"
    ):
        wrong.score(["q"], ["1"])
    server.state["key"] = "sekrit"
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with pytest.raises(ScorerError, match=r"rewards\.r\.model\.api_key_env: .* HTTP 401"):
        build_scorer({**spec, "api_key_env": "JUDGE_KEY"}, "rewards.r.model").score(["q"], ["1"])
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    assert (
        build_scorer({**spec, "api_key_env": "JUDGE_KEY"}, "r").score(["q"], ["12"])[0, 0].item()
        == 2.0
    )
    with pytest.raises(
        ValueError,
        match=r"rewards\.r\.model\.api_key_env: the environment variable NO_SUCH_KEY_X is not set",
    ):
        build_scorer({**spec, "api_key_env": "NO_SUCH_KEY_X"}, "rewards.r.model")
    with pytest.raises(ScorerError, match=r"r\.template: placeholder \{rubric\} is neither"):
        build_scorer({**spec, "template": "{rubric} A: {completion}"}, "r").score(["q"], ["1"])
    with pytest.raises(ValueError, match=r"r\.min_score, max_score: give both"):
        build_scorer({**spec, "min_score": 0}, "r")


def test_rubric_reward_over_http(judge_server):
    server, url = judge_server
    assert rubric_items('["a", {"criterion": "b", "weight": 2}]', "x") == [("a", 1.0), ("b", 2.0)]
    assert rubric_items("one item", "x") == [("one item", 1.0)] and rubric_items(None, "x") == []
    with pytest.raises(ValueError, match=r"x\[0\]\.weight: a number >= 0"):
        rubric_items([{"criterion": "a", "weight": -1}], "x")
    assert rubric_score([1.0, 0.0, 0.5, math.nan], [2.0, 1.0, 1.0, 5.0]) == 0.625
    assert rubric_score([1.0, 0.0, 0.5, math.nan], [2.0, 1.0, 1.0, 5.0], threshold=0.5) == 0.75
    fn = REWARDS.get("rubric_reward")(
        judge={
            "kind": "generative",
            "base_url": url,
            "model": "judge",
            "template": "Q: {prompt}\nA: {completion}\nC: {criterion}",
            "min_score": 0,
            "max_score": 1,
        }
    )
    rubric = [{"criterion": "units 7", "weight": 3}, "carry 1"]  # substrings the server checks
    out = fn(
        ["17+10=", "17+10=", "q"],
        ["27 units 7", "carry 1 and 27", "x"],
        rubric=[rubric, rubric, None],
    )
    assert out == [0.75, 0.25, None]  # 3/(3+1) and 1/(3+1); no rubric: None
    assert len(server.state["requests"]) == 4
    assert fn.last_metrics["rubric_reward/items"] == pytest.approx(4 / 3)
    default = REWARDS.get("rubric_reward")(
        judge={"kind": "generative", "base_url": url, "model": "judge"}
    )
    assert default.judge.range == (0.0, 1.0) and "{criterion}" in default.judge.template
    with pytest.raises(
        ValueError, match=r"rewards\.rubric_reward\.judge\.template: must hold a \{criterion\}"
    ):
        REWARDS.get("rubric_reward")(
            judge={
                "kind": "generative",
                "base_url": url,
                "model": "judge",
                "template": "A: {completion}",
            }
        )
    with pytest.raises(
        ValueError, match=r"rewards\.rubric_reward\.rubric_column: no column 'rubric'"
    ):
        fn(["q"], ["x"], answer=["1"])


# ---------------------------------------------------------------- in a RewardSet


def test_model_reward_in_worker_and_in_process(rm_dir, one_thread):
    # cache_size 7: a model copy no earlier test loaded in this process
    model = {"kind": "classifier", "path": str(rm_dir), "chat_template": False, "cache_size": 7}
    spec = {"name": "reward_model", "params": {"model": model}}
    prompts, comps = ["1+2=", "1+2="], ["3", "4"]
    with (
        RewardSet([{**spec, "timeout": 60}]) as forked,
        RewardSet([{**spec, "timeout": 0}]) as inproc,
    ):
        b = forked(prompts, comps, {})  # the forked worker loads its own copy (CPU)
        engine = forked.fns[0].model.scorer.engine
        assert engine.model is None  # ... and this process still holds none
        a = inproc(prompts, comps, {})
        assert engine.model is not None  # in-process: loaded here, shared by both sets
    assert b.errors == {"reward_model": 0} and b.timeouts == {"reward_model": 0}
    assert torch.allclose(a.rewards_NK, b.rewards_NK, atol=1e-5)
    assert a.rewards_NK[0, 0] > a.rewards_NK[1, 0]


@pytest.mark.parametrize("recipe", ["judge_constraints", "difficulty_scale"])
def test_recipes_build(recipe):
    from grouprl.components import build_rewards, load_config

    cfg = load_config({"recipe": recipe})
    assert build_rewards(cfg).names == [recipe]
