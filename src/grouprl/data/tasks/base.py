"""The task interface: rows for a split plus the rewards that score them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from grouprl.registry import Registry


class TaskFactory(Protocol):
    def __call__(self, **params: Any) -> Task: ...


@dataclass
class Task:
    """A generated dataset: `rows(split)` gives dicts with a `prompt` and gold columns."""

    name: str
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    rewards: list[Any] = field(default_factory=list)  # reward specs that score it
    correct_reward: str = ""  # the reward whose value 1 means "correct"
    chars: str = ""  # characters a char tokenizer needs to cover the task
    tokenizer_factory: Callable[[], Any] | None = None  # default: a char tokenizer over `chars`
    # (seed) -> (prompts, completions) for the SFT warm start; default: (prompt, answer)
    sft_pairs: Callable[[int], tuple[list[str], list[str]]] | None = None
    eval_rewards: list[Any] = field(
        default_factory=list
    )  # what evaluation reports (default: rewards)
    # the `data.environment` its problems are meant for (multi-turn: tools), or None
    environment: dict[str, Any] | None = None

    def sft_data(self, seed: int) -> tuple[list[str], list[Any]]:
        if self.sft_pairs is not None:
            return self.sft_pairs(seed)
        return [r["prompt"] for r in self.train_rows], [str(r["answer"]) for r in self.train_rows]

    def build_tokenizer(self) -> Any:
        if self.tokenizer_factory is not None:
            return self.tokenizer_factory()
        from grouprl.models.tiny import build_char_tokenizer

        return build_char_tokenizer(self.chars)

    def rows(self, split: str) -> list[dict[str, Any]]:
        if split in ("train",):
            return self.train_rows
        if split in ("eval", "test", "heldout", "held_out"):
            return self.eval_rows
        raise ValueError(f"task {self.name}: unknown split {split!r}; use train or eval")


TASKS: Registry = Registry("task")


def get_task(name: str, **params: Any) -> Task:
    return TASKS.build(name, **params)
