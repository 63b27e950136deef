"""Prompt datasets: loading, validation and chat templates."""

from grouprl.data.datasets import DataError, PromptDataset, PromptExample, load_prompts

__all__ = ["DataError", "PromptDataset", "PromptExample", "load_prompts"]
