"""Hand-computed checks of the token masks and sample filters in algorithms/selection.py."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.algorithms.selection import (
    SAMPLE_FILTERS,
    TOKEN_MASKS,
    FilterOutput,
    SelectionOutput,
    d3s_samples,
    d3s_tokens,
    dynamic_sampling,
    forking_tokens,
    gtpo_conflict,
    mask_truncated,
    max_variance_subset,
    quantile_linear,
)
from grouprl.inputs import allowed_inputs
from grouprl.registry import BoundComponent, RegistryError, input_params

NAN = float("nan")


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


# ------------------------------------------------------------------------- registries


def test_registered_names_and_inputs() -> None:
    assert TOKEN_MASKS.names() == ["capo", "d3s_tokens", "forking_tokens", "gtpo_conflict"]
    assert SAMPLE_FILTERS.names() == [
        "d3s_samples",
        "dynamic_sampling",
        "mask_truncated",
        "valid_groups",
    ]
    for name in TOKEN_MASKS:
        assert set(input_params(TOKEN_MASKS.get(name))) <= set(allowed_inputs("token_mask")), name
    for name in SAMPLE_FILTERS:
        comp = SAMPLE_FILTERS.get(name)
        assert set(input_params(comp)) <= set(allowed_inputs("sample_filter")), name
    refilling = [n for n in SAMPLE_FILTERS if SAMPLE_FILTERS.capabilities(n).refills]
    assert refilling == ["dynamic_sampling"]


def test_selector_binds_config_and_picks_inputs_by_name() -> None:
    sel = BoundComponent.build(TOKEN_MASKS, "forking_tokens", {"rho": 0.5, "mode": "top_k"})
    assert sel.required_inputs == ["entropy_NT", "mask_NT"]
    inputs = {
        "entropy_NT": torch.tensor([[0.1, 0.9, 0.5, 0.3]]),
        "mask_NT": torch.ones(1, 4),
        "adv_N": torch.ones(1),  # not asked for: ignored
        "step": 0,
    }
    out = sel(inputs)
    # rho 0.5 of 4 tokens -> top 2: 0.9 and 0.5
    close(out.token_weight_NT, [[0.0, 1.0, 1.0, 0.0]])
    with pytest.raises(RegistryError, match="did you mean"):
        BoundComponent.build(TOKEN_MASKS, "forking_tokens", {"rh": 0.5})
    with pytest.raises(RegistryError, match="no parameter 'entropy_NT'"):
        BoundComponent.build(TOKEN_MASKS, "forking_tokens", {"entropy_NT": None})
    with pytest.raises(ValueError, match="missing inputs mask_NT"):
        sel({"entropy_NT": inputs["entropy_NT"]})
    flt = BoundComponent.build(SAMPLE_FILTERS, "dynamic_sampling", {"max_tries": 5})
    assert flt.caps.refills is True
    assert flt({"rewards_BG": torch.tensor([[1.0, 0.0]])}).max_tries == 5


def test_selector_d3s_tokens_optional_adv_inputs() -> None:
    sel = BoundComponent.build(TOKEN_MASKS, "d3s_tokens", {})
    assert sel.required_inputs == ["entropy_NT", "mask_NT", "step", "max_steps"]
    assert "adv_N" in sel.input_names and "adv_NT" in sel.input_names


# ------------------------------------------------------------------------- quantile


def test_quantile_linear_matches_torch_quantile() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 10, 16, 101):
        x = torch.rand(n, generator=g)
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            torch.testing.assert_close(quantile_linear(x, q), torch.quantile(x, q))


def test_quantile_linear_hand_value() -> None:
    # [0, .1, ..., .9] shuffled, q = 0.8: position 0.8·9 = 7.2 -> 0.7 + 0.2·(0.8 − 0.7) = 0.72
    x = torch.tensor([0.5, 0.9, 0.0, 0.3, 0.8, 0.1, 0.7, 0.2, 0.6, 0.4])
    assert float(quantile_linear(x, 0.8)) == pytest.approx(0.72)


# ------------------------------------------------------------------------- forking_tokens


def _ten_token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # 10 completion tokens with entropies 0.0..0.9; the padding holds large entropies (5.0)
    # that must neither move the quantile nor be selected.
    entropy = torch.tensor([[0.5, 0.9, 0.0, 0.3, 0.8, 0.1], [0.7, 0.2, 0.6, 0.4, 5.0, 5.0]])
    mask = torch.tensor([[1.0] * 6, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    return entropy, mask


def test_forking_tokens_quantile_hand() -> None:
    entropy, mask = _ten_token_batch()
    out = forking_tokens(entropy, mask)
    # τ = 0.72 (see test_quantile_linear_hand_value): kept 0.9 (row 0, t1) and 0.8 (row 0, t4)
    close(out.token_weight_NT, [[0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    assert out.denominator == "selected" and out.adv_N is None
    assert out.stats["forking_tokens/threshold"] == pytest.approx(0.72)
    assert out.stats["forking_tokens/kept_frac"] == pytest.approx(0.2)
    # mean entropy of kept tokens: (0.9 + 0.8)/2 = 0.85
    assert out.stats["forking_tokens/kept_entropy_mean"] == pytest.approx(0.85)


def test_forking_tokens_quantile_rho_and_denominator() -> None:
    entropy, mask = _ten_token_batch()
    # rho 0.35: q = 0.65, position 0.65·9 = 5.85 -> 0.5 + 0.85·0.1 = 0.585 -> keep 0.6..0.9 (4)
    out = forking_tokens(entropy, mask, rho=0.35, denominator="all")
    close(out.token_weight_NT, [[0, 1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0]])
    assert out.denominator == "all"
    assert out.stats["forking_tokens/threshold"] == pytest.approx(0.585)
    # rho 1: q = 0 -> τ = min -> every completion token, no padding
    close(forking_tokens(entropy, mask, rho=1.0).token_weight_NT, mask.tolist())


def test_forking_tokens_top_k_hand() -> None:
    entropy, mask = _ten_token_batch()
    # rho 0.25 of 10 tokens: ⌈2.5⌉ = 3 -> 0.9, 0.8, 0.7 (quantile mode would give
    # position 0.75·9 = 6.75 -> τ = 0.675 -> the same three)
    out = forking_tokens(entropy, mask, rho=0.25, mode="top_k")
    close(out.token_weight_NT, [[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]])
    assert out.stats["forking_tokens/threshold"] == pytest.approx(0.7)  # smallest kept
    assert out.stats["forking_tokens/kept_frac"] == pytest.approx(0.3)


def test_forking_tokens_ties() -> None:
    # All 6 completion tokens have entropy 0.4 (padding 0.4 as well).
    entropy = torch.full((2, 4), 0.4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    # quantile: τ = 0.4 and every token has H ≥ τ -> all 6 kept (paper: ties all kept)
    out = forking_tokens(entropy, mask)
    close(out.token_weight_NT, mask.tolist())
    assert out.stats["forking_tokens/kept_frac"] == 1.0
    # top_k: exactly ⌈0.2·6⌉ = ⌈1.2⌉ = 2, ties to the lowest flat indices (row 0, t0 and t1)
    out = forking_tokens(entropy, mask, mode="top_k")
    close(out.token_weight_NT, [[1, 1, 0, 0], [0, 0, 0, 0]])
    # partial tie at the threshold: values [0.1, 0.5, 0.5, 0.5, 0.2]; q = 0.8 position 3.2
    # on sorted [0.1, 0.2, 0.5, 0.5, 0.5] -> τ = 0.5 -> the three 0.5s kept (60% > 20%)
    out = forking_tokens(torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.2]]), torch.ones(1, 5))
    close(out.token_weight_NT, [[0, 1, 1, 1, 0]])


def test_forking_tokens_empty_mask() -> None:
    for mode in ("quantile", "top_k"):
        out = forking_tokens(torch.rand(3, 5), torch.zeros(3, 5), mode=mode)
        assert torch.equal(out.token_weight_NT, torch.zeros(3, 5))
        assert all(math.isfinite(v) for v in out.stats.values())
        assert out.stats["forking_tokens/kept_frac"] == 0.0


def test_forking_tokens_random_batch_keeps_about_rho() -> None:
    g = torch.Generator().manual_seed(1)
    N, T = 16, 64
    lengths = torch.randint(5, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    entropy = torch.rand(N, T, generator=g) * 3
    n = int(mask.sum())
    out = forking_tokens(entropy, mask)
    kept = int(out.token_weight_NT.sum())
    # continuous entropies: the quantile keeps ⌈0.2·n⌉ give or take one token
    assert abs(kept - 0.2 * n) <= 1.0
    assert torch.all(out.token_weight_NT[mask == 0] == 0)
    out = forking_tokens(entropy, mask, mode="top_k")
    assert int(out.token_weight_NT.sum()) == math.ceil(0.2 * n - 1e-9)
    # the kept tokens are the highest: min kept ≥ max dropped (over completion tokens)
    kept_mask = out.token_weight_NT.bool()
    assert entropy[kept_mask].min() >= entropy[(mask == 1) & ~kept_mask].max()


def test_top_k_float_ceiling() -> None:
    # 0.07·100 = 7.000000000000001 in floats: ⌈·⌉ must give 7, not 8
    out = forking_tokens(torch.arange(100.0)[None, :], torch.ones(1, 100), rho=0.07, mode="top_k")
    close(out.token_weight_NT, [[0.0] * 93 + [1.0] * 7])
    # d3s curriculum halfway: r = 0.2 + 0.8·0.5 = 0.6000000000000001; 10 tokens -> 6, not 7
    out = d3s_tokens(torch.arange(10.0)[None, :], torch.ones(1, 10), 1, 3, adv_N=torch.ones(1))
    close(out.token_weight_NT, [[0.0] * 4 + [1.0] * 6])


def test_forking_tokens_rejects_bad_config() -> None:
    e, m = _ten_token_batch()
    with pytest.raises(ValueError, match="rho"):
        forking_tokens(e, m, rho=0.0)
    with pytest.raises(ValueError, match="quantile, top_k"):
        forking_tokens(e, m, mode="topk")
    with pytest.raises(ValueError, match="selected, all"):
        forking_tokens(e, m, denominator="tokens")


# ------------------------------------------------------------------------- d3s_tokens


def test_d3s_tokens_curriculum_hand() -> None:
    adv_N = torch.tensor([1.0, -2.0])
    entropy = torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.03, 0.4]])
    mask = torch.ones(2, 3)
    # score |A|·H: row 0 = [0.5, 0.1, 0.3]; row 1 = 2·[0.2, 0.03, 0.4] = [0.4, 0.06, 0.8]
    # max_steps 3, start 0.5, end 1.0: r = 0.5, 0.75, 1.0 at steps 0, 1, 2
    kw = {"adv_N": adv_N, "max_steps": 3, "start_ratio": 0.5, "end_ratio": 1.0}
    # step 0: ⌈0.5·6⌉ = 3 -> 0.8, 0.5, 0.4
    out = d3s_tokens(entropy, mask, step=0, **kw)
    close(out.token_weight_NT, [[1, 0, 0], [1, 0, 1]])
    assert out.stats["d3s_tokens/keep_ratio"] == 0.5
    assert out.stats["d3s_tokens/threshold"] == pytest.approx(0.4)
    assert out.denominator == "selected"
    # step 1: ⌈0.75·6⌉ = ⌈4.5⌉ = 5 -> all but the smallest score 0.06 (row 1, t1)
    out = d3s_tokens(entropy, mask, step=1, **kw)
    close(out.token_weight_NT, [[1, 1, 1], [1, 0, 1]])
    assert out.stats["d3s_tokens/kept_frac"] == pytest.approx(5 / 6)
    # step 2 (last) and beyond: r = 1 -> everything
    for step in (2, 10):
        close(d3s_tokens(entropy, mask, step=step, **kw).token_weight_NT, [[1, 1, 1], [1, 1, 1]])


def test_d3s_tokens_token_level_adv_and_padding() -> None:
    # adv_NT overrides a per-completion view: scores |A_t|·H_t = [0.9·1, 0.1·3, pad] and
    # [0.5·1, 0·2, pad]; default start_ratio 0.2 at step 0: ⌈0.2·4⌉ = 1 -> only 0.9
    adv_NT = torch.tensor([[0.9, -0.1, 7.0], [0.5, 0.0, 7.0]])
    entropy = torch.tensor([[1.0, 3.0, 9.0], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = d3s_tokens(entropy, mask, step=0, max_steps=100, adv_NT=adv_NT)
    close(out.token_weight_NT, [[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="adv_N or adv_NT"):
        d3s_tokens(entropy, mask, step=0, max_steps=10)


def test_d3s_tokens_empty_mask() -> None:
    out = d3s_tokens(torch.rand(2, 3), torch.zeros(2, 3), 0, 10, adv_N=torch.ones(2))
    assert torch.equal(out.token_weight_NT, torch.zeros(2, 3))
    assert all(math.isfinite(v) for v in out.stats.values())


# ------------------------------------------------------------------------- gtpo_conflict

PAD = 0


def _gtpo_batch() -> dict[str, torch.Tensor]:
    # Group 0 (rows 0-3):
    #   p  (A = +1):   5 6 7 8 9 .      leading run vs n: 5 6; trailing run vs n: 8 9
    #   n  (A = −1):   5 6 1 2 8 9      leading 5 6; trailing (aligned from the end) 8 9
    #   n2 (A = −0.5): 4 6 3 . . .      (1, 6) also sits in p, but n2's first token 4 does
    #                                    not -> no leading run -> all ones
    #   z  (A = 0):    5 6 7 . . .      zero advantage: neither side, all ones
    # Group 1 (rows 4-5), only to check that groups do not mix:
    #   q  (A = −1):   5 6 7 8 9 .      same text as p but in another group -> all ones
    #                                    (if groups mixed, p's leading run would grow)
    #   r  (A = 0):    3 3 . . . .
    ids = torch.tensor(
        [
            [5, 6, 7, 8, 9, PAD],
            [5, 6, 1, 2, 8, 9],
            [4, 6, 3, PAD, PAD, PAD],
            [5, 6, 7, PAD, PAD, PAD],
            [5, 6, 7, 8, 9, PAD],
            [3, 3, PAD, PAD, PAD, PAD],
        ]
    )
    lengths = torch.tensor([5, 6, 3, 3, 5, 2])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    adv = torch.tensor([1.0, -1.0, -0.5, 0.0, -1.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    # per-row constant entropy on completion tokens (padding 9.0 must be ignored)
    h_row = torch.tensor([0.5, 0.9, 0.7, 0.2, 0.3, 0.0])
    entropy = torch.where(mask.bool(), h_row[:, None], torch.tensor(9.0))
    return {
        "completion_ids_NT": ids,
        "mask_NT": mask,
        "adv_N": adv,
        "group_N": group,
        "entropy_NT": entropy,
    }


def test_gtpo_conflict_weights_hand() -> None:
    out = gtpo_conflict(**_gtpo_batch())
    close(
        out.token_weight_NT,
        [
            [2, 2, 1, 2, 2, 0],  # p: conflicts upweighted, middle 7 kept, padding 0
            [0, 0, 1, 1, 0, 0],  # n: conflicts dropped, middle 1 2 kept
            [1, 1, 1, 0, 0, 0],  # n2: raw conflict at t1 outside any run -> 1
            [1, 1, 1, 0, 0, 0],  # z
            [1, 1, 1, 1, 1, 0],  # q (group 1 has no positive completion)
            [1, 1, 0, 0, 0, 0],  # r
        ],
    )
    assert out.denominator == "all"
    # conflict tokens: p 4 + n 4 = 8 of 5+6+3+3+5+2 = 24 completion tokens -> 1/3
    assert out.stats["gtpo/conflict_fraction"] == pytest.approx(8 / 24)


def test_gtpo_conflict_entropy_shaping_hand() -> None:
    out = gtpo_conflict(**_gtpo_batch())
    # H̄ per row = [0.5, 0.9, 0.7, 0.2, 0.3, 0.0] (padding's 9.0 excluded)
    # p:  0.5 ≤ 0.7 -> 1 − 0.1·0.5 = 0.95
    # n:  0.9 > 0.7 -> 0
    # n2: 0.7 ≤ 0.7 (threshold kept) -> −0.5 − 0.07 = −0.57
    # z:  0 − 0.1·0.2 = −0.02 (the code shapes zero-advantage completions too)
    # q:  −1 − 0.03 = −1.03;  r: 0 − 0 = 0
    assert out.adv_N is not None
    close(out.adv_N, [0.95, 0.0, -0.57, -0.02, -1.03, 0.0])
    assert out.stats["gtpo/zeroed_frac"] == pytest.approx(1 / 6)
    # mean of H̄: (0.5+0.9+0.7+0.2+0.3+0)/6 = 2.6/6
    assert out.stats["gtpo/mean_entropy"] == pytest.approx(2.6 / 6)
    # custom threshold / scale: 0.5 threshold zeroes n2 too; scale 1.0: p -> 1 − 0.5 = 0.5
    out = gtpo_conflict(**_gtpo_batch(), entropy_threshold=0.5, entropy_scale=1.0)
    close(out.adv_N, [0.5, 0.0, 0.0, -0.2, -1.3, 0.0])


def test_gtpo_conflict_custom_weight_and_divide_by_conflicts() -> None:
    out = gtpo_conflict(**_gtpo_batch(), conflict_weight=3.0)
    close(out.token_weight_NT[0], [3, 3, 1, 3, 3, 0])
    # official-code normalization: p has 4 conflict tokens -> [2,2,1,2,2]/4;
    # n has 4 -> [0,0,1,1,0,0]/4; rows without conflicts divide by max(1, 0) = 1
    out = gtpo_conflict(**_gtpo_batch(), divide_by_conflicts=True)
    close(out.token_weight_NT[0], [0.5, 0.5, 0.25, 0.5, 0.5, 0])
    close(out.token_weight_NT[1], [0, 0, 0.25, 0.25, 0, 0])
    close(out.token_weight_NT[2], [1, 1, 1, 0, 0, 0])


def test_gtpo_conflict_identical_opposite_pair_g2() -> None:
    # G = 2, identical text with opposite advantages: every token is in both the leading and
    # the trailing run; weight 2 (not the official code's 2·2 = 4) and 0.
    ids = torch.tensor([[7, 8, 9], [7, 8, 9]])
    out = gtpo_conflict(
        ids, torch.ones(2, 3), torch.tensor([0.7, -0.7]), torch.tensor([0, 0]), torch.zeros(2, 3)
    )
    close(out.token_weight_NT, [[2, 2, 2], [0, 0, 0]])
    close(out.adv_N, [0.7, -0.7])  # zero entropy: A − 0.1·0 unchanged
    assert out.stats["gtpo/conflict_fraction"] == 1.0


def test_gtpo_conflict_left_padding_uses_valid_positions() -> None:
    # The same completions as p/n of the hand batch, left-padded: positions are counted over
    # valid tokens, so the result is the right-padded one shifted.
    ids = torch.tensor([[PAD, 5, 6, 7, 8, 9], [5, 6, 1, 2, 8, 9]])
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1], [1.0, 1, 1, 1, 1, 1]])
    out = gtpo_conflict(
        ids, mask, torch.tensor([1.0, -1.0]), torch.tensor([3, 3]), torch.zeros(2, 6)
    )
    close(out.token_weight_NT, [[0, 2, 2, 1, 2, 2], [0, 0, 1, 1, 0, 0]])


def test_gtpo_conflict_empty_mask() -> None:
    out = gtpo_conflict(
        torch.zeros(2, 4, dtype=torch.long),
        torch.zeros(2, 4),
        torch.tensor([1.0, -1.0]),
        torch.tensor([0, 0]),
        torch.rand(2, 4),
    )
    assert torch.equal(out.token_weight_NT, torch.zeros(2, 4))
    close(out.adv_N, [1.0, -1.0])  # H̄ = 0 over no tokens
    assert all(math.isfinite(v) for v in out.stats.values())


# ------------------------------------------------------------------------- dynamic_sampling


def test_dynamic_sampling_hand() -> None:
    rewards = torch.tensor(
        [
            [1.0, 0.0, 1.0],  # mixed -> keep
            [1.0, 1.0, 1.0],  # all equal -> drop
            [NAN, 1.0, 1.0],  # valid rewards all equal -> drop
            [NAN, NAN, NAN],  # no valid reward -> drop
            [NAN, 0.0, 1.0],  # mixed among valid -> keep
            [0.7, 0.7, 0.7],  # all equal (non-binary) -> drop
            [NAN, 0.5, NAN],  # one valid reward -> drop
        ]
    )
    out = dynamic_sampling(rewards)
    assert isinstance(out, FilterOutput)
    assert out.drop_groups_B.tolist() == [False, True, True, True, False, True, True]
    assert (
        out.keep_BG.tolist() == [[True] * 3] + [[False] * 3] * 3 + [[True] * 3] + [[False] * 3] * 2
    )
    assert out.stats == {
        "dynamic_sampling/dropped_groups": 5.0,
        "dynamic_sampling/dropped_frac": 5 / 7,
    }
    assert out.max_tries == 3
    assert dynamic_sampling(rewards, max_tries=7).max_tries == 7


def test_dynamic_sampling_g2_and_g1() -> None:
    out = dynamic_sampling(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert out.drop_groups_B.tolist() == [False, True, True]
    # G = 1: a single valid sample is kept (verl's len == 1 rule), NaN dropped
    out = dynamic_sampling(torch.tensor([[1.0], [0.0], [NAN]]))
    assert out.drop_groups_B.tolist() == [False, False, True]
    with pytest.raises(ValueError, match="max_tries"):
        dynamic_sampling(torch.zeros(1, 2), max_tries=-1)


# ------------------------------------------------------------------------- d3s_samples


def test_max_variance_subset_hand() -> None:
    a = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -3.0])
    # m = 3, k from the top, 3 − k from the bottom (Var = mean(x²) − mean(x)²):
    # k=0 {0, −0.5, −3}:  9.25/3 − (3.5/3)²  = 3.0833 − 1.3611 = 1.7222
    # k=1 {2, −0.5, −3}: 13.25/3 − (−0.5)²   = 4.4167 − 0.25   = 4.1667
    # k=2 {2, 1, −3}:    14/3    − 0²         = 4.6667           <- best
    # k=3 {2, 1, 0.5}:    5.25/3 − (3.5/3)²  = 1.75 − 1.3611   = 0.3889
    assert sorted(max_variance_subset(a, 3).tolist()) == [0, 1, 5]
    # m = 2: always the max and the min
    assert sorted(max_variance_subset(a, 2).tolist()) == [0, 5]
    assert sorted(max_variance_subset(a, 6).tolist()) == [0, 1, 2, 3, 4, 5]


def test_max_variance_subset_matches_brute_force() -> None:
    import itertools

    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        x = torch.randn(7, generator=g)
        for m in (2, 3, 4, 5):
            best = max(
                itertools.combinations(range(7), m),
                key=lambda s: float(x[list(s)].var(unbiased=False)),
            )
            got = max_variance_subset(x, m)
            assert float(x[got].var(unbiased=False)) == pytest.approx(
                float(x[list(best)].var(unbiased=False))
            )


def test_d3s_samples_hand() -> None:
    adv = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -3.0], [0.3, -0.3, 0.1, 0.2, 0.0, 9.0]])
    rewards = torch.tensor([[1.0] * 6, [1.0, 0.0, 1.0, 1.0, 0.0, NAN]])
    out = d3s_samples(adv, rewards)
    # G = 6, keep_frac 0.5 -> m = 3. Group 0: {2, 1, −3} (see test_max_variance_subset_hand)
    # Group 1: the NaN-reward completion (A = 9) is no candidate; among [.3, −.3, .1, .2, 0]:
    #   k=0 {−.3, 0, .1}:  mean −.0667, Var .0333 − .0044 = .0289
    #   k=1 {.3, −.3, 0}:  mean 0,      Var .06
    #   k=2 {.3, .2, −.3}: mean .0667,  Var .0733 − .0044 = .0689   <- best
    #   k=3 {.3, .2, .1}:  mean .2,     Var .0467 − .04   = .0067
    assert out.keep_BG.tolist() == [
        [True, True, False, False, False, True],
        [True, True, False, True, False, False],
    ]
    assert not out.drop_groups_B.any() and out.max_tries == 0
    assert out.stats["d3s_samples/kept_frac"] == pytest.approx(6 / 12)
    # group 0 Var 14/3; group 1 {.3, −.3, .2}: (.09+.09+.04)/3 − (.2/3)² = .0689
    v1 = 0.22 / 3 - (0.2 / 3) ** 2
    assert out.stats["d3s_samples/adv_var_kept"] == pytest.approx((14 / 3 + v1) / 2)


def test_d3s_samples_m_and_small_groups() -> None:
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5]])
    # m = 2 -> max and min
    assert d3s_samples(adv, m=2).keep_BG.tolist() == [[True, True, False, False]]
    # G = 2: m = max(min(2, 2), ⌈0.5·2⌉) = 2 -> both kept
    assert d3s_samples(torch.tensor([[0.7, -0.7]])).keep_BG.tolist() == [[True, True]]
    # all-NaN group: nothing kept, no error
    out = d3s_samples(torch.zeros(1, 3), torch.full((1, 3), NAN))
    assert out.keep_BG.tolist() == [[False, False, False]]
    with pytest.raises(ValueError, match="m must be"):
        d3s_samples(adv, m=0)


# ------------------------------------------------------------------------- mask_truncated


def test_mask_truncated() -> None:
    truncated = torch.tensor([[True, False, False], [False, False, True]])
    out = mask_truncated(truncated)
    assert out.keep_BG.tolist() == [[False, True, True], [True, True, False]]
    assert not out.drop_groups_B.any() and out.max_tries == 0
    assert out.stats == {"mask_truncated/kept_frac": pytest.approx(4 / 6)}


def test_outputs_are_dataclasses() -> None:
    e, m = _ten_token_batch()
    assert isinstance(forking_tokens(e, m), SelectionOutput)
    assert isinstance(mask_truncated(torch.zeros(1, 2, dtype=torch.bool)), FilterOutput)


# ---------------------------------------------------------------------------------------
# CAPO
# ---------------------------------------------------------------------------------------


def test_capo_rejects_the_tokens_of_largest_predicted_step():
    from grouprl.algorithms.selection import capo

    # KL_t = ½·A²·c: row 0 (A = 1): 0.5, 1.0, 2.0; row 1 (A = −2): 2.0·c = 4.0, 0.4, pad
    curv = torch.tensor([[1.0, 2.0, 4.0], [2.0, 0.2, 9.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    # values 0.5, 1, 2, 4, 0.4: the 0.8 quantile (linear) = 2 + 0.2·(4 − 2) = 2.4 -> reject 4
    out = capo(curv, adv, mask, reject_frac=0.2)
    assert out.token_weight_NT.tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    assert out.stats["capo/rejected_frac"] == pytest.approx(1 / 5)
    assert out.denominator == "all"
    # an absolute bound instead: KL > 0.9 rejected
    out = capo(curv, adv, mask, delta=0.9)
    assert out.token_weight_NT.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_head_curvature_is_the_head_gradient_norm():
    """‖∂ log π(o)/∂W_head‖² for a linear head = ‖h‖²·‖onehot − p‖²: checked by autograd."""
    from grouprl.models.head import head_curvature

    torch.manual_seed(0)
    h = torch.randn(3, 5)
    W = torch.randn(7, 5, requires_grad=True)
    targets = torch.tensor([1, 4, 6])
    logits = h @ W.T
    got = head_curvature(logits.detach(), targets, h, 1.0)
    for m in range(3):
        (g,) = torch.autograd.grad(
            torch.log_softmax(logits[m], -1)[targets[m]], W, retain_graph=True
        )
        assert float(got[m]) == pytest.approx(float(g.pow(2).sum()), rel=1e-5)
