"""Hand-computed checks of the four loss aggregations with uneven masks."""

from __future__ import annotations

import pytest
import torch

from grouprl.algorithms import AGGREGATIONS
from grouprl.algorithms.types import BatchNorm

VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
# Row lengths 3, 1, 0 (an empty row): masked row sums 1+2+3 = 6, 5, 0 -> total 11.
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
NORM = BatchNorm.of(MASK, max_len=4)  # num_tokens 4, num_seqs 3, max_len 4

EXPECTED = {
    "token_mean": 11 / 4,  # Σ v·m / num_tokens
    "seq_mean_token_mean": (6 / 3 + 5 / 1 + 0) / 3,  # per-row means 2 and 5, empty row 0
    "seq_mean_token_sum_norm": 11 / (4 * 3),  # Σ v·m / (max_len · num_seqs)
    "token_sum": 11.0,
}


def test_names() -> None:
    assert AGGREGATIONS.names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_aggregation_values(name: str) -> None:
    assert NORM == BatchNorm(4.0, 3.0, 4.0)
    out = AGGREGATIONS.get(name)(VALUES, MASK, NORM)
    assert out.dim() == 0
    assert out.item() == pytest.approx(EXPECTED[name])


@pytest.mark.parametrize(
    "name, expected",
    [
        # The same micro-batch inside a larger optimizer batch: 8 tokens, 6 rows, max_len 5.
        ("token_mean", 11 / 8),
        ("seq_mean_token_mean", (2 + 5) / 6),
        ("seq_mean_token_sum_norm", 11 / (5 * 6)),
        ("token_sum", 11.0),
    ],
)
def test_aggregation_uses_whole_batch_norm(name: str, expected: float) -> None:
    out = AGGREGATIONS.get(name)(VALUES, MASK, BatchNorm(8.0, 6.0, 5.0))
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nan_in_padding_does_not_leak(name: str) -> None:
    values = VALUES.clone().requires_grad_(True)
    poisoned = values.where(MASK != 0, torch.nan)
    out = AGGREGATIONS.get(name)(poisoned, MASK, NORM)
    assert out.item() == pytest.approx(EXPECTED[name])
    out.backward()
    assert torch.isfinite(values.grad).all() and (values.grad[MASK == 0] == 0).all()


def test_weighted_mask() -> None:
    # A mask may carry weights (e.g. 2 on some tokens): Σ v·m = 1·2 + (3 + 4) = 9,
    # num_tokens = Σ m = 4; row lengths 2 and 2.
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    norm = BatchNorm.of(mask, max_len=2)
    assert AGGREGATIONS.get("token_mean")(values, mask, norm).item() == pytest.approx(9 / 4)
    # rows: 2/2 = 1 and 7/2 = 3.5 -> (1 + 3.5)/2
    smtm = AGGREGATIONS.get("seq_mean_token_mean")(values, mask, norm)
    assert smtm.item() == pytest.approx(2.25)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_empty_batch_gives_zero(name: str) -> None:
    mask = torch.zeros(2, 3)
    out = AGGREGATIONS.get(name)(torch.ones(2, 3), mask, BatchNorm.of(mask, max_len=3))
    assert out.item() == 0.0
