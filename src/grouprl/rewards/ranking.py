"""Rewards for completions that are ranked lists, one item per line (Rank-GRPO)."""

from __future__ import annotations

from typing import Any

from grouprl.rewards.base import REWARDS, completion_text


def gold_items(gold: Any) -> set[str]:
    """The relevant items of a row: a list, or a string with one item per line."""
    if gold is None:
        return set()
    items = gold if isinstance(gold, (list, tuple)) else str(gold).split("\n")
    return {str(x).strip().casefold() for x in items if str(x).strip()}


def item_relevance(text: str, gold: set[str], top_k: int) -> list[float]:
    """1.0 / 0.0 per line of `text` (its first top_k lines; an empty line is an item that
    is never relevant), padded with 0.0 to top_k as Rank-GRPO's reward functions score
    every rank."""
    lines = text.split("\n")[:top_k]
    rel = [1.0 if line.strip().casefold() in gold else 0.0 for line in lines]
    return rel + [0.0] * (top_k - len(rel))


@REWARDS.register("rank_relevance")
class RankRelevance:
    """Per-item relevance of a ranked list (Rank-GRPO, "Rank-GRPO: Training LLM-based
    Conversational Recommender Systems with Reinforcement Learning", arXiv 2510.20150).

    Items are the completion's lines (the rank_grpo estimator's items: a newline ends an
    item); an item is relevant when it equals (case-folded, trimmed) one of the row's gold
    items (`gold_column`: a list, or one item per line). Logs the per-rank relevance as the
    `item_rel` column (top_k values per completion, 0 past the list's end), which the
    `rank_grpo` estimator reads, and returns the number of relevant items among the first
    top_k (a sequence reward, for metrics and for estimators that use one). Duplicates
    count each time, as the authors' exp_inf reward.
    """

    def __init__(self, *, gold_column: str = "answer", top_k: int = 20) -> None:
        if top_k < 1:
            raise ValueError(f"rewards.rank_relevance.top_k: must be >= 1, got {top_k}")
        self.gold_column, self.top_k = gold_column, int(top_k)
        self.__name__ = "rank_relevance"

    def __call__(
        self, prompts: list, completions: list, log_extra: Any = None, **columns: Any
    ) -> list[float | None]:
        golds = columns.get(self.gold_column)
        if golds is None:
            return [None] * len(completions)
        rel = [
            item_relevance(completion_text(c), gold_items(g), self.top_k)
            for c, g in zip(completions, golds, strict=True)
        ]
        if log_extra is not None:
            log_extra("item_rel", rel)
        return [float(sum(r)) for r in rel]
