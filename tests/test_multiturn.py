"""Multi-turn rollouts with tools: parsing, tools, the sandbox, observation masks, OTC."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from grouprl.config import ConfigError
from grouprl.envs import ToolCall, as_tool, build_environment, call_tool, parse_tool_calls
from grouprl.envs.base import StepResult
from grouprl.envs.builtins import calculator
from grouprl.envs.sandbox import run_python
from grouprl.models.forward import completion_logprobs
from grouprl.models.tiny import build_char_tokenizer, build_tiny_model
from grouprl.rewards.tools import otc_tool_reward, tool_call_format, tool_efficiency
from grouprl.rollout.base import SamplingParams
from grouprl.rollout.hf import HFEngine
from grouprl.rollout.multiturn import ObservationRenderer, run_trajectories


# ------------------------------------------------------------------ parsing
def test_hermes_calls_well_formed_several_and_malformed():
    text = (
        'Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}'
        '</tool_call> and <tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}'
        "</tool_call><tool_call>{name: oops}</tool_call>"
        '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": [1]}'
        '</tool_call> done <tool_call>{"name": "late"'
    )
    p = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in p.calls] == [
        ("calculator", {"expression": "2*3"}),
        ("search", {"q": "x"}),  # arguments sent as a JSON string
    ]
    assert len(p.errors) == 4 and p.attempted == 6
    assert "tool call 3: not valid JSON" in p.errors[0]
    assert "tool call 4: no tool name" in p.errors[1]
    assert "tool call 5 (f): arguments must be a JSON object" in p.errors[2]
    assert "never closed" in p.errors[3]
    assert p.content == "Let me compute.  and  done"
    assert parse_tool_calls("just an answer: 42").attempted == 0


# ------------------------------------------------------------------ tools
def weather(city: str, days: int = 1) -> dict:
    """Forecast for a city.

    Args:
        city: The city's name.
        days: How many days ahead.
    """
    if city == "boom":
        raise RuntimeError("service down")
    if city == "slow":
        time.sleep(5)
    return {"city": city, "days": days}


def test_a_function_becomes_a_tool_with_the_chat_template_schema():
    tool = as_tool(weather, timeout=0.5)
    assert tool.name == "weather"
    params = tool.schema["function"]["parameters"]
    assert params["required"] == ["city"]
    assert params["properties"]["days"] == {
        "type": "integer",
        "description": "How many days ahead.",
    }

    def nodoc(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="tool nodoc: .*docstring"):
        as_tool(nodoc)


def test_every_tool_failure_is_an_error_observation():
    tools = {"weather": as_tool(weather, timeout=0.5)}
    ok = call_tool(tools, ToolCall("weather", {"city": "Oslo", "days": 2}))
    assert ok.ok and json.loads(ok.content) == {"city": "Oslo", "days": 2}
    cases = [
        (ToolCall("nope", {}), "unknown tool 'nope'; tools: weather"),
        (ToolCall("weather", {}), "missing argument(s) city"),
        (ToolCall("weather", {"city": "a", "when": 1}), "unexpected argument(s) when"),
        (ToolCall("weather", {"city": 3}), "argument city must be a JSON string"),
        (ToolCall("weather", {"city": "a", "days": True}), "argument days must be a JSON integer"),
        (ToolCall("weather", {"city": "boom"}), "raised RuntimeError: service down"),
    ]
    for call, why in cases:
        res = call_tool(tools, call)
        assert not res.ok and why in res.content and res.content.startswith("Error:"), res
    t0 = time.perf_counter()
    slow = call_tool(tools, ToolCall("weather", {"city": "slow"}))
    assert not slow.ok and "did not answer within 0.5 s" in slow.content
    assert time.perf_counter() - t0 < 2


def test_calculator():
    assert calculator("(12 + 7) * 3") == "57" and calculator("7/2") == "3.5"
    for bad in ("__import__('os')", "9**9**9", "x + 1"):
        with pytest.raises(ValueError):
            calculator(bad)


# ------------------------------------------------------------------ sandbox
def test_the_sandbox_runs_code_and_blocks_network_writes_and_runaways(tmp_path):
    assert run_python("print(sum(range(10)))").text() == "45"
    assert (
        "socket" in run_python("import socket; socket.create_connection(('127.0.0.1', 9))").text()
    )
    outside = tmp_path / "outside.txt"
    res = run_python(f"open({str(outside)!r}, 'w').write('x')")
    assert not res.ok and "outside the sandbox folder" in res.text() and not outside.exists()
    assert run_python("open('inside.txt', 'w').write('x'); print(open('inside.txt').read())").ok
    for code in ("import subprocess; subprocess.run(['true'])", "import os; os.system('true')"):
        assert "is not allowed" in run_python(code).text()
    t0 = time.perf_counter()
    loop = run_python("while True: pass", timeout=1.0)
    assert loop.timed_out and "time limit" in loop.text() and time.perf_counter() - t0 < 5
    assert "MemoryError" in run_python("x = bytearray(4 * 1024**3)", memory_mb=256).text()


# ------------------------------------------------------------------ trajectories
class Scripted:
    """Answers the first message with an observation, ends at the second."""

    tools: list = []

    def reset(self, row):
        self.n = 0

    def step(self, message):
        self.n += 1
        if self.n == 1:
            return StepResult([{"role": "tool", "content": "7+7"}], info={"calls": 1, "errors": 0})
        return StepResult(None, done=True, reward={"bonus": 0.5})


@pytest.fixture(scope="module")
def tiny_engine():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    return HFEngine(model, tok), model, tok


def _run(engine, tok, env=Scripted, max_new=6, total=60, G=2):
    torch.manual_seed(0)
    prompts = [
        tok("12+5=", add_special_tokens=False)["input_ids"],
        tok("3*4=", add_special_tokens=False)["input_ids"],
    ]
    params = SamplingParams(num_generations=G, temperature=1.0, max_new_tokens=max_new)
    # every turn ends with EOS: the scripted sampler forces it after max_new - 1 tokens
    return run_trajectories(
        ForcedEOS(engine),
        tok,
        prompts,
        [{"prompt": "12+5="}, {"prompt": "3*4="}],
        env,
        params,
        renderer=ObservationRenderer(tok, use_template=False, tools=None),
        eos_ids=engine.eos_ids(),
        max_turns=3,
        max_total_tokens=total,
    )


class ForcedEOS:
    """The real engine's samples, cut to end with EOS (so every turn finishes)."""

    def __init__(self, engine):
        self.engine = engine

    def sample_token_ids(self, contexts, params):
        out = self.engine.sample_token_ids(contexts, params)
        eos = self.engine.eos_ids()[0]
        return [(ids[:3] + [eos], None) for ids, _ in out]


def test_observations_are_context_without_gradient(tiny_engine):
    """[turn 1; obs; turn 2]: attention on everything, loss only on the sampled turns, and
    the log-probs (and gradients) of turn 2 equal those of a single-turn completion whose
    prompt is [prompt; turn 1; obs]."""
    engine, model, tok = tiny_engine
    ro = _run(engine, tok)
    obs = tok("<tool_response>\n7+7\n</tool_response>\n", add_special_tokens=False)["input_ids"]
    assert ro.num_rollouts == 4 and ro.group_size == 2
    for n in range(4):
        m = ro.meta[n]
        assert [t["kind"] for t in m["turns"]] == ["model", "obs", "model"]
        assert m["env_reward"] == {"bonus": 0.5} and m["group"] == n // 2
        o = m["turns"][1]
        ids = ro.completion_ids_NT[n]
        assert ids[o["start"] : o["end"]].tolist() == obs
        assert ro.loss_mask_NT[n, o["start"] : o["end"]].sum() == 0
        assert ro.loss_mask_NT[n, : o["start"]].eq(1).all()
        assert ro.attention_mask_NT[n, : m["turns"][2]["end"]].eq(1).all()
        assert [x["role"] for x in m["messages"]] == ["assistant", "tool", "assistant"]
    # naive: turn 2 as a completion of [prompt; turn 1; obs]
    model.zero_grad()
    logp = completion_logprobs(
        model, ro.prompt_ids_NP, ro.prompt_mask_NP, ro.completion_ids_NT, ro.attention_mask_NT
    )[0]
    (logp * ro.loss_mask_NT).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for n in range(4):
        t1, o, t2 = ro.meta[n]["turns"]
        prompt = ro.prompt_ids_NP[n][ro.prompt_mask_NP[n].bool()]
        comp = ro.completion_ids_NT[n]
        for start, end, ctx in (
            (t1["start"], t1["end"], prompt),
            (t2["start"], t2["end"], torch.cat([prompt, comp[: t2["start"]]])),
        ):
            lp = completion_logprobs(
                model,
                ctx[None],
                torch.ones(1, len(ctx)),
                comp[None, start:end],
                torch.ones(1, end - start),
            )[0]
            total = total + lp.sum()
            if start == t2["start"]:
                assert torch.allclose(lp[0], logp[n, start:end], atol=1e-5)
    total.backward()
    for a, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_budgets_end_trajectories(tiny_engine):
    engine, model, tok = tiny_engine
    ro = _run(engine, tok, total=12)  # turn 1 (4 tokens) + the observation (37) > 12
    for m in ro.meta:
        assert [t["kind"] for t in m["turns"]] == ["model"]
    assert ro.truncated_N.all() and ro.completion_ids_NT.shape[1] == 4


def test_tool_environment_runs_calls_and_reports_errors():
    factory = build_environment({"name": "tools", "tools": ["calculator"], "timeout": 1.0})
    env = factory()
    env.reset({"prompt": "x"})
    res = env.step(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
        "<tool_call>broken</tool_call>"
    )
    assert not res.done
    assert [m["content"] for m in res.observation][0].startswith("Error: tool call 3")
    assert res.observation[1]["content"] == "42"
    assert "ZeroDivisionError" in res.observation[2]["content"]
    assert res.info == {"calls": 2, "malformed": 1, "errors": 2, "tools": ["calculator"] * 2}
    assert env.step("42").done
    with pytest.raises(ConfigError, match="data.environment.tools.0: unknown tool 'calc'"):
        build_environment({"name": "tools", "tools": ["calc"]})
    with pytest.raises(ConfigError, match="data.environment.*has no parameter 'tool'"):
        build_environment({"name": "tools", "tool": ["calculator"]})


def test_observation_rendering_through_a_chat_template():
    tok = build_char_tokenizer()
    tok.eos_token = "<eos>"
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}<u><tool_response>{{ m.content }}"
        "</tool_response><eos>\n{% else %}<{{ m.role[0] }}>{{ m.content }}<eos>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    r = ObservationRenderer(tok, use_template=True, tools=None)
    # the model's turn ended with <eos>; the template's "\n" after it is kept
    assert r.text([{"role": "tool", "content": "42"}]) == (
        "\n<u><tool_response>42</tool_response><eos>\n<a>"
    )


# ------------------------------------------------------------------ rewards
def test_otc_reward_on_hand_computed_values():
    assert otc_tool_reward(0, 0) == 1.0
    assert otc_tool_reward(1, 0) == pytest.approx(math.cos(math.pi / 3))  # 0.5
    assert otc_tool_reward(2, 0) == pytest.approx(math.cos(2 * math.pi / 5))
    assert otc_tool_reward(1, 1) == pytest.approx(1.0)  # the fewest calls: full reward
    assert otc_tool_reward(0, 1) == pytest.approx(0.0)  # no call where one was needed
    assert otc_tool_reward(2, 1) == pytest.approx(math.sin(4 / 3 * math.pi / 2))  # f = 4/3
    traj = [
        {"messages": [{"role": "assistant", "content": "12"}], "tool_calls": 1, "group": 0},
        {"messages": [{"role": "assistant", "content": "12"}], "tool_calls": 3, "group": 0},
        {"messages": [{"role": "assistant", "content": "13"}], "tool_calls": 1, "group": 0},
        {"messages": [{"role": "assistant", "content": "7"}], "tool_calls": 2, "group": 1},
    ]
    r = tool_efficiency([""] * 4, [""] * 4, answer=["12", "12", "12", "8"], trajectory=traj)
    # group 0: n = 1; m = 1 -> 1, m = 3 -> sin((6/4) * pi/2); wrong -> 0; group 1: none correct
    assert r == pytest.approx([1.0, math.sin(1.5 * math.pi / 2), 0.0, 0.0])
    assert tool_efficiency(["a"], ["b"], answer=["b"]) == [None]  # single-turn: no trajectory
    fmt = tool_call_format(
        [""] * 3,
        [""] * 3,
        trajectory=[
            {"tool_calls": 2, "tool_malformed": 1, "tool_errors": 2},
            {"tool_calls": 0, "tool_malformed": 0, "tool_errors": 0},
            {"tool_calls": 1, "tool_malformed": 0, "tool_errors": 0},
        ],
    )
    assert fmt == pytest.approx([1 / 3, 1.0, 1.0])


# ------------------------------------------------------------------ the trainer
def test_training_with_an_environment(tmp_path, tiny_model_dir, monkeypatch):
    """A run with data.environment: every first turn gets an observation (a registered test
    environment), which the model reads and is not trained on; the trajectory metrics and the
    `trajectory` reward column are there."""
    from conftest import arith_rows, base_config

    from grouprl.envs.base import ENVIRONMENTS
    from grouprl.registry import Capabilities
    from grouprl.training.trainer import Trainer

    # registered for this test only: the registry is global (docs tables read it)
    monkeypatch.setitem(ENVIRONMENTS._items, "test_scripted", Scripted)
    monkeypatch.setitem(ENVIRONMENTS._caps, "test_scripted", Capabilities())
    seen = {}

    def turns(completions, trajectory, **kw):
        seen["trajectory"] = trajectory
        return [float(t["num_turns"]) for t in trajectory]

    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=2)
    cfg["data"] = {"environment": {"name": "test_scripted"}}
    cfg["rollout"].update(max_turns=2, max_total_tokens=64)
    batches = []
    rewards = [{"fn": turns, "timeout": 0}, "tool_efficiency"]  # in-process: `seen` fills
    with Trainer(cfg, train_dataset=arith_rows(), reward_funcs=rewards) as tr:
        update = tr.learner.update

        def keep(train_batch, *, step):
            batches.append(train_batch.rollouts)
            return update(train_batch, step=step)

        tr.learner.update = keep
        tr.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("turns/mean", "tools/calls_mean", "completions/trained_tokens_mean"):
        assert key in lines[-1], key
    ro = batches[-1]
    two = [n for n, m in enumerate(ro.meta) if m["num_turns"] == 2]
    assert two, "some trajectory took the second turn"
    for n in two:
        o = ro.meta[n]["turns"][1]
        assert ro.loss_mask_NT[n, o["start"] : o["end"]].sum() == 0
        assert ro.attention_mask_NT[n, o["start"] : o["end"]].eq(1).all()
    assert len(seen["trajectory"]) == ro.num_rollouts
    assert lines[-1]["rewards/turns/mean"] > 1.0


# ------------------------------------------------------------------ the tools task, SFT traces
def test_tools_task_traces_call_the_calculator_and_mask_the_response():
    from grouprl.data.tasks import get_task
    from grouprl.training.sft import encode_traces

    task = get_task("tools")
    kinds = {r["kind"] for r in task.train_rows}
    assert kinds == {"hard", "easy"} and task.environment["name"] == "tools"
    held = {r["prompt"] for r in task.eval_rows}
    assert not held & {r["prompt"] for r in task.train_rows}
    prompts, traces = task.sft_data(0)
    env = build_environment(task.environment)()
    direct = 0
    for p, tr, row in zip(prompts, traces, task.train_rows, strict=True):
        assert p == row["prompt"]
        if isinstance(tr, str):  # an easy problem answered without the tool
            assert row["kind"] == "easy" and tr == row["answer"]
            direct += 1
            continue
        call, response, answer = tr
        env.reset(row)
        obs = env.step(call[0].removesuffix("<eos>")).observation
        assert obs[0]["content"] == row["answer"] == answer[0]  # the call computes the answer
        assert (call[1], response[1], answer[1]) == (True, False, True)
    assert 0 < direct < sum(r["kind"] == "easy" for r in task.train_rows)
    tok = task.build_tokenizer()
    _, _, ids, attn, loss = encode_traces(tok, prompts[:1], [traces[0]])
    text = tok.decode(ids[0][attn[0].bool()])
    resp = tok(traces[0][1][0], add_special_tokens=False)["input_ids"]
    start = len(tok(traces[0][0][0], add_special_tokens=False)["input_ids"])
    assert ids[0, start : start + len(resp)].tolist() == resp and "<tool_response>" in text
    assert loss[0, start : start + len(resp)].sum() == 0
    assert (
        loss[0, :start].eq(1).all()
        and loss[0, start + len(resp) :][attn[0, start + len(resp) :].bool()].eq(1).all()
    )


def test_one_long_trajectory_does_not_shorten_the_others_turns(tiny_engine):
    """Budgets are per trajectory: a trajectory near max_total_tokens is cut at its own
    room, while the others still get max_new_tokens for their turn."""
    engine, model, tok = tiny_engine

    class LongFirst:
        tools: list = []

        def reset(self, row):
            self.row, self.n = row, 0

        def step(self, message):
            self.n += 1
            if self.n > 1:
                return StepResult(None, done=True)
            size = 24 if self.row["prompt"] == "12+5=" else 2  # a long observation for one
            return StepResult([{"role": "tool", "content": "7" * size}])

    ro = _run(engine, tok, env=LongFirst, total=64, max_new=6)
    short = [m for n, m in enumerate(ro.meta) if n >= 2]  # the "3*4=" trajectories
    long = [m for n, m in enumerate(ro.meta) if n < 2]
    for m in short:  # ForcedEOS gives 4-token turns: the second one was not cut to 1 token
        assert [t["end"] - t["start"] for t in m["turns"] if t["kind"] == "model"] == [4, 4]
    for n, m in enumerate(long):  # 4 + 58 observation tokens: 2 left for its second turn
        assert [t["end"] - t["start"] for t in m["turns"]] == [4, 58, 2]
        assert ro.truncated_N[n]


# ------------------------------------------------------------------ Flow-GRPO
def test_flow_grpo_normalizes_over_turns_on_a_hand_computed_example():
    from grouprl.algorithms.advantages import flow_grpo, grpo

    r = torch.tensor([[1.0, 0.0, 0.0]])
    k = torch.tensor([[2.0, 1.0, 1.0]])
    # turn samples: 1, 1, 0, 0 -> mu = 0.5, sigma^2 = (4 * 0.25) / 3 = 1/3
    sigma = math.sqrt(1 / 3)
    want = torch.tensor([[0.5 / sigma, -0.5 / sigma, -0.5 / sigma]])
    assert torch.allclose(flow_grpo(r, k, eps=0.0), want.double().float(), atol=1e-6)
    rr = torch.tensor([[0.2, 0.9, float("nan"), 0.4], [1.0, 1.0, 1.0, 1.0]])
    ones = torch.ones_like(rr)
    assert torch.allclose(flow_grpo(rr, ones), grpo(rr), atol=1e-6)  # K = 1: GRPO
    assert flow_grpo(rr, ones)[1].eq(0).all() and flow_grpo(rr, ones)[0, 2] == 0
