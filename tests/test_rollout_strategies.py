"""Rollout strategies (training/strategies/, `rollout.strategy`): hinted re-sampling
of the groups no rollout solved (Scaf-GRPO, SAGE). The strategy logic runs in the real
collector on an `AnswerEngine`, a deterministic stand-in for the *policy* (it answers what
the hint in its prompt says), so which rows get replaced is known by hand; the trainer runs
them end to end on the tiny model with the real HF engine; the shared-prefix forward is
exact on groups whose rows have different prompts."""

from __future__ import annotations

import math
import re
import string

import pytest
import torch
from conftest import arith_rows, base_config, record_collections, strategy_collector, text_rollouts

from grouprl.config import ConfigError, load_config
from grouprl.data.datasets import PromptExample
from grouprl.models.forward import completion_logprobs
from grouprl.models.tiny import build_char_tokenizer, build_tiny_model
from grouprl.rollout.base import Rollouts, SamplingParams
from grouprl.training.strategies import build_strategy
from grouprl.training.strategies.base import failed_groups, with_hint
from grouprl.training.strategies.hints import ScafHints, parse_hint_json
from grouprl.training.trainer import Trainer

TOK = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")


class AnswerEngine:
    """Answers "x" to a plain prompt, the text after the last "Hint: " to a hinted one, and,
    to a tutoring prompt (one that holds "Reference solution:"), `tutor_reply`."""

    samples_from_policy = False

    def __init__(self, tutor_reply: str = "") -> None:
        self.tutor_reply = tutor_reply
        self.calls: list[list[str]] = []

    def answer(self, prompt: str) -> str:
        if "Reference solution:" in prompt:
            return self.tutor_reply
        found = re.findall(r"Hint: ?(\S+)", prompt)
        return found[-1] if found else "x"

    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        self.calls.append(list(prompts))
        G = params.num_generations
        texts = [self.answer(p) for p in prompts for _ in range(G)]
        return text_rollouts(TOK, prompts, texts, G)


def collector(rows, strategy, engine, G=3, sampler=None):
    return strategy_collector(TOK, rows, strategy, engine, G, sampler)


# ------------------------------------------------------------------ pure pieces
def test_with_hint_appends_to_the_last_user_message():
    assert with_hint("2+2=", "4", " Hint: {hint}") == "2+2= Hint: 4"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    out = with_hint(msgs, "h", "\n{hint}")
    assert out[1]["content"] == "q\nh" and msgs[1]["content"] == "q"  # a copy


def test_failed_groups_need_no_success_and_ignore_nan():
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [float("nan"), 0.5]])
    assert failed_groups(r, 1.0) == [0, 2]
    assert failed_groups(r, 0.5) == [0]


def test_parse_hint_json_takes_the_first_complete_object():
    assert parse_hint_json('noise {"level_1": "a", "level_2": "b", "level_3": "c"} tail') == [
        "a",
        "b",
        "c",
    ]
    assert parse_hint_json('{"level_1": "a", "level_2": ""}') is None
    assert parse_hint_json('{not json} {"level_1": "a"}') is None


def test_bad_parameters_name_the_key():
    with pytest.raises(ValueError, match="rollout.strategy.replace_num"):
        build_strategy({"name": "scaf_hints", "replace_num": 0})
    with pytest.raises(ValueError, match="rollout.strategy.hint_template"):
        build_strategy({"name": "scaf_hints", "hint_template": "no slot"})
    with pytest.raises(ValueError, match="did you mean"):
        build_strategy({"name": "scaf_hints", "warmup_step": 3})
    with pytest.raises(ValueError, match="unknown rollout strategy"):
        build_strategy({"name": "hintz"})


# ------------------------------------------------------------------ Scaf-GRPO
def test_scaf_replaces_the_last_rollout_of_a_failed_group_at_the_lowest_working_level():
    """Prompt 0's hints: level 1 says "7" (wrong), level 2 says "12" (right): its last
    rollout is replaced by the level-2 sample. Prompt 1 has no hints: kept. Prompt 2's
    only hint is wrong: kept, after one try."""
    rows = [
        {"prompt": "5+7=", "answer": "12", "hints": ["7", "12"]},
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "answer": "4", "hints": "5"},
    ]
    eng = AnswerEngine()
    scaf = ScafHints(warmup_steps=0, hint_template=" Hint: {hint}")
    col = collector(rows, scaf, eng, sampler={"name": "vas"})
    batch, metrics = col.collect(3)
    assert batch.rollouts.completions == ["x", "x", "12", "x", "x", "x", "x", "x", "x"]
    assert batch.rewards_N.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert batch.extra["hint_level"] == [0, 0, 2, 0, 0, 0, 0, 0, 0]
    # the replaced row keeps the hint in its prompt ids; the others keep the plain prompt
    prompts = TOK.batch_decode(batch.rollouts.prompt_ids_NP, skip_special_tokens=True)
    assert prompts[2] == "5+7= Hint: 12" and prompts[0] == prompts[1] == "5+7="
    # level 1 sampled both hinted prompts (1 rollout each), level 2 only prompt 0's
    assert eng.calls[1:] == [["5+7= Hint: 7", "2+2= Hint: 5"], ["5+7= Hint: 12"]]
    assert metrics["hint/failed_groups"] == 3 and metrics["hint/rescued_groups"] == 1
    assert metrics["hint/used_level_2"] == pytest.approx(1 / 9)
    # the sampler learned the plain pass rates (all 0), not the hinted one
    assert col.sampler.tables["last_pass"].tolist() == [0.0, 0.0, 0.0]


def test_scaf_waits_for_its_warmup_and_leaves_solved_groups_alone():
    rows = [{"prompt": "5+7=", "answer": "x", "hints": ["12"]}]  # "x" is right: solved
    col = collector(rows, ScafHints(warmup_steps=0), AnswerEngine(), G=2)
    batch, metrics = col.collect(1)
    assert batch.extra["hint_level"] == [0, 0] and metrics["hint/failed_groups"] == 0
    rows = [{"prompt": "5+7=", "answer": "12", "hints": ["12"]}]
    col = collector(rows, ScafHints(warmup_steps=5), AnswerEngine(), G=2)
    batch, metrics = col.collect(1, step=4)
    assert not any(k.startswith("hint/") for k in metrics)
    assert batch.rollouts.completions == ["x", "x"]
    batch, metrics = col.collect(1, step=5)
    assert batch.rollouts.completions == ["x", "12"]


def test_scaf_refuses_a_hint_column_of_the_wrong_type():
    rows = [{"prompt": "5+7=", "answer": "12", "hints": [1, 2]}]
    col = collector(rows, ScafHints(warmup_steps=0), AnswerEngine())
    with pytest.raises(ValueError, match="hint_column: row 1's 'hints'"):
        col.collect(1)


# ------------------------------------------------------------------ SAGE
def test_sage_writes_hints_with_the_policy_and_replaces_the_whole_group():
    """The policy (engine) answers the tutoring prompt with three hints; level 1 ("9") is
    wrong, level 2 ("12") right: the whole group is re-sampled with the level-2 prompt."""
    reply = '{"level_1": "9", "level_2": "12", "level_3": "zz"}'
    rows = [
        {"prompt": "5+7=", "answer": "12", "solution": "5+7 is 12"},
        {"prompt": "1+1=", "answer": "x", "solution": "2"},  # solved: untouched
    ]
    eng = AnswerEngine(tutor_reply=reply)
    strategy = build_strategy(
        {"name": "sage_hints", "question_template": "{question} Hint: {hint}"}
    )
    col = collector(rows, strategy, eng, G=2)
    batch, metrics = col.collect(2)
    assert batch.rollouts.completions == ["12", "12", "x", "x"]
    assert batch.extra["hint_level"] == [2, 2, 0, 0]
    assert "Reference solution:\n5+7 is 12" in eng.calls[1][0]  # the tutoring prompt
    assert eng.calls[2:] == [["5+7= Hint: 9"], ["5+7= Hint: 12"]]
    assert metrics["hint/rescued_groups"] == 1 and metrics["hint/unparsed_hints"] == 0


def test_sage_retries_unparseable_hints_then_gives_up():
    rows = [{"prompt": "5+7=", "answer": "12", "solution": "12"}]
    eng = AnswerEngine(tutor_reply="no json here")
    col = collector(rows, build_strategy({"name": "sage_hints", "retries": 2}), eng, G=2)
    batch, metrics = col.collect(1)
    assert len(eng.calls) == 1 + 2  # the group, then two tries at the hints
    assert metrics["hint/unparsed_hints"] == 1 and batch.rollouts.completions == ["x", "x"]


# ------------------------------------------------------------------ the engine with hinted rows
def test_shared_prefix_forward_is_exact_when_a_groups_rows_have_different_prompts():
    tok = build_char_tokenizer("0123456789+=")
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    prompts = ["12+3=", "12+3=", "12+3=4", "7+7=", "7+7=", "7+7="]  # row 2: a hinted prompt
    enc = tok(prompts, padding=True, return_tensors="pt")
    comp = torch.randint(4, 14, (6, 5))
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    args = (enc["input_ids"], enc["attention_mask"].float(), comp, mask)
    shared, _ = completion_logprobs(model, *args, shared_prefix=True)
    repeated, _ = completion_logprobs(model, *args, shared_prefix=False)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-5)


def test_trainer_runs_scaf_hints_end_to_end(tmp_path, tiny_model_dir):
    """The tiny model (never right on arith) with digit hints: hinted rows join groups and
    train; the metrics say how many groups were rescued."""
    cfg = base_config(tmp_path / "r", tiny_model_dir, max_steps=2)
    cfg["rollout"]["strategy"] = {
        "name": "scaf_hints",
        "warmup_steps": 0,
        "hint_template": "{hint}",
    }
    rows = [{**r, "hints": [r["answer"][0], r["answer"]]} for r in arith_rows()]
    tr = Trainer(cfg, train_dataset=rows)
    res = tr.train()
    tr.close()
    last = res.history[-1]
    assert res.steps == 2 and last["hint/failed_groups"] >= 1
    assert torch.isfinite(torch.tensor(last["loss"]))


def test_a_strategy_with_an_environment_is_refused():
    with pytest.raises(ConfigError, match="rollout.strategy: 'scaf_hints'"):
        load_config(
            {
                "rollout": {"strategy": {"name": "scaf_hints"}},
                "data": {"environment": {"name": "tools", "tools": ["calculator"]}},
            }
        )


def test_example_columns_reach_the_strategy():
    ex = PromptExample(prompt="q", text="q", columns={"hints": ["a"]}, row=3)
    assert ScafHints().hints_of(ex) == ["a"]


# ------------------------------------------------------------------ XRPO in-context seeding
def test_icl_seed_grows_a_corpus_and_reseeds_failed_groups_with_similar_solved_ones():
    """Step 1: prompt "1+1=" is solved ("x" is its answer), "5+7=" fails with no corpus yet.
    Step 2: "5+7=" fails again and is sampled with the solved "1+1=" as an exemplar; the
    engine answers the exemplar's answer ("Hint: 12" is in the exemplar's text), so the
    whole group is replaced with seeded rollouts."""
    from grouprl.training.strategies.hints import ICLSeed

    rows = [
        {"prompt": "1+1=", "answer": "x"},
        {"prompt": "5+7=", "answer": "12"},
    ]
    icl = ICLSeed(k=1, exemplar_template="{question} Hint: 12 {answer}\n")
    col = collector(rows, icl, AnswerEngine(), G=2)
    batch, metrics = col.collect(2)
    assert metrics["icl/corpus_size"] == 1 and metrics["icl/seeded_groups"] == 1
    # the seeded prompt says "Hint: 12": the engine answers 12 -> rescued
    assert batch.rollouts.completions == ["x", "x", "12", "12"]
    assert batch.extra["hint_level"] == [0, 0, 1, 1]
    prompts = TOK.batch_decode(batch.rollouts.prompt_ids_NP, skip_special_tokens=True)
    assert prompts[2] == "1+1= Hint: 12 x\n5+7="
    # the corpus is part of the collector's state (checkpoints), and comes back
    state = col.state_dict()
    assert state["rollout_strategy"]["corpus"][0][1:] == ["1+1=", "x"]
    other = collector(rows, ICLSeed(k=1), AnswerEngine(), G=2)
    other.load_state_dict(state)
    assert other.strategy.corpus == icl.corpus


def test_icl_seed_leaves_a_group_alone_without_a_similar_entry():
    from grouprl.training.strategies.hints import ICLSeed

    rows = [{"prompt": "5+7=", "answer": "12"}]
    col = collector(rows, ICLSeed(), AnswerEngine(), G=2)
    batch, metrics = col.collect(1)
    assert metrics["icl/seeded_groups"] == 0 and batch.rollouts.completions == ["x", "x"]


def coin_reward(prompts, completions, **kw):
    return [1.0 if c[:1] in "02468" and c[:1] else 0.0 for c in completions]


def test_icl_seed_corpus_resumes_exactly(tmp_path, tiny_model_dir):
    def run(out, steps, resume=False):
        cfg = base_config(out, tiny_model_dir, max_steps=steps, save_every=2, resume=resume)
        cfg["rollout"]["strategy"] = {
            "name": "icl_seed",
            "k": 1,
            "exemplar_template": "{question}{answer}",
        }
        tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[coin_reward])
        res = tr.train()
        corpus = dict(tr.collector.strategy.corpus)
        tr.close()
        return res, corpus

    res, full = run(tmp_path / "a", 4)
    assert "icl/corpus_size" in res.history[-1] and full
    run(tmp_path / "b", 2)
    _, resumed = run(tmp_path / "b", 4, resume=True)
    assert resumed == full


def test_igrpo_trains_on_refinements_of_the_best_draft():
    """Drafts: "x" (wrong, the answer is "x2"); the best draft goes into the prompt through
    the template " Hint: {draft}2", which the engine reads as the answer "x2": the group
    is replaced by its refinements, all right, each with the draft in its prompt."""
    rows = [{"prompt": "5+7=", "answer": "x2"}, {"prompt": "1+1=", "answer": "x2"}]
    strategy = build_strategy({"name": "igrpo", "refine_template": " Hint: {draft}2"})
    eng = AnswerEngine()
    col = collector(rows, strategy, eng, G=2)
    batch, metrics = col.collect(2)
    assert batch.rollouts.completions == ["x2"] * 4 and batch.rewards_N.tolist() == [1.0] * 4
    assert eng.calls[1] == ["5+7= Hint: x2", "1+1= Hint: x2"]  # one call, G refinements each
    assert metrics["igrpo/draft_reward_mean"] == 0.0 and metrics["igrpo/refined_reward_mean"] == 1.0
    assert batch.extra["hint_level"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="refine_template"):
        build_strategy({"name": "igrpo", "refine_template": "no slot"})


# ------------------------------------------------------------------ Dataset Reset (DR-PO)
def test_dataset_reset_continues_from_a_solution_prefix(tmp_path, tiny_model_dir):
    """The last 2 rollouts of each group start from the first tokens of the row's solution:
    the prefix sits in their prompt (never trained), the policy's continuation is the
    completion, and the rewards read prefix + continuation."""
    cfg = base_config(tmp_path / "r", tiny_model_dir, max_steps=1)
    cfg["rollout"]["strategy"] = {"name": "dataset_reset", "reset_num": 2, "max_frac": 0.9}
    rows = [{**r, "solution": r["answer"] + "0"} for r in arith_rows()]
    tr = Trainer(cfg, train_dataset=rows, reward_funcs=[coin_reward])
    seen = record_collections(tr)
    res = tr.train()
    tr.close()
    batch, _ = seen[-1]
    G, tok = batch.rollouts.group_size, tr.tokenizer
    assert batch.extra["hint_level"] == ([0, 0, 1, 1] * batch.num_groups)
    for g, ex in enumerate(batch.examples):
        for j in (G - 2, G - 1):
            i = g * G + j
            p = batch.rollouts.prompt_ids_NP[i][batch.rollouts.prompt_mask_NP[i].bool()].tolist()
            prompt = tok.decode(p, skip_special_tokens=True)
            assert prompt.startswith(ex.text) and len(prompt) > len(ex.text)
            prefix = prompt[len(ex.text) :]
            assert ex.columns["solution"].startswith(prefix)
            assert batch.rollouts.completions[i].startswith(prefix)  # what the rewards read
            real = batch.rollouts.attention_mask_NT[i].bool()
            assert torch.equal(batch.rollouts.loss_mask_NT[i][real], torch.ones(int(real.sum())))
    assert res.history[-1]["reset/groups"] == batch.num_groups


def test_dataset_reset_needs_a_continuing_engine():
    from grouprl.training.collect import StrategyContext

    strategy = build_strategy({"name": "dataset_reset"})
    rows = [{"prompt": "5+7=", "answer": "12", "solution": "12"}]
    col = collector(rows, None, AnswerEngine(), G=2)
    batch, _ = col.collect(1)
    ctx = StrategyContext(step=0, sample=col._sample_texts, render=col.render, pad_token_id=0)
    with pytest.raises(ValueError, match="continues from token ids"):
        strategy(batch, ctx)


# ------------------------------------------------------------------ S-GRPO serial exits
def test_thinking_length_stops_where_a_multi_token_marker_starts():
    from grouprl.models.tiny import build_char_tokenizer
    from grouprl.training.strategies.base import thinking_length

    tok = build_char_tokenizer("ab12</think>")
    ids = tok("ab</think>12", add_special_tokens=False)["input_ids"]
    assert thinking_length(ids, tok.decode, "</think>") == 2  # "a", "b"; the marker is 8 tokens
    assert thinking_length(ids, tok.decode, "|") == len(ids)  # no marker: all of it
    assert thinking_length(ids, tok.decode, "") == len(ids)
    # a token that holds the marker's first character with text before it is not thinking
    pieces = ["ab", "c</th", "ink>", "1"]
    assert thinking_length([0, 1, 2, 3], lambda t: pieces[t[0]], "</think>") == 1
    assert thinking_length([0, 1, 2, 3], lambda t: pieces[t[0]], "ab") == 0


def test_decay_exit_rewards_by_hand():
    from grouprl.training.strategies.continuation import decay_exit_rewards

    # correct at positions 2, 3 and 5 (early -> late): 1, 1/2, 1/4; wrong ones 0
    assert decay_exit_rewards([False, True, True, False, True]) == [0.0, 1.0, 0.5, 0.0, 0.25]
    assert decay_exit_rewards([False, False]) == [0.0, 0.0]


def test_serial_exit_builds_a_serial_group_from_one_chain(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "s", tiny_model_dir, max_steps=1)
    cfg["rollout"]["max_new_tokens"] = 6
    cfg["rollout"]["strategy"] = {"name": "serial_exit", "exit_text": "=", "think_end": ""}
    cfg["advantage"] = {"name": "grpo", "scale": "none"}
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[coin_reward])
    seen = record_collections(tr)
    res = tr.train()
    tr.close()
    batch, _ = seen[-1]
    G, ro = batch.rollouts.group_size, batch.rollouts
    eq = tr.tokenizer.convert_tokens_to_ids("=")
    from grouprl.training.strategies.continuation import decay_exit_rewards

    n_exits = 0
    for g in range(batch.num_groups):
        rows = list(range(g * G, (g + 1) * G))
        exits = [i for i in rows if batch.extra["exit"][i]]
        full = ro.completion_ids_NT[rows[-1]][ro.attention_mask_NT[rows[-1]].bool()].tolist()
        assert exits == rows[: len(exits)]  # exits first, then the full one
        assert len(exits) >= 1 or len(full) < 2  # a one-token chain has no place to exit
        n_exits += len(exits)
        for i in exits:  # a prefix of the full chain, the exit text (not trained), an answer
            ids = ro.completion_ids_NT[i][ro.attention_mask_NT[i].bool()].tolist()
            loss = ro.loss_mask_NT[i][ro.attention_mask_NT[i].bool()].tolist()
            k = loss.index(0.0)
            assert (
                ids[:k] == full[:k] and ids[k] == eq and loss[k + 1 :] == [1.0] * (len(ids) - k - 1)
            )
        raw = (batch.rewards_NK[rows, 0] >= 1.0).tolist()
        walk = decay_exit_rewards(raw[: len(exits) + 1])
        want = walk + [walk[-1]] * (G - len(exits) - 1)
        assert batch.rewards_N[rows].tolist() == want
    assert n_exits > 0
    assert math.isfinite(res.history[-1]["loss"])


def test_rollouts_sampled_counts_every_generation():
    """Scaf: 3 groups of 3, then level 1 for two prompts (1 each), level 2 for one: 12."""
    rows = [
        {"prompt": "5+7=", "answer": "12", "hints": ["7", "12"]},
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "answer": "4", "hints": "5"},
    ]
    col = collector(rows, ScafHints(warmup_steps=0, hint_template=" Hint: {hint}"), AnswerEngine())
    _, metrics = col.collect(3)
    assert metrics["rollouts/sampled"] == 9 + 2 + 1


def test_a_strategy_that_continues_token_ids_needs_an_engine_that_can(
    tmp_path, tiny_model_dir, monkeypatch
):
    from grouprl.rollout.base import ROLLOUT_ENGINES

    class TextOnly:  # generates from text prompts, cannot continue token ids
        reports_sampling_logp = False
        default_mismatch_correction = "none"

        @classmethod
        def from_config(cls, rollout_cfg, model, tokenizer, *, max_prompt_length=None):
            return cls()

        def generate(self, prompts, params):
            raise AssertionError("not reached")

        def update_weights(self, model, *, step):
            pass

        def close(self):
            pass

    monkeypatch.setitem(ROLLOUT_ENGINES._items, "text_only", TextOnly)
    monkeypatch.setitem(ROLLOUT_ENGINES._caps, "text_only", ROLLOUT_ENGINES.capabilities("hf"))
    cfg = base_config(tmp_path / "t", tiny_model_dir)
    cfg["rollout"]["engine"] = "text_only"
    cfg["rollout"]["strategy"] = {"name": "serial_exit"}
    with pytest.raises(ConfigError, match="rollout.strategy: 'serial_exit' continues rollouts"):
        Trainer(cfg, train_dataset=arith_rows())
