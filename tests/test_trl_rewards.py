"""TRL's reward semantics and features: nansum combination (multi-task None), async rewards,
trainer_state, log_metric / log_extra, module:function specs, factories from YAML,
package-relative imports, and the stop when no sample is rewarded. With `trl` installed,
its own reward functions run unchanged."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from conftest import arith_rows, base_config

from grouprl.algorithms.advantages import combine_rewards
from grouprl.components import load_config
from grouprl.rewards import NoRewardError, RewardSet
from grouprl.training.checkpoint import latest_checkpoint
from grouprl.training.trainer import Trainer

NAN = float("nan")


def test_missing_rewards_are_skipped_as_trl_does_and_strict_is_an_option():
    r = torch.tensor([[1.0, NAN], [NAN, 0.5], [NAN, NAN], [2.0, 1.0]])
    w = torch.tensor([1.0, 2.0])
    # skip (TRL's nansum): 1; 2·0.5 = 1; every weighted reward missing -> unscorable; 2 + 2 = 4
    out = combine_rewards(r, w)
    assert out[0] == 1.0 and out[1] == 1.0 and math.isnan(out[2]) and out[3] == 4.0
    strict = combine_rewards(r, w, missing="unscorable")
    assert torch.isnan(strict[:3]).all() and strict[3] == 4.0
    with pytest.raises(ValueError, match="missing must be one of"):
        combine_rewards(r, w, missing="zero")


def math_task(prompts, completions, task, **kw):
    return [
        float(c[:1].isdigit()) if t == "math" else None
        for c, t in zip(completions, task, strict=True)
    ]


def text_task(prompts, completions, task, **kw):
    return [
        float(len(c) > 2) if t == "text" else None for c, t in zip(completions, task, strict=True)
    ]


def test_trls_multi_task_pattern_trains(tmp_path, tiny_model_dir):
    """Each function returns None for the other task's rows (TRL's documented pattern): every
    sample is rewarded by its own task's function, and the run trains on all of them."""
    rows = [{**r, "task": "math" if i % 2 else "text"} for i, r in enumerate(arith_rows())]
    cfg = base_config(tmp_path / "run", tiny_model_dir)
    res = Trainer(cfg, train_dataset=rows, reward_funcs=[math_task, text_task]).train()
    for m in res.history:
        assert not math.isnan(m["reward"])
        assert m["rewards/math_task/nan_count"] > 0 and m["rewards/text_task/nan_count"] > 0


@pytest.mark.parametrize("timeout", [0, 30])  # in this process; in the reward worker
def test_async_rewards_log_metric_log_extra_and_trainer_state(timeout):
    async def slow_len(prompts, completions, log_metric, log_extra, trainer_state, **kw):
        import asyncio

        await asyncio.sleep(0.01)
        log_metric("mine/calls", 1.0)
        log_extra("why", [f"len {len(c)}" for c in completions])
        return [float(len(c)) + trainer_state.global_step for c in completions]

    def plain(completions):  # takes neither **kwargs nor the extras: gets only what it names
        return [1.0 for _ in completions]

    rs = RewardSet([{"fn": slow_len, "timeout": timeout}, {"fn": plain, "timeout": timeout}])
    from grouprl.rewards import TrainerState

    rs.trainer_state = TrainerState(global_step=10, max_steps=20, epoch=0.5)
    try:
        res = rs(["q", "q"], ["ab", "abcd"], {})
    finally:
        rs.close()
    assert res.rewards_NK[:, 0].tolist() == [12.0, 14.0]
    assert res.rewards_NK[:, 1].tolist() == [1.0, 1.0]
    assert res.metrics["mine/calls"] == 1.0
    assert res.extra["why"] == ["len 2", "len 4"]


def test_module_paths_factories_and_package_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "myrewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def score(c):\n    return float(len(c))\n")
    (pkg / "funcs.py").write_text(
        textwrap.dedent(
            """
            from .helpers import score

            BUILT = []

            def length(completions, **kw):
                return [score(c) for c in completions]

            def make_capped(cap):
                BUILT.append(cap)
                def capped(completions, **kw):
                    return [min(score(c), cap) for c in completions]
                return capped
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = RewardSet(
        [
            str(pkg / "funcs.py") + ":length",  # a file inside a package: relative import
            {"path": "myrewards.funcs:length", "alias": "by_module"},  # module:function
            {"factory": "myrewards.funcs:make_capped", "args": {"cap": 3}, "alias": "capped"},
        ]
    )
    try:
        for _ in range(2):
            res = rs(["q", "q"], ["ab", "abcdef"], {})
    finally:
        rs.close()
    assert res.rewards_NK.tolist() == [[2.0, 2.0, 2.0], [6.0, 6.0, 3.0]]
    assert sys.modules["myrewards.funcs"].BUILT == [3]  # the factory ran once
    with pytest.raises(ValueError, match="has no function 'lenght'.*did you mean"):
        RewardSet(["myrewards.funcs:lenght"])
    with pytest.raises(ValueError, match="cannot import module 'nosuch.mod'"):
        RewardSet(["nosuch.mod:f"])


def test_factory_from_yaml_config(tmp_path, monkeypatch):
    (tmp_path / "facts.py").write_text(
        "def make(bonus):\n    return lambda completions, **kw: [bonus] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        {"rewards": [{"factory": "facts.py:make", "args": {"bonus": 0.25}, "weight": 2.0}]}
    )
    rs = RewardSet.from_config(cfg.rewards)
    try:
        assert rs(["q"], ["x"], {}).rewards_NK.tolist() == [[0.25]]
        assert rs.weights_K.tolist() == [2.0]
    finally:
        rs.close()


def never(prompts, completions, **kw):
    return [None] * len(completions)


def broken(prompts, completions, **kw):
    raise RuntimeError("judge unreachable")


def test_a_run_without_any_reward_stops_naming_the_functions(tmp_path, tiny_model_dir):
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=10, nan_reward_steps=3)
    cfg["train"]["reward_failure_limit"] = 1.0  # only the NaN stop can end it
    tr = Trainer(cfg, train_dataset=arith_rows(), reward_funcs=[never, broken])
    with pytest.raises(NoRewardError) as err:
        tr.train()
    msg = str(err.value)
    assert "last 3 steps" in msg and "never: 12 NaN (None)" in msg
    assert "broken: 12 NaN, last error: RuntimeError: judge unreachable" in msg
    assert tr.step == 3 and latest_checkpoint(tmp_path / "run").name == "step_0000003"


def test_trls_own_reward_functions_run_unchanged(tmp_path, tiny_model_dir):
    """trl.rewards' functions from YAML, conversational prompts (their format), the
    soft-overlong factory built once; a short run trains on them."""
    pytest.importorskip("trl")
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "solution": r["answer"]}
        for r in arith_rows()
    ]
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=2)
    cfg["rewards"] = [
        "trl.rewards:accuracy_reward",
        "trl.rewards:think_format_reward",
        {
            "factory": "trl.rewards:get_soft_overlong_punishment",
            "args": {"max_completion_len": 4, "soft_punish_cache": 2},
            "alias": "overlong",
        },
        {"factory": "trl.rewards:get_repetition_penalty_reward", "args": {"ngram_size": 2}},
    ]
    cfg["data"] = {"chat_template": "never"}  # the tiny tokenizer has no chat template
    res = Trainer(cfg, train_dataset=rows).train()
    last = res.history[-1]
    for name in ("accuracy_reward", "think_format_reward", "overlong"):
        assert f"rewards/{name}/mean" in last, name
        assert last[f"rewards/{name}/errors"] == 0, name


def test_async_rewards_run_together_each_under_its_deadline():
    """Two async rewards that each wait 0.3 s finish in about 0.3 s together (TRL runs them
    concurrently); one past its deadline gives a timeout, the others their values."""
    import asyncio
    import time

    async def slow_a(completions, **kw):
        await asyncio.sleep(0.3)
        return [1.0] * len(completions)

    async def slow_b(completions, **kw):
        await asyncio.sleep(0.3)
        return [2.0] * len(completions)

    async def stuck(completions, **kw):
        await asyncio.sleep(5)
        return [3.0] * len(completions)

    rs = RewardSet(
        [{"fn": slow_a}, {"fn": slow_b}, {"fn": stuck, "timeout": 0.5}, {"fn": math_task}]
    )
    try:
        t0 = time.perf_counter()
        res = rs(["q", "q"], ["1", "x"], {"task": ["math", "math"]})
        elapsed = time.perf_counter() - t0
    finally:
        rs.close()
    assert elapsed < 1.0  # one after another: 0.3 + 0.3 + 0.5 = 1.1 s at least
    assert res.rewards_NK[:, 0].tolist() == [1.0, 1.0] and res.rewards_NK[:, 1].tolist() == [
        2.0,
        2.0,
    ]
    assert torch.isnan(res.rewards_NK[:, 2]).all() and res.timeouts["stuck"] == 1
    assert res.rewards_NK[:, 3].tolist() == [1.0, 0.0]
