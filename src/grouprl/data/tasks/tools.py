"""`tools`: arithmetic where a calculator tool helps on some problems and not on others.

Two kinds of problem, the answer an integer:
- hard: a 2-digit times a 2-digit number ("47*38=") — beyond a tiny model, easy for the
  `calculator` tool;
- easy: a 2-digit number times 1 or 10 ("47*10=") — a tiny model learns to copy the
  digits; a tool call is wasted.

The SFT traces (`sft_pairs`) call the calculator on every hard problem and on half of the
easy ones (a redundant call), so a warm-started model both needs its tool and overuses it:
what OTC's `tool_efficiency` reward is for (fewer calls at the same accuracy). A trace is
`<tool_call>{...}</tool_call><eos>`, the tool response `<tool_response>\\n1786\\n
</tool_response>\\n` (read, not trained), then the answer; an easy problem answered
directly is just the answer. No chat template: tools are not described in the prompt.
"""

from __future__ import annotations

import json
import random
from typing import Any

from grouprl.data.tasks.base import TASKS, Task
from grouprl.models.tiny import DEFAULT_CHARS

ENVIRONMENT = {"name": "tools", "tools": ["calculator"], "timeout": 2.0}


def tool_call_text(expression: str) -> str:
    """The Hermes-format calculator call of a trace."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def response_text(result: str) -> str:
    """A tool response as the multi-turn rollout renders it without a chat template."""
    return f"<tool_response>\n{result}\n</tool_response>\n"


@TASKS.register("tools")
def tools_task(*, hard: int = 400, eval_fraction: float = 0.2, split_seed: int = 1234) -> Task:
    """`hard` 2-digit x 2-digit products and every 2-digit number times 1 or 10 (180);
    `eval_fraction` of each held out."""
    rng = random.Random(split_seed)
    products = [(a, b) for a in range(11, 100) for b in range(11, 100)]
    rng.shuffle(products)
    rows_hard = [
        {"prompt": f"{a}*{b}=", "answer": str(a * b), "kind": "hard"} for a, b in products[:hard]
    ]
    rows_easy = [
        {"prompt": f"{a}*{b}=", "answer": str(a * b), "kind": "easy"}
        for a in range(10, 100)
        for b in (1, 10)
    ]
    train, held = [], []
    for rows in (rows_hard, rows_easy):
        rng.shuffle(rows)
        n_eval = max(1, int(len(rows) * eval_fraction))
        held += rows[:n_eval]
        train += rows[n_eval:]
    rng.shuffle(train)
    rng.shuffle(held)

    def sft_pairs(seed: int) -> tuple[list[str], list[Any]]:
        r = random.Random(seed)
        prompts, traces = [], []
        for row in train:
            prompts.append(row["prompt"])
            if row["kind"] == "easy" and r.random() < 0.5:
                traces.append(row["answer"])  # answered directly
                continue
            expr = row["prompt"].rstrip("=")
            traces.append(
                [
                    (tool_call_text(expr) + "<eos>", True),
                    (response_text(row["answer"]), False),
                    (row["answer"], True),
                ]
            )
        return prompts, traces

    return Task(
        name="tools",
        train_rows=train,
        eval_rows=held,
        # OTC: correct answers with the fewest calls; exact_match (weight 0) is logged
        rewards=[
            {"name": "tool_efficiency", "weight": 1.0},
            {"name": "exact_match", "weight": 0.0},
        ],
        correct_reward="exact_match",
        chars=DEFAULT_CHARS + '"',
        sft_pairs=sft_pairs,
        eval_rewards=[{"name": "exact_match"}, {"name": "tool_efficiency"}],
        environment=ENVIRONMENT,
    )
