"""Evaluation: pass@k / maj@k metrics and answer extraction."""

from grouprl.eval.metrics import (
    maj_at_k,
    majority_answer,
    mean_ci95,
    pass_at_k,
    summarize_samples,
)
from grouprl.rewards.answers import extract_answer, extract_boxed, normalize_answer

__all__ = [
    "extract_answer",
    "extract_boxed",
    "maj_at_k",
    "majority_answer",
    "mean_ci95",
    "normalize_answer",
    "pass_at_k",
    "summarize_samples",
]
