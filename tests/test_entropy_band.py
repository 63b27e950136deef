"""Hand-computed checks of the entropy-band regularizer (SPINE-style proposal)."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.algorithms import REGULARIZERS
from grouprl.algorithms.entropy_band import EntropyBand
from grouprl.algorithms.types import PolicyInputs


def OldBand(**kw):  # noqa: N802  (the form built before the correction: frozen batch bounds, squared)
    return EntropyBand(**{"bounds": "calibrated", "penalty": "squared", **kw})


def inputs(entropy, mask=None, token_weight=None) -> PolicyInputs:
    zeros = torch.zeros_like(entropy.detach())
    return PolicyInputs(
        logp_NT=zeros,
        old_logp_NT=zeros,
        mask_NT=torch.ones_like(zeros) if mask is None else mask,
        adv_N=torch.zeros(entropy.shape[0], dtype=entropy.dtype),
        entropy_NT=entropy,
        token_weight_NT=token_weight,
    )


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_registered_and_params_checked():
    reg = REGULARIZERS.build("entropy_band", coef=0.02, low=0.3, high=1.5, bounds="fixed")
    assert isinstance(reg, EntropyBand)
    caps = REGULARIZERS.capabilities("entropy_band")
    assert caps.needs_entropy_grad and caps.calibrates and not caps.needs_ref
    assert reg.calibrated and (reg.low, reg.high) == (0.3, 1.5)
    with pytest.raises(ValueError, match="low <= high"):
        OldBand(low=2.0, high=1.0)
    with pytest.raises(ValueError, match="low_pct <= high_pct"):
        OldBand(low_pct=90.0, high_pct=10.0)
    with pytest.raises(ValueError, match="selected, all"):
        OldBand(scope="forking")
    with pytest.raises(ValueError, match="coef"):
        OldBand(coef=-1.0)


def test_value_and_gradient_hand_computed():
    band = OldBand(coef=0.01, low=0.3, high=1.5)
    H = f64([[0.1, 0.5, 2.0]]).requires_grad_(True)
    out = band(inputs(H))
    # 0.1 < 0.3: 0.01·(0.3 − 0.1)² = 0.01·0.04 = 4e-4
    # 0.5 inside [0.3, 1.5]: 0
    # 2.0 > 1.5: 0.01·(2.0 − 1.5)² = 0.01·0.25 = 2.5e-3
    torch.testing.assert_close(out.per_token_NT, f64([[0.01 * 0.04, 0.0, 0.01 * 0.25]]))
    out.per_token_NT.sum().backward()
    # d/dH: −2·0.01·(0.3 − 0.1) = −0.004; 0; 2·0.01·(2.0 − 1.5) = 0.01
    torch.testing.assert_close(H.grad, f64([[-2 * 0.01 * 0.2, 0.0, 2 * 0.01 * 0.5]]))
    # stats: one token below, one above (per-token 0/1), bounds and mean H as scalars
    torch.testing.assert_close(out.stats_NT["entropy_band/below_frac"], f64([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.stats_NT["entropy_band/above_frac"], f64([[0.0, 0.0, 1.0]]))
    assert out.stats["entropy_band/low"] == 0.3 and out.stats["entropy_band/high"] == 1.5
    # (0.1 + 0.5 + 2.0)/3 = 0.8666667; all 3 tokens selected (no token weights)
    assert out.stats["entropy_band/selected_entropy"] == pytest.approx(2.6 / 3)
    assert out.stats["entropy_band/selected_frac"] == 1.0


def test_only_selected_tokens_are_penalized():
    band = OldBand(coef=0.01, low=0.3, high=1.5)
    # row 0: tokens 0 and 2 selected (weight 1 and 2), token 1 weight 0;
    # row 1: token 0 selected, tokens 1-2 padding (entropy NaN there must not leak)
    H = f64([[0.1, 0.0, 2.0], [3.5, math.nan, math.nan]]).requires_grad_(True)
    mask = f64([[1, 1, 1], [1, 0, 0]])
    weight = f64([[1, 0, 2], [1, 0, 0]])
    out = band(inputs(H, mask, weight))
    # token (0,1) has H = 0 < 0.3 but weight 0: no penalty; (1,0): 0.01·(3.5 − 1.5)² = 0.04
    torch.testing.assert_close(out.per_token_NT, f64([[4e-4, 0.0, 2.5e-3], [0.04, 0.0, 0.0]]))
    out.per_token_NT.sum().backward()
    # (1,0): 2·0.01·2.0 = 0.04; unselected and padding: exactly 0, not NaN
    torch.testing.assert_close(H.grad, f64([[-0.004, 0.0, 0.01], [0.04, 0.0, 0.0]]))
    torch.testing.assert_close(out.stats_NT["entropy_band/below_frac"], f64([[1, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(out.stats_NT["entropy_band/above_frac"], f64([[0, 0, 1], [1, 0, 0]]))
    # selected H: 0.1, 2.0, 3.5 -> mean 5.6/3; 3 selected of 4 completion tokens
    assert out.stats["entropy_band/selected_entropy"] == pytest.approx(5.6 / 3)
    assert out.stats["entropy_band/selected_frac"] == pytest.approx(0.75)

    # scope="all": the weight-0 token (0,1) is penalized too: 0.01·0.3² = 9e-4
    out_all = OldBand(coef=0.01, low=0.3, high=1.5, scope="all")(inputs(H, mask, weight))
    torch.testing.assert_close(out_all.per_token_NT, f64([[4e-4, 9e-4, 2.5e-3], [0.04, 0.0, 0.0]]))


def test_percentile_calibration_then_frozen():
    band = OldBand(coef=1.0)  # low_pct 10, high_pct 90
    assert not band.calibrated and band.state_dict() == {"low": None, "high": None}
    # selected H (weight > 0, mask 1): 4, 0, 2, 1, 3 -> sorted 0 1 2 3 4 (n = 5);
    # the weight-0 token (H = 100) and the padding token (H = -50) are left out.
    H = f64([[4.0, 100.0, 0.0, 2.0], [1.0, 3.0, -50.0, 0.0]])
    mask = f64([[1, 1, 1, 1], [1, 1, 0, 0]])
    weight = f64([[1, 0, 1, 1], [1, 1, 0, 0]])
    out = band(inputs(H, mask, weight))
    # 10th percentile: position 0.1·(5 − 1) = 0.4 -> 0 + 0.4·(1 − 0) = 0.4
    # 90th percentile: position 0.9·4 = 3.6 -> 3 + 0.6·(4 − 3) = 3.6
    assert band.low == pytest.approx(0.4) and band.high == pytest.approx(3.6)
    sel = torch.tensor([4.0, 0.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    assert band.low == pytest.approx(float(torch.quantile(sel, 0.1)))
    assert band.high == pytest.approx(float(torch.quantile(sel, 0.9)))
    # penalties with [0.4, 3.6]: H=4 -> 0.4² = 0.16; H=0 -> 0.4² = 0.16; others 0
    torch.testing.assert_close(out.per_token_NT, f64([[0.16, 0, 0.16, 0], [0, 0, 0, 0]]))

    # frozen: a later batch with a very different distribution keeps the bounds
    H2 = f64([[10.0, 20.0, 30.0]])
    out2 = band(inputs(H2))
    assert (band.low, band.high) == (pytest.approx(0.4), pytest.approx(3.6))
    # 10 − 3.6 = 6.4 -> 40.96; 16.4² = 268.96; 26.4² = 696.96
    torch.testing.assert_close(out2.per_token_NT, f64([[40.96, 268.96, 696.96]]))
    assert band.calibrate(H2, torch.ones_like(H2)) == pytest.approx((0.4, 3.6))


def test_calibrate_on_whole_batch_before_micro_batches():
    band = OldBand(coef=1.0, low_pct=0.0, high_pct=100.0)
    whole = f64([[0.0, 1.0], [2.0, 8.0]])
    assert band.needs_calibration  # the trainer's cue to call calibrate on the batch
    assert band.calibrate(whole, torch.ones_like(whole)) == (0.0, 8.0)  # min and max
    assert not band.needs_calibration
    assert not OldBand(low=0.1, high=1.0).needs_calibration  # fixed bounds
    # the first micro-batch alone would give [0, 1]; the calibrated band [0, 8] is used
    out = band(inputs(f64([[0.0, 1.0]])))
    torch.testing.assert_close(out.per_token_NT, f64([[0.0, 0.0]]))
    assert (band.low, band.high) == (0.0, 8.0)


def test_calibration_waits_for_selected_tokens():
    band = OldBand(coef=1.0)
    H = f64([[0.5, 0.7]])
    weight = f64([[0.0, 0.0]])  # nothing selected: nothing to calibrate on
    assert band.calibrate(H, torch.ones_like(H), weight) is None
    out = band(inputs(H, token_weight=weight))
    torch.testing.assert_close(out.per_token_NT, f64([[0.0, 0.0]]))
    assert not band.calibrated and "entropy_band/low" not in out.stats


def test_one_fixed_bound_one_calibrated():
    band = OldBand(coef=1.0, low=0.2, high_pct=50.0)
    H = f64([[1.0, 3.0, 2.0]])
    band.calibrate(H, torch.ones_like(H))
    # low fixed at 0.2; high = median of 1, 2, 3 = 2
    assert (band.low, band.high) == (0.2, 2.0)
    # a calibrated bound that would cross the fixed one is set equal to it:
    # median 2 < fixed low 2.5 -> high = 2.5; 10th percentile 1.2 > fixed high 0.5 -> low = 0.5
    crossing = OldBand(low=2.5, high_pct=50.0)
    crossing.calibrate(H, torch.ones_like(H))
    assert (crossing.low, crossing.high) == (2.5, 2.5)
    crossing = OldBand(high=0.5)
    crossing.calibrate(H, torch.ones_like(H))
    assert (crossing.low, crossing.high) == (0.5, 0.5)


def test_state_round_trip():
    band = OldBand(coef=0.01)
    H = f64([[0.0, 1.0, 2.0, 3.0, 4.0]])
    band.calibrate(H, torch.ones_like(H))
    state = band.state_dict()
    assert state == {"low": pytest.approx(0.4), "high": pytest.approx(3.6)}
    resumed = OldBand(coef=0.01)
    resumed.load_state_dict(state)
    assert resumed.calibrated and resumed.state_dict() == state
    # the resumed band does not recalibrate on its first batch: same values as the original
    H2 = f64([[5.0, 0.1, 2.0]])
    torch.testing.assert_close(resumed(inputs(H2)).per_token_NT, band(inputs(H2)).per_token_NT)
    # a bound fixed in the config keeps its value over a saved one
    fixed = OldBand(low=0.1)
    fixed.load_state_dict(state)
    assert (fixed.low, fixed.high) == (0.1, pytest.approx(3.6))


def test_missing_entropy_raises():
    band = OldBand(low=0.0, high=1.0)
    inp = inputs(f64([[0.5]]))
    inp.entropy_NT = None
    with pytest.raises(ValueError, match="entropy_NT"):
        band(inp)


# ------------------------------------------------------------------ the corrected default
def test_default_is_per_sample_quantiles_with_linear_hinges():
    """Row 0's selected entropies [0, 1, 2, 3, 4]: 10% quantile 0.4, median 2; hinges
    0.4 − 0 = 0.4 below, 3 − 2 = 1 and 4 − 2 = 2 above. Row 1 [1, 1, 1, pad, pad]: band
    [1, 1], no penalty. Gradient: −coef below the band, +coef above."""
    band = EntropyBand(coef=0.5)
    assert (band.bounds, band.penalty, band.high_pct) == ("per_sample_quantile", "hinge", 50.0)
    assert not band.needs_calibration
    H = f64([[0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 9.0, 9.0]]).requires_grad_()
    mask = f64([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = band(inputs(H, mask))
    expected = f64([[0.2, 0.0, 0.0, 0.5, 1.0], [0.0] * 5])
    torch.testing.assert_close(out.per_token_NT.detach(), expected)
    out.per_token_NT.sum().backward()
    torch.testing.assert_close(H.grad, f64([[-0.5, 0, 0, 0.5, 0.5], [0.0] * 5]))
    assert out.stats["entropy_band/low"] == pytest.approx((0.4 + 1.0) / 2)
    assert out.stats["entropy_band/high"] == pytest.approx((2.0 + 1.0) / 2)


def test_per_sample_bounds_use_only_the_selected_tokens_and_split_freely():
    """Bounds of a row come from its forking tokens only; a micro-batch split of rows
    gives the same per-token term (no batch statistic)."""
    H = f64([[5.0, 0.0, 1.0, 2.0], [0.5, 1.5, 2.5, 3.5]])
    weight = f64([[0, 1, 1, 1], [1, 1, 1, 1]])  # row 0's first token is not a forking token
    band = EntropyBand(coef=1.0)
    whole = band(inputs(H, token_weight=weight)).per_token_NT
    # row 0: selected [0, 1, 2] -> low 0.2, median 1: token 0 unselected (0), 0 -> 0.2, 2 -> 1
    torch.testing.assert_close(whole[0], f64([0.0, 0.2, 0.0, 1.0]))
    parts = torch.cat(
        [band(inputs(H[i : i + 1], token_weight=weight[i : i + 1])).per_token_NT for i in range(2)]
    )
    torch.testing.assert_close(parts, whole)


def test_bounds_options_are_checked():
    with pytest.raises(ValueError, match="bounds: fixed"):
        EntropyBand(low=0.1, high=1.0)  # fixed numbers need bounds: fixed
    with pytest.raises(ValueError, match="needs both low and high"):
        EntropyBand(bounds="fixed", low=0.1)
    with pytest.raises(ValueError, match="entropy_band.bounds"):
        EntropyBand(bounds="batch")
    with pytest.raises(ValueError, match="entropy_band.penalty"):
        EntropyBand(penalty="cubic")
    fixed = EntropyBand(bounds="fixed", low=0.5, high=1.0, coef=1.0)
    out = fixed(inputs(f64([[0.0, 0.7, 2.0]])))
    torch.testing.assert_close(out.per_token_NT, f64([[0.5, 0.0, 1.0]]))  # linear hinge


def test_kl_scope_selected_keeps_only_forking_tokens():
    kl_all = REGULARIZERS.build("kl", beta=1.0, estimator="k1")
    kl_sel = REGULARIZERS.build("kl", beta=1.0, estimator="k1", scope="selected")
    logp = f64([[-1.0, -2.0, -3.0]])
    inp = PolicyInputs(
        logp_NT=logp,
        old_logp_NT=logp,
        mask_NT=torch.ones_like(logp),
        adv_N=f64([0.0]),
        ref_logp_NT=f64([[-1.5, -1.5, -1.5]]),
        token_weight_NT=f64([[1.0, 0.0, 2.0]]),
    )
    torch.testing.assert_close(kl_all(inp).per_token_NT, f64([[0.5, -0.5, -1.5]]))
    torch.testing.assert_close(kl_sel(inp).per_token_NT, f64([[0.5, 0.0, -1.5]]))
    no_weights = PolicyInputs(**{**inp.__dict__, "token_weight_NT": None})
    torch.testing.assert_close(kl_sel(no_weights).per_token_NT, f64([[0.5, -0.5, -1.5]]))
    with pytest.raises(ValueError, match="kl.scope"):
        REGULARIZERS.build("kl", scope="forking")
