"""Multi-turn rollouts: the model and an environment take turns until the trajectory ends.

Token in, token out: every token the model sampled is trained exactly as sampled (never
decoded and re-tokenized); an observation (tool results) is rendered through the chat
template into tokens once and appended. A trajectory's completion is then

    [turn 1 (sampled); observation 1; turn 2 (sampled); observation 2; ...; turn K]

with attention mask 1 on every token (the model reads the observations) and loss mask 1 on
the sampled turns only, so observations get no gradient: the log-probs of turn k are those
of a single-turn completion whose prompt is [prompt; turn 1; obs 1; ...; obs k-1]
(tests/test_multiturn.py). The first turn samples the G trajectories of a prompt together,
so they share its prefix (the shared decoder, and shared-prefix training, apply to it).

A trajectory ends when the environment says done, when a turn ends without EOS (its
`max_new_tokens` ran out: truncated), at `max_turns` model turns, or when the next turn or
observation would pass `max_total_tokens` completion tokens (truncated). `Rollouts.meta`
keeps per row: the messages (assistant and tool), each turn's span and the environment's
info, the tool calls made and failed, and the reward pieces the environment gave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from grouprl.rollout.base import Rollouts, SamplingParams, rollouts_from_rows

if TYPE_CHECKING:  # an environment is only called here (envs/ never imports rollout/)
    from grouprl.envs.base import Environment


class TurnSampler(Protocol):
    """What a multi-turn rollout needs from an engine (engines declare `multi_turn`)."""

    def sample_token_ids(
        self, contexts: list[list[int]], params: SamplingParams
    ) -> list[tuple[list[int], list[float] | None]]: ...


class ObservationRenderer:
    """Observation messages -> the tokens that follow the model's turn.

    With a chat template: the text the template puts after an assistant message and before
    the next generation (e.g. Qwen's `<|im_end|>\\n<|im_start|>user\\n<tool_response>
    ...</tool_response><|im_end|>\\n<|im_start|>assistant\\n`), found as the difference of
    two renderings of a stand-in conversation, so it never depends on how the template
    would re-render the model's own message. The model's turn already ends with its EOS
    token; what the template puts between that EOS and the observation is kept. Without a
    template: `<tool_response>\\n...\\n</tool_response>\\n` per message.
    """

    _BASE = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})

    def __init__(self, tokenizer: Any, *, use_template: bool, tools: list[dict] | None) -> None:
        self.tokenizer = tokenizer
        self.use_template = use_template and bool(getattr(tokenizer, "chat_template", None))
        self.tools = tools or None
        self._before = self._between = ""
        if self.use_template:  # the stand-in conversation, rendered once
            self._before = tokenizer.apply_chat_template(
                list(self._BASE), tools=self.tools, tokenize=False
            )
            end = self._before.rindex("a") + 1  # the stand-in assistant content ends here
            between = self._before[end:]  # e.g. "<|im_end|>\n": the EOS, then what follows
            eos = tokenizer.eos_token or ""
            self._between = between[len(eos) :] if eos and between.startswith(eos) else between

    def text(self, messages: list[dict[str, Any]]) -> str:
        if not self.use_template:
            return "".join(f"<tool_response>\n{m['content']}\n</tool_response>\n" for m in messages)
        after = self.tokenizer.apply_chat_template(
            [*self._BASE, *messages], tools=self.tools, tokenize=False, add_generation_prompt=True
        )
        if not after.startswith(self._before):
            raise ValueError(
                "the chat template renders a conversation differently once tool messages "
                "follow it; cannot find the observation's text"
            )
        return self._between + after[len(self._before) :]

    def ids(self, messages: list[dict[str, Any]]) -> list[int]:
        return list(self.tokenizer(self.text(messages), add_special_tokens=False)["input_ids"])


@dataclass
class _Trajectory:
    prompt: list[int]
    env: Environment
    ids: list[int] = field(default_factory=list)
    loss: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    reward: dict[str, float] = field(default_factory=dict)
    done: bool = False
    truncated: bool = False

    def add(self, ids: list[int], *, sampled: bool, logp: list[float] | None = None) -> None:
        self.ids += ids
        self.loss += [int(sampled)] * len(ids)
        self.logp += logp if logp is not None else [0.0] * len(ids)


def run_trajectories(
    sampler: TurnSampler,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    rows: list[dict[str, Any]],
    env_factory: Callable[[], Environment],
    params: SamplingParams,
    *,
    renderer: ObservationRenderer,
    eos_ids: list[int],
    max_turns: int,
    max_total_tokens: int,
    reports_logp: bool = False,
) -> Rollouts:
    """B prompts x G trajectories (rows of a prompt contiguous), as one Rollouts."""
    G = params.num_generations
    trajs: list[_Trajectory] = []
    for p, row in zip(prompt_ids, rows, strict=True):
        for _ in range(G):
            env = env_factory()
            env.reset(row)
            trajs.append(_Trajectory(list(p), env))
    eos = set(eos_ids)
    for turn in range(max_turns):
        live = [t for t in trajs if not t.done]
        if not live:
            break
        # as many new tokens as the trajectory with the most room left may take; each is then
        # cut to its own room (a trajectory cut there is truncated)
        budget = max_total_tokens - min(len(t.ids) for t in live)
        step = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, budget)))
        if turn == 0:  # the G trajectories of a prompt share its prefix: sample them together
            samples = sampler.sample_token_ids(prompt_ids, step)
        else:
            ctx = [t.prompt + t.ids for t in live]
            samples = sampler.sample_token_ids(ctx, replace(step, num_generations=1))
        for t, (ids, lp) in zip(live, samples, strict=True):
            start = len(t.ids)
            room = max_total_tokens - start
            ids, lp = ids[:room], (lp[:room] if lp is not None else None)
            t.add(ids, sampled=True, logp=lp)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            t.messages.append({"role": "assistant", "content": text})
            span = {"start": start, "end": len(t.ids), "kind": "model"}
            if not ids or ids[-1] not in eos:  # ran out of tokens mid-turn
                t.truncated = t.done = True
                t.turns.append(span)
                continue
            res = t.env.step(text)
            span["info"] = res.info
            t.turns.append(span)
            for k, v in res.reward.items():
                t.reward[k] = t.reward.get(k, 0.0) + float(v)
            if res.done or not res.observation:
                t.done = True
                continue
            obs = renderer.ids(res.observation)
            if len(t.ids) + len(obs) >= max_total_tokens:  # no room left to answer it
                t.truncated = t.done = True
                continue
            t.turns.append({"start": len(t.ids), "end": len(t.ids) + len(obs), "kind": "obs"})
            t.add(obs, sampled=False)
            t.messages.extend(res.observation)
    return _rollouts(trajs, tokenizer, G, reports_logp)


def _rollouts(trajs: list[_Trajectory], tokenizer: Any, G: int, reports_logp: bool) -> Rollouts:
    meta = []
    for n, t in enumerate(trajs):
        infos = [x.get("info", {}) for x in t.turns if x["kind"] == "model"]
        meta.append(
            {
                "messages": t.messages,
                "turns": t.turns,
                "num_turns": len(infos),
                "tool_calls": sum(int(i.get("calls", 0)) for i in infos),
                "tool_malformed": sum(int(i.get("malformed", 0)) for i in infos),
                "tool_errors": sum(int(i.get("errors", 0)) for i in infos),
                "env_reward": dict(t.reward),
                "group": n // G,
            }
        )
    return rollouts_from_rows(
        [t.prompt for t in trajs],
        [t.ids for t in trajs],
        texts=[tokenizer.decode(t.ids, skip_special_tokens=True) for t in trajs],
        group_size=G,
        pad_token_id=tokenizer.pad_token_id,
        truncated=[t.truncated for t in trajs],
        loss_masks=[t.loss for t in trajs],
        logps=[t.logp for t in trajs] if reports_logp else None,
        meta=meta,
    )


@dataclass
class MultiTurn:
    """`data.environment` as the collector uses it: a fresh environment per trajectory, the
    observation renderer, the budgets (`rollout.max_turns`, `rollout.max_total_tokens`)."""

    env_factory: Callable[[], Environment]
    renderer: ObservationRenderer
    max_turns: int
    max_total_tokens: int

    def generate(self, engine: Any, examples: list[Any], params: SamplingParams) -> Rollouts:
        """Trajectories for prompt examples (`.text`, the model's prompt; `.prompt` and
        `.columns`, the row each environment is reset with)."""
        tok = engine.tokenizer
        texts = [ex.text for ex in examples]
        rows = [{"prompt": ex.prompt, **ex.columns} for ex in examples]
        prompt_ids = [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
        return run_trajectories(
            engine,
            tok,
            prompt_ids,
            rows,
            self.env_factory,
            params,
            renderer=self.renderer,
            eos_ids=engine.eos_ids(),
            max_turns=self.max_turns,
            max_total_tokens=self.max_total_tokens or self.max_turns * params.max_new_tokens,
            reports_logp=bool(engine.reports_sampling_logp),
        )
