"""Hand-computed checks of the advantage catalog (ALGORITHMS.md §1) and its modifiers."""

from __future__ import annotations

import copy
import inspect
import json
import math

import pytest
import torch

from grouprl.algorithms.advantages import (
    ADVANTAGE_MODIFIERS,
    ADVANTAGES,
    RiskPO,
    SingleStream,
    bnpo,
    bnpo_beta_params,
    gdpo,
    ngrpo,
    remax,
    rloo,
    seed,
    semantic_entropy_B,
    xrpo_novelty,
)
from grouprl.registry import RegistryError

NAN = float("nan")
T = torch.tensor
INPUTS = {
    "rewards_BG",
    "rewards_BGK",
    "weights_K",
    "lengths_BG",
    "seq_logp_BG",
    "answers_BG",
    "baseline_B",
    "prompt_keys_B",
    "row_tokens_N",
    "token_scorer",
}


def close(actual: torch.Tensor, expected: list[list[float]], atol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, T(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- registry and conventions


def test_registered_names() -> None:
    for name in ["rloo", "remax", "bnpo", "ngrpo", "gdpo", "riskpo", "single_stream"]:
        assert name in ADVANTAGES
    assert ADVANTAGES.get("riskpo") is RiskPO and ADVANTAGES.get("single_stream") is SingleStream
    assert ADVANTAGE_MODIFIERS.names() == ["seed", "xrpo_novelty"]
    assert ADVANTAGE_MODIFIERS.get("seed") is seed


def _inputs_and_config(obj: object) -> tuple[list[str], list[str]]:
    fn = obj.__call__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    inputs = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    init = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    config = [
        p.name for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    return inputs, config


@pytest.mark.parametrize(
    "name", ["rloo", "remax", "bnpo", "ngrpo", "gdpo", "riskpo", "single_stream"]
)
def test_estimator_inputs_use_the_trainer_names(name: str) -> None:
    inputs, _ = _inputs_and_config(ADVANTAGES.get(name))
    assert inputs and set(inputs) <= INPUTS, inputs


@pytest.mark.parametrize("name", ["seed", "xrpo_novelty"])
def test_modifier_inputs_use_the_trainer_names(name: str) -> None:
    inputs, _ = _inputs_and_config(ADVANTAGE_MODIFIERS.get(name))
    assert inputs[0] == "adv_BG" and set(inputs[1:]) <= INPUTS, inputs


def test_stateful_classes_build_through_the_registry() -> None:
    est = ADVANTAGES.build("riskpo", bundle_size=3, quantile_mode="mix")
    assert isinstance(est, RiskPO) and est.bundle_size == 3
    with pytest.raises(RegistryError, match="bundle_size"):
        ADVANTAGES.build("riskpo", bundel_size=3)
    assert isinstance(ADVANTAGES.build("single_stream", rho=0.5), SingleStream)


# ------------------------------------------------------------------------------- rloo


def test_rloo_hand_computed() -> None:
    # [1, 0, 0, 1]: A_1 = 1 − (0+0+1)/3 = 2/3, A_2 = 0 − (1+0+1)/3 = −2/3
    # [3, NaN, 1, 2]: valid {3, 1, 2}; A = 3 − (1+2)/2 = 1.5, 1 − (3+2)/2 = −1.5, 2 − 2 = 0
    adv = rloo(T([[1.0, 0, 0, 1], [3, NAN, 1, 2]]))
    close(adv, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1.5, 0, -1.5, 0]])


def test_rloo_edges() -> None:
    # G = 2: A_i = r_i − r_j -> [1, 0] gives [1, −1]; one valid reward -> no baseline -> 0
    assert torch.equal(rloo(T([[1.0, 0.0]])), T([[1.0, -1.0]]))
    assert torch.equal(rloo(T([[0.7, NAN, NAN, NAN, NAN]])), torch.zeros(1, 5))
    # all-equal: in float64 the mean of three 0.05 is 0.05000000000000001, so the group must
    # be detected exactly rather than trusted to cancel
    assert torch.equal(rloo(T([[0.05] * 3], dtype=torch.float64)), torch.zeros(1, 3))


# ------------------------------------------------------------------------------ remax


def test_remax_hand_computed_and_edges() -> None:
    # A_i = r_i − r(greedy): [1, 0] − 0.5 = [0.5, −0.5]
    # all-equal [1, 1] with greedy reward 0 -> [1, 1] (baseline is not from the group)
    # [NaN, 0.5] with greedy 0 -> [0, 0.5]; greedy NaN -> whole group 0
    adv = remax(T([[1.0, 0], [1, 1], [NAN, 0.5], [1, 0]]), T([0.5, 0.0, 0.0, NAN]))
    close(adv, [[0.5, -0.5], [1, 1], [0, 0.5], [0, 0]])
    assert torch.equal(remax(T([[0.3, 0.3]]), T([0.3])), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"\[B\]"):
        remax(T([[1.0, 0.0]]), T([0.0, 1.0]))


# ------------------------------------------------------------------------------- bnpo


def test_bnpo_beta_fit_hand_computed() -> None:
    # p = [.25, .25, .75, .75, .5, .5, .5, .5]: m = 0.5, Σ(p−m)² = 4·0.0625 = 0.25,
    # unbiased v = 0.25/7 = 1/28; m(1−m)/v = 0.25·28 = 7, c = 6, a = b = 3 -> α = β = 1 + 3/3 = 2
    assert bnpo_beta_params(T([0.25, 0.25, 0.75, 0.75, 0.5, 0.5, 0.5, 0.5])) == pytest.approx(
        (2.0, 2.0)
    )
    # p = [0.5, 1, 0]: m = .5, v = (0 + .25 + .25)/2 = .25 -> c = .25/.25 − 1 = 0 -> α = β = 1
    assert bnpo_beta_params(T([0.5, 1.0, 0.0])) == (1.0, 1.0)
    # fewer than two groups, or v = 0: undefined fit -> uniform Beta(1, 1)
    assert bnpo_beta_params(T([0.3])) == (1.0, 1.0)
    assert bnpo_beta_params(T([0.5, 0.5])) == (1.0, 1.0)


def test_bnpo_hand_computed() -> None:
    # G = 4, groups with p = .25, .25, .75, .75, .5, .5, .5, .5 -> Beta(2, 2) as above,
    # pdf(p) = 6p(1−p): pdf(.25) = pdf(.75) = 1.125 -> 1/pdf = 8/9; pdf(.5) = 1.5 -> 2/3
    # [1,0,0,0]: (r − .25)·8/9 = [.75, −.25]·8/9 = [2/3, −2/9]
    # [1,1,1,0]: (r − .75)·8/9 = [.25, −.75]·8/9 = [2/9, −2/3]
    # [1,1,0,0]: (r − .5)·2/3 = ±1/3
    # A last group with a single valid reward gets 0 and stays out of the fit (its p = 0
    # would move m and v).
    rows = [[1.0, 0, 0, 0]] * 2 + [[1.0, 1, 1, 0]] * 2 + [[1.0, 1, 0, 0]] * 4
    adv = bnpo(T(rows + [[0.0, NAN, NAN, NAN]]))
    a, b, c = 2 / 3, 2 / 9, 1 / 3
    expected = [[a, -b, -b, -b]] * 2 + [[b, b, b, -a]] * 2 + [[c, c, -c, -c]] * 4
    close(adv, expected + [[0, 0, 0, 0]])
    # max_weight clamps 1/pdf: 8/9 and 2/3 both become 0.5 -> [.75, −.25]·.5 and ±.25
    clamped = bnpo(T(rows), max_weight=0.5)
    close(clamped[[0, 4]], [[0.375, -0.125, -0.125, -0.125], [0.25, 0.25, -0.25, -0.25]])


def test_bnpo_rescales_rewards_and_rejects_out_of_range() -> None:
    # Rewards {0, 10} with reward_max = 10 are the {0, 1} case: a single group -> uniform
    # Beta(1, 1) -> A = r' − p = [1, 0, 0, 0] − .25
    adv = bnpo(T([[10.0, 0, 0, 0]]), reward_max=10.0)
    close(adv, [[0.75, -0.25, -0.25, -0.25]])
    with pytest.raises(ValueError, match="reward_min, reward_max"):
        bnpo(T([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="reward_min < reward_max"):
        bnpo(T([[1.0, 0.0]]), reward_min=1.0, reward_max=1.0)


def test_bnpo_edges() -> None:
    # G = 2: p = [.5, 1, 0] -> α = β = 1 (see the fit test) -> [1, 0] gets ±0.5;
    # the all-equal groups [1, 1] and [0, 0] enter the fit but get exactly 0
    close(bnpo(T([[1.0, 0], [1, 1], [0, 0]])), [[0.5, -0.5], [0, 0], [0, 0]])
    # all-equal [0.05]*3 in float64 (its mean is off by 1e-17): exactly 0, not noise·1/pdf
    flat = bnpo(T([[0.05] * 3, [1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(flat[0], torch.zeros(3))
    # NaN: [1, NaN, 0, 0] has p = 1/3 (one group -> uniform) -> [2/3, 0, −1/3, −1/3];
    # the [1, NaN] group has one valid reward: left out of the fit, A = 0
    adv = bnpo(T([[1.0, NAN, 0, 0], [1.0, NAN, NAN, NAN]]))
    close(adv, [[2 / 3, 0, -1 / 3, -1 / 3], [0, 0, 0, 0]])


# ------------------------------------------------------------------------------ ngrpo


def test_ngrpo_hand_computed() -> None:
    # [0, 0, 0] + virtual 1: μ' = 1/4, Σ dev² = 3/16 + 9/16 = 3/4, var = (3/4)/3 = 1/4,
    #   σ' = 1/2 -> A = −0.25/0.5 = −0.5 each (an all-wrong group still gets a signal)
    # [1, 0, NaN] + virtual 1 -> {1, 0, 1}: μ' = 2/3, Σ dev² = 1/9 + 4/9 + 1/9 = 2/3,
    #   var 1/3, σ' = 0.5773503 -> A = [1/3, −2/3]/0.5773503 = [0.5773503, −1.1547005]
    # [1, 1, 1]: every reward = r_max -> exactly 0
    adv = ngrpo(T([[0.0, 0, 0], [1, 0, NAN], [1, 1, 1]]), eps=0.0)
    s = math.sqrt(1 / 3)
    close(adv, [[-0.5, -0.5, -0.5], [(1 / 3) / s, (-2 / 3) / s, 0], [0, 0, 0]])


def test_ngrpo_k_and_r_max() -> None:
    # k = 2, r_max = 2: [0, 2] + [2, 2] -> μ' = 6/4 = 1.5, devs [−1.5, .5, .5, .5],
    #   Σ dev² = 2.25 + 3·.25 = 3, var = 3/3 = 1 -> A = [−1.5, 0.5]
    close(ngrpo(T([[0.0, 2.0]]), r_max=2.0, num_virtual=2, eps=0.0), [[-1.5, 0.5]])
    with pytest.raises(ValueError, match="r_max"):
        ngrpo(T([[1.5, 0.0]]))
    with pytest.raises(ValueError, match="num_virtual"):
        ngrpo(T([[1.0, 0.0]]), num_virtual=0)


def test_ngrpo_edges() -> None:
    # G = 2: [0, 0] + 1 -> μ' = 1/3, Σ dev² = 2/9 + 4/9, var 1/3 -> A = −(1/3)/0.5773503 each
    # all equal below r_max [0.5, 0.5] + 1 -> μ' = 2/3, Σ dev² = 2/36 + 4/36 = 1/6,
    #   var 1/12, σ' = 0.2886751 -> A = −(1/6)/0.2886751 = −0.5773503 (non-zero, by design)
    # one valid reward -> 0 (with the virtual reward it would be {0, 1} -> −0.7071)
    adv = ngrpo(T([[0.0, 0.0], [0.5, 0.5], [0.0, NAN]]), eps=0.0)
    a = (1 / 3) / math.sqrt(1 / 3)
    close(adv, [[-a, -a], [-a, -a], [0, 0]])


# ------------------------------------------------------------------------------- gdpo


def test_gdpo_hand_computed() -> None:
    # K = 2, w = [1, 2], e = 1e-4.
    # group 1: r1 = [3, 1, 2] (mean 2, std 1) -> z1 = [1, −1, 0]/(1+e); r2 = [0, 0, 0] flat -> 0
    #   S = [1, −1, 0]/(1+e)
    # group 2: r1 = [5, 5, 5] flat -> 0; r2 = [1, 2, 3] (mean 2, std 1) -> z2 = [−1, 0, 1]/(1+e)
    #   S = 2·z2 = [−2, 0, 2]/(1+e)
    # batch: mean 0, Σ S² = (1+1+4+4)/(1+e)² = 10/(1+e)², unbiased std = sqrt(10/5)/(1+e)
    #   -> A = S / (sqrt(2)/(1+e) + e) = [1, −1, 0] / (sqrt(2) + e(1+e)), [−2, 0, 2] / (...)
    r = T([[[3.0, 0], [1, 0], [2, 0]], [[5, 1], [5, 2], [5, 3]]])
    adv = gdpo(r, T([1.0, 2.0]))
    e = 1e-4
    u = 1 / (math.sqrt(2) + e * (1 + e))
    close(adv, [[u, -u, 0], [-2 * u, 0, 2 * u]])


def test_gdpo_keeps_reward_combinations_apart_g2() -> None:
    # G = 2, two binary rewards; the summed rewards (0,1), (0,2), (1,2) all give GRPO ±0.7071.
    # GDPO: each varying reward gives ±c, c = 0.5/(sqrt(.5) + 1e-4);
    #   S = [∓c], [∓2c], [∓c]; batch std = sqrt((2c² + 8c² + 2c²)/5) = c·sqrt(2.4)
    #   -> group 2 gets twice the advantage of groups 1 and 3: ±2/sqrt(2.4) vs ±1/sqrt(2.4)
    r = T([[[0.0, 0], [1, 0]], [[0, 0], [1, 1]], [[1, 0], [1, 1]]])
    adv = gdpo(r)
    c = 0.5 / (math.sqrt(0.5) + 1e-4)
    d = c / (c * math.sqrt(2.4) + 1e-4)
    close(adv, [[-d, d], [-2 * d, 2 * d], [-d, d]])


def test_gdpo_eps_damps_tiny_variance_rewards() -> None:
    # K = 1, G = 2: [1, 0] -> ±0.5/(sqrt(.5) + 1e-4) = ±a; [1e-4, 0] -> ±0.5e-4/(sqrt(.5)·1e-4
    #   + 1e-4) = ±0.5/(sqrt(.5) + 1) = ±b = ±0.2928932: the eps keeps a tiny spread small
    # batch: mean 0, std = sqrt((2a² + 2b²)/3) -> A = ±a/(std + 1e-4), ±b/(std + 1e-4)
    adv = gdpo(T([[[1.0], [0.0]], [[1e-4], [0.0]]], dtype=torch.float64))
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    b = 0.5e-4 / (math.sqrt(0.5) * 1e-4 + 1e-4)
    std = math.sqrt((2 * a * a + 2 * b * b) / 3) + 1e-4
    close(adv, [[a / std, -a / std], [b / std, -b / std]])


def test_gdpo_all_equal_group_is_exactly_zero() -> None:
    # S of [0.1, 0.2, 0.4] sums to 2e-16, not 0, so the batch mean is not exactly 0 and an
    # all-equal group would get −mean/std ≈ 1e-16 unless it is zeroed explicitly
    adv = gdpo(T([[[0.1], [0.2], [0.4]], [[0.3], [0.3], [0.3]]], dtype=torch.float64))
    assert torch.equal(adv[1], torch.zeros(3)) and adv[0, 2] > 0


def test_gdpo_nan_and_all_equal() -> None:
    # K = 2, w = [1, 0]: NaN in the weight-0 reward is ignored; NaN in reward 1 makes the
    # sample unscorable. group 1: r1 = [3, NaN, 1, 2] -> valid {3, 1, 2}, z = [1, ·, −1, 0]/(1+e)
    # group 2: r1 = [4, 4, 4, 4] all equal -> S = 0 (it still enters the batch statistics)
    # batch S over 7 valid samples: mean 0, Σ S² = 2/(1+e)², std = sqrt(2/6)/(1+e)
    #   -> A = ±1/(sqrt(1/3) + e(1+e)); the all-equal group is exactly 0
    r = T([[[3.0, NAN], [NAN, 0], [1, 0], [2, 5]], [[4, 0], [4, NAN], [4, 1], [4, 2]]])
    adv = gdpo(r, T([1.0, 0.0]))
    e = 1e-4
    u = 1 / (math.sqrt(1 / 3) + e * (1 + e))
    close(adv, [[u, 0, -u, 0], [0, 0, 0, 0]])
    assert torch.equal(adv[1], torch.zeros(4))
    with pytest.raises(ValueError, match="nonzero"):
        gdpo(r, T([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"\[B, G, K\]"):
        gdpo(T([[1.0, 0.0]]))


# ------------------------------------------------------------------------------ riskpo

# bundle_size 2, G = 5: papers j = (row0[j], row1[j]) -> S = [1, 0, 2, 1, 2]
RISK_ROWS = [[1.0, 0, 1, 0, 1], [0.0, 0, 1, 1, 1]]
# sorted S = [0, 1, 1, 2, 2]: q_.2 at position 0.8 -> 0.8; q_.8 at position 3.2 -> 2
# std S: mean 1.2, Σ dev² = .04 + 1.44 + .64 + .04 + .64 = 2.8 -> sqrt(2.8/4) = 0.8366600
STD_S = math.sqrt(0.7)


def test_riskpo_hand_computed() -> None:
    # A_R = [(S−.8)+ − (S−2)+ + (.8 − 2)]/.6: S=0 -> −1.2/.6 = −2; S=1 -> −1/.6; S=2 -> 0
    # A_C = −(.8 − S)+/.2: S=0 -> −4; else 0
    # A = (1.5·A_C + A_R)/2.5: S=0 -> −8/2.5 = −3.2; S=1 -> −(1/.6)/2.5 = −2/3; S=2 -> 0
    # ÷ std: every completion of paper j gets A_j
    adv = RiskPO(bundle_size=2, eps=0.0)(T(RISK_ROWS))
    row = [-2 / 3 / STD_S, -3.2 / STD_S, 0, -2 / 3 / STD_S, 0]
    close(adv, [row, row])
    # without the std division
    close(
        RiskPO(bundle_size=2, eps=0.0, norm_by_std=False)(T(RISK_ROWS))[:1],
        [[-2 / 3, -3.2, 0, -2 / 3, 0]],
    )


def test_riskpo_natural_baseline_off_and_w_mix_zero() -> None:
    # natural_baseline=False: A_R = [(S−.8)+ − (S−2)+]/.6: S=0 -> 0, S=1 -> 1/3, S=2 -> 2
    # A = (1.5·A_C + A_R)/2.5: S=0 -> −6/2.5 = −2.4; S=1 -> (1/3)/2.5 = 2/15; S=2 -> 0.8
    adv = RiskPO(bundle_size=2, eps=0.0, natural_baseline=False, norm_by_std=False)(T(RISK_ROWS))
    close(adv[:1], [[2 / 15, -2.4, 0.8, 2 / 15, 0.8]])
    # w_mix = 0: A = A_R only: [−1/.6, −2, 0, −1/.6, 0]
    adv = RiskPO(bundle_size=2, eps=0.0, w_mix=0.0, norm_by_std=False)(T(RISK_ROWS))
    close(adv[:1], [[-1 / 0.6, -2.0, 0, -1 / 0.6, 0]])


def test_riskpo_sum_mean_credit() -> None:
    # prompt means: row0 3/5 = .6, row1 .6 -> ratios row0 [.4, −.6, .4, −.6, .4],
    #   row1 [−.6, −.6, .4, .4, .4]; paper sums [−.2, −1.2, .8, −.2, .8]
    # each completion gets its paper's A_j · ratio / paper sum (papers 2 and 4 have A = 0)
    a0, a1 = -2 / 3 / STD_S, -3.2 / STD_S
    adv = RiskPO(bundle_size=2, eps=0.0, credit="sum_mean")(T(RISK_ROWS))
    close(
        adv,
        [
            [a0 * 0.4 / -0.2, a1 * -0.6 / -1.2, 0, a0 * -0.6 / -0.2, 0],
            [a0 * -0.6 / -0.2, a1 * -0.6 / -1.2, 0, a0 * 0.4 / -0.2, 0],
        ],
    )


def test_riskpo_edges() -> None:
    # NaN: paper 1 of [[1,0,1,0,1],[0,NaN,1,1,1]] is dropped -> S = [1, ·, 2, 1, 2];
    #   sorted [1, 1, 2, 2]: q_.2 = 1 (position .6), q_.8 = 2 (position 2.4)
    #   A_R: S=1 -> (0 − 0 − 1)/.6 = −5/3; S=2 -> 0; A_C = 0 -> A = A_R/2.5 = −2/3, 0
    #   std of [1, 2, 1, 2] = sqrt(1/3) -> −(2/3)/0.5773503 = −1.1547005
    adv = RiskPO(bundle_size=2, eps=0.0)(T([[1.0, 0, 1, 0, 1], [0.0, NAN, 1, 1, 1]]))
    a = -(2 / 3) / math.sqrt(1 / 3)
    close(adv, [[a, 0, 0, a, 0], [a, 0, 0, a, 0]])
    # all-equal paper scores -> exactly 0 (even though each prompt's own rewards vary)
    est = RiskPO(bundle_size=2, quantile_mode="track")
    est(T(RISK_ROWS))  # initializes the tracker
    assert torch.equal(est(T([[1.0, 0.0], [0.0, 1.0]])), torch.zeros(2, 2))
    # G = 2, bundle of one prompt [1, 0]: q_.2 = .2, q_.8 = .8;
    #   S=1: A_R = (.8 − .2 − .6)/.6 = 0, A_C = 0 -> 0;  S=0: A_R = −.6/.6 = −1,
    #   A_C = −.2/.2 = −1 -> A = (−1.5 − 1)/2.5 = −1; std [1, 0] = sqrt(.5) -> −1.4142136
    # the last bundle may be short: B = 3 with bundle_size 2 -> bundles {0, 1}, {2}
    adv = RiskPO(bundle_size=2, eps=0.0)(T([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]))
    close(adv, [[0, 0], [0, 0], [0, -1 / math.sqrt(0.5)]])


def test_riskpo_tracker_and_state_round_trip() -> None:
    est = RiskPO(bundle_size=2, eps=0.0, quantile_mode="track", norm_by_std=False)
    batch = RiskPO(bundle_size=2, eps=0.0, norm_by_std=False)(T(RISK_ROWS))
    # call 1: tracker empty -> batch quantiles; then the tracker starts at (0.8, 2.0)
    assert torch.equal(est(T(RISK_ROWS)), batch)
    assert est.state_dict() == pytest.approx({"q_low": 0.8, "q_high": 2.0})
    # call 2 uses (0.8, 2.0) -> same advantages; then one SGD step:
    #   P(S < .8) = 1/5 -> q_low += .1·(.2 − .2) = 0;  P(S < 2) = 3/5 -> q_high += .1·(.8 − .6)
    close(est(T(RISK_ROWS)), batch.tolist())
    state = est.state_dict()
    assert state == pytest.approx({"q_low": 0.8, "q_high": 2.02})
    # call 3 uses q_high = 2.02: S=2 -> A_R = (1.2 − 0 − 1.22)/.6 = −1/30, A = −1/75
    #   S=1 -> A_R = (.2 − 1.22)/.6 = −1.7, A = −0.68;  S=0 -> (1.5·(−4) − 1.22/.6)/2.5
    resumed = RiskPO(bundle_size=2, eps=0.0, quantile_mode="track", norm_by_std=False)
    resumed.load_state_dict(copy.deepcopy(state))
    out, out_resumed = est(T(RISK_ROWS)), resumed(T(RISK_ROWS))
    assert torch.equal(out, out_resumed) and est.state_dict() == resumed.state_dict()
    s0 = (1.5 * -4 - 1.22 / 0.6) / 2.5
    close(out[:1], [[-0.68, s0, -1 / 75, -0.68, -1 / 75]])
    # mix: mean of the bundle quantiles (0.8, 2.0) and the tracker
    mix = RiskPO(bundle_size=2, eps=0.0, quantile_mode="mix", norm_by_std=False)
    mix.load_state_dict({"q_low": 0.8, "q_high": 2.04})  # -> q = (0.8, 2.02): same as above
    close(mix(T(RISK_ROWS))[:1], [[-0.68, s0, -1 / 75, -0.68, -1 / 75]])
    # then the tracker steps: every S < 2.04 -> q_high += .1·(.8 − 1) = 2.02
    assert mix.state_dict() == pytest.approx({"q_low": 0.8, "q_high": 2.02})


def test_riskpo_rejects_bad_params() -> None:
    with pytest.raises(ValueError, match="alpha < beta"):
        RiskPO(alpha=0.8, beta=0.2)
    with pytest.raises(ValueError, match="quantile_mode"):
        RiskPO(quantile_mode="online")
    with pytest.raises(ValueError, match="bundle_size"):
        RiskPO(bundle_size=0)
    with pytest.raises(ValueError, match="missing"):
        RiskPO().load_state_dict({})


# ----------------------------------------------------------------------- single_stream


def test_single_stream_hand_computed_and_round_trip() -> None:
    # the authors' prior with no offline rollouts: Beta(.5, .5): v̂ = .5; after R = 1 with
    # ρ = .9: α = .9·.5 + 1 = 1.45, β = .9·.5 = .45
    default = SingleStream(normalize=False)
    close(default(T([[1.0]]), ["a"]), [[0.5]])
    assert default.state_dict() == {
        "alpha": {"a": pytest.approx(1.45)},
        "beta": {"a": pytest.approx(0.45)},
        "stored": {},
    }
    est = SingleStream(eps=0.0, prior_alpha=1.0, prior_beta=1.0)
    # call 1: unseen prompts start at Beta(1, 1): v̂ = .5 -> raw A = [.5, −.5];
    #   mean 0, std sqrt(.5/1) = 0.7071068 -> A = ±0.7071068
    close(est(T([[1.0], [0.0]]), ["a", "b"]), [[math.sqrt(0.5)], [-math.sqrt(0.5)]])
    # updates: a: α = .9·1 + 1 = 1.9, β = .9·1 + 0 = .9;  b: α = .9, β = 1.9
    state = est.state_dict()
    assert state == {
        "alpha": pytest.approx({"a": 1.9, "b": 0.9}),
        "beta": pytest.approx({"a": 0.9, "b": 1.9}),
        "stored": {},
    }
    resumed = SingleStream(eps=0.0, prior_alpha=1.0, prior_beta=1.0)
    resumed.load_state_dict(copy.deepcopy(state))
    # call 2: v̂_a = 1.9/2.8 = 0.6785714, v̂_b = .9/2.8 = 0.3214286, v̂_c = .5
    #   raw A = [1 − .6785714, 1 − .3214286, 0 − .5] = [.3214286, .6785714, −.5]
    #   mean 1/6; devs [.1547619, .5119048, −.6666667]; Σ dev² = .7304422; var .3652211;
    #   std .6043352 -> A = [.2560877, .8470593, −1.1031470]
    out = est(T([[1.0], [1.0], [0.0]]), ["a", "b", "c"])
    assert torch.equal(out, resumed(T([[1.0], [1.0], [0.0]]), ["a", "b", "c"]))
    assert est.state_dict() == resumed.state_dict()
    close(out, [[0.2560877], [0.8470593], [-1.1031470]])


def test_single_stream_unnormalized_nan_and_g2() -> None:
    est = SingleStream(normalize=False, prior_alpha=1.0, prior_beta=1.0)
    # raw A = R − v̂ = [1 − .5, NaN -> 0]; the NaN row does not update the tracker
    close(est(T([[1.0], [NAN]]), ["a", "b"]), [[0.5], [0.0]])
    assert set(est.state_dict()["alpha"]) == {"a"}
    # G = 2: both completions use v̂_a = 1.9/2.8 before the update -> [1, 0] − .6785714;
    #   update with ΣR = 1, Σ(1−R) = 1: α = .9·1.9 + 1 = 2.71, β = .9·.9 + 1 = 1.81
    v = 1.9 / 2.8
    close(est(T([[1.0, 0.0]]), ["a"]), [[1 - v, -v]])
    assert est.state_dict()["alpha"]["a"] == pytest.approx(2.71)
    assert est.state_dict()["beta"]["a"] == pytest.approx(1.81)


def test_single_stream_all_equal_and_validation() -> None:
    # three unseen prompts, all R = 0.9: raw A = [.4, .4, .4] all equal (in float64 their mean
    # is off by 1e-17) -> normalized to exactly 0, not noise/eps
    adv = SingleStream()(T([[0.9]] * 3, dtype=torch.float64), ["a", "b", "c"])
    assert torch.equal(adv, torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SingleStream()(T([[2.0]]), ["a"])
    with pytest.raises(ValueError, match="prompt keys"):
        SingleStream()(T([[1.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="rho"):
        SingleStream(rho=0.0)


def test_single_stream_drift_rho_and_offline_prior_by_hand() -> None:
    from grouprl.algorithms.advantages import drift_rho, logprob_drift, offline_prior

    # D = (|−1 − (−1.06)|·1 + |−2 − (−2)|·1 + 9·0) / 2 = 0.03 -> ρ = 2^(−0.5) = 0.7071068
    d = logprob_drift([-1.0, -2.0, -5.0], [-1.06, -2.0, -1.0], [1.0, 1.0, 0.0])
    assert d == pytest.approx(0.03)
    assert drift_rho(d, 0.06, 0.5, 0.96) == pytest.approx(2**-0.5)
    assert drift_rho(0.0, 0.06, 0.5, 0.96) == 0.96  # first visit: no drift -> the cap
    assert drift_rho(1.0, 0.06, 0.5, 0.96) == 0.5  # large drift -> the floor
    # N_init = 1/(1 − .75) = 4; s = 3 of n = 4: α₀ = 4·3.5/5 = 2.8, β₀ = 4·1.5/5 = 1.2
    assert offline_prior(3.0, 4, 0.75) == pytest.approx((2.8, 1.2))


def test_single_stream_logprob_drift_forgets_by_the_stored_completion() -> None:
    """Visit 1 stores prompt a's first completion with its log-probs; visit 2 re-scores it
    (the scorer now returns them shifted by 0.06: D = 0.06, ρ = 0.5) and updates with that ρ."""
    calls = []
    shift = {"now": 0.0}

    def scorer(rows):
        calls.append([list(c) for _, c in rows])
        return [[-1.0 - shift["now"]] * len(c) for _, c in rows]

    est = SingleStream(normalize=False, rho_mode="logprob_drift", rho_min=0.2)
    tokens = [([7, 8], [1, 2], [1.0, 1.0])]
    est(T([[1.0]]), ["a"], row_tokens_N=tokens, token_scorer=scorer)
    # first visit: ρ = rho_max .96: α = .96·.5 + 1 = 1.48, β = .96·.5 = .48
    assert est.alpha["a"] == pytest.approx(1.48) and est.beta["a"] == pytest.approx(0.48)
    assert est.stored["a"] == [[7, 8], [1, 2], [1.0, 1.0], [-1.0, -1.0]]
    shift["now"] = 0.06
    new_tokens = [([7, 8], [3], [1.0])]
    est(T([[0.0]]), ["a"], row_tokens_N=new_tokens, token_scorer=scorer)
    assert calls[-1] == [[1, 2], [3]]  # the stored completion and the new one, one call
    # D = 0.06 -> ρ = 0.5: α = .5·1.48 + 0 = .74, β = .5·.48 + 1 = 1.24
    assert est.alpha["a"] == pytest.approx(0.74) and est.beta["a"] == pytest.approx(1.24)
    assert est.stored["a"][1] == [3] and est.stored["a"][3] == pytest.approx([-1.06])
    again = SingleStream(normalize=False, rho_mode="logprob_drift", rho_min=0.2)
    again.load_state_dict(json.loads(json.dumps(est.state_dict())))
    assert again.state_dict() == est.state_dict()
    with pytest.raises(ValueError, match="rho_mode"):
        SingleStream(rho_mode="kl")
    with pytest.raises(ValueError, match="offline_init"):
        SingleStream(offline_init=-1)


def test_single_stream_offline_start_sets_the_prior() -> None:
    est = SingleStream(normalize=False, rho_min=0.75)
    est.init_offline(["a", "b"], [3.0, 0.0], 4)
    assert est.value("a") == pytest.approx(2.8 / 4.0)  # α₀ = 2.8, β₀ = 1.2
    assert est.value("b") == pytest.approx(0.4 / 4.0)  # α₀ = 4·.5/5 = .4, β₀ = 4·4.5/5 = 3.6


# -------------------------------------------------------------------------------- seed


def test_semantic_entropy_hand_computed() -> None:
    # ℓ = logp/len = [−1, −1, −1, −1]; clusters {'1': 2 members, '2': 1, None: 1}
    #   -> weights ∝ [2e⁻¹, e⁻¹, e⁻¹] -> p = [.5, .25, .25]
    #   SE = .5·ln 2 + 2·.25·ln 4 = .3465736 + .6931472 = 1.0397208
    se = semantic_entropy_B([["1", "1", "2", None]], T([[-2.0, -4, -3, -1]]), T([[2.0, 4, 3, 1]]))
    assert float(se[0]) == pytest.approx(1.0397208)


def test_seed_hand_computed() -> None:
    # SE/log G = 1.0397208/ln 4 = 0.75 -> scale = 1/(1 + 0.0417·0.75) = 0.9696728
    adv = seed(
        T([[1.0, -1, 2, 0]]), [["1", "1", "2", None]], T([[-2.0, -4, -3, -1]]), T([[2.0, 4, 3, 1]])
    )
    s = 1 / (1 + 0.0417 * 0.75)
    close(adv, [[s, -s, 2 * s, 0]])


def test_seed_length_normalization_g2() -> None:
    # G = 2, answers differ; ℓ = [−2/2, −6/3] = [−1, −2] -> p = [1, e⁻¹]/(1 + e⁻¹)
    #   = [.7310586, .2689414]; SE = .7310586·.3132617 + .2689414·1.3132617 = .5822031
    #   α = 1: scale = 1/(1 + .5822031/ln 2) = 1/(1 + .8399437) = .5434948
    adv = seed(T([[0.5, -0.5]]), [["x", "y"]], T([[-2.0, -6.0]]), T([[2.0, 3.0]]), alpha=1.0)
    close(adv, [[0.5 * 0.5434948, -0.5 * 0.5434948]])


def test_seed_edges() -> None:
    # one cluster -> SE = 0 -> unchanged; all different with equal ℓ (each None answer is its
    # own cluster) -> SE = log G -> scale 1/(1+α)
    adv = T([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0]])
    out = seed(
        adv, [["a", "a", "a"], [None, None, "c"]], torch.zeros(2, 3), torch.ones(2, 3), alpha=1.0
    )
    close(out, [[1, -1, 0], [0.5, -0.5, 0]])
    # G = 1 is left unchanged; zero advantages (NaN rewards, all-equal groups) stay 0
    assert torch.equal(seed(T([[0.3]]), [["a"]], T([[-1.0]]), T([[1.0]])), T([[0.3]]))
    assert torch.equal(
        seed(torch.zeros(1, 2), [["a", "b"]], T([[-1.0, -5]]), T([[1.0, 1]])), torch.zeros(1, 2)
    )
    with pytest.raises(ValueError, match="answers"):
        seed(torch.zeros(1, 2), [["a"]], torch.zeros(1, 2), torch.ones(1, 2))


# ------------------------------------------------------------------------ xrpo_novelty


def test_xrpo_novelty_hand_computed() -> None:
    # ℓ = [−10, −5, −2]/10 = [−1, −.5, −.2]; mean −.5666667
    # novelty = max(0, 1 − exp(ℓ − mean)) = [1 − e^−.4333333, 0, 0] = [.3516557, 0, 0]
    # defaults λ = 2.5, κ = .5: bonus = min(2.5·.3516557, .5·1) = .5 -> 1.5 (capped);
    # A < 0 untouched; A = .5 has novelty 0
    adv = xrpo_novelty(
        T([[1.0, -1, 0.5]]), T([[1.0, 0, 1]]), T([[-10.0, -5, -2]]), T([[10.0, 10, 10]])
    )
    close(adv, [[1.5, -1, 0.5]])
    # λ = .1 and no cap (the first build): 1 + .1·.3516557 = 1.0351656
    adv = xrpo_novelty(
        T([[1.0, -1, 0.5]]),
        T([[1.0, 0, 1]]),
        T([[-10.0, -5, -2]]),
        T([[10.0, 10, 10]]),
        lam=0.1,
        kappa=float("inf"),
    )
    close(adv, [[1.0351656, -1, 0.5]])
    # under the cap: λ = 1, κ = .5 -> min(.3516557, .5) -> 1.3516557
    adv = xrpo_novelty(
        T([[1.0, -1, 0.5]]), T([[1.0, 0, 1]]), T([[-10.0, -5, -2]]), T([[10.0, 10, 10]]), lam=1.0
    )
    close(adv, [[1.3516557, -1, 0.5]])
    # correct_threshold = 2: no completion qualifies -> unchanged
    adv = xrpo_novelty(
        T([[1.0, -1, 0.5]]),
        T([[1.0, 0, 1]]),
        T([[-10.0, -5, -2]]),
        T([[10.0, 10, 10]]),
        correct_threshold=2.0,
    )
    close(adv, [[1.0, -1, 0.5]])


def test_xrpo_novelty_edges() -> None:
    # G = 2 with a NaN reward: the NaN one is left out of the mean ℓ and gets no bonus:
    #   ℓ = [−3, −1]; mean over valid = −3 -> novelty of the valid one = 0 -> unchanged
    #   (a mean over both, −2, would give it 1 − e⁻¹)
    adv = xrpo_novelty(
        T([[0.7, 0.0]]), T([[1.0, NAN]]), T([[-3.0, -1.0]]), T([[1.0, 1.0]]), lam=1.0
    )
    close(adv, [[0.7, 0.0]])
    # all-equal group (A = 0) stays exactly 0 even for an unlikely completion
    zero = xrpo_novelty(
        torch.zeros(1, 2), T([[1.0, 1.0]]), T([[-9.0, -1.0]]), T([[1.0, 1.0]]), lam=1.0
    )
    assert torch.equal(zero, torch.zeros(1, 2))
    # G = 2: ℓ = [−3, −1], mean −2 -> novelty [1 − e⁻¹, 0] = [.6321206, 0]; λ = 1, κ = 1
    adv = xrpo_novelty(
        T([[1.0, -1.0]]), T([[1.0, 0.0]]), T([[-3.0, -1.0]]), T([[1.0, 1.0]]), lam=1.0, kappa=1.0
    )
    close(adv, [[1.6321206, -1.0]])
    with pytest.raises(ValueError, match="kappa"):
        xrpo_novelty(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), kappa=-1.0
        )
    with pytest.raises(ValueError, match="lam"):
        xrpo_novelty(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), lam=-1.0
        )


# ---------------------------------------------------------------- group sizes, huge rewards

INF = float("inf")


def test_group_relative_estimators_declare_a_minimum_group_of_two() -> None:
    # their baseline or scale comes from the other completions of the prompt: G = 1 -> A = 0
    for name in ["grpo", "rloo", "bnpo", "ngrpo", "gdpo", "riskpo"]:
        assert ADVANTAGES.capabilities(name).min_group_size == 2, name
    # ReMax's baseline is a separate greedy completion; single-stream has no group at all
    assert ADVANTAGES.capabilities("remax").min_group_size == 1
    caps = ADVANTAGES.capabilities("single_stream")
    assert (caps.min_group_size, caps.max_group_size) == (1, 1)
    for name in ADVANTAGE_MODIFIERS.names():  # G = 1 leaves the advantage as it is
        assert ADVANTAGE_MODIFIERS.capabilities(name).min_group_size == 1


R = [[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 3.0]]
BIG = 2.0**67  # ~1.5e20, a power of two: 3·BIG is exact in float32 (for r_max, reward_max)


@pytest.mark.parametrize(
    "name, call",
    [
        # std-normalized: the same advantages at any reward scale
        ("ngrpo", lambda r, k: ngrpo(r, r_max=3.0 * k, eps=0.0)),
        ("gdpo", lambda r, k: gdpo(r[..., None], eps=0.0)),
        ("riskpo", lambda r, k: RiskPO(bundle_size=2, eps=0.0)(r)),
        ("bnpo", lambda r, k: bnpo(r, reward_max=3.0 * k)),  # rewards rescaled to [0, 1]
        # unnormalized: scaled by k (compared after dividing by k)
        ("rloo", lambda r, k: rloo(r) / k),
        ("remax", lambda r, k: remax(r, T([1.0, 0.5]) * k) / k),
    ],
)
def test_huge_rewards_give_the_same_advantages(name: str, call) -> None:
    # In float32 the squared deviations of rewards ~1e20 overflowed (std inf, A = 0); the
    # estimators compute in float64, so scaling the rewards by 1e20 changes nothing.
    small = call(T(R), 1.0)
    huge = call(T(R) * BIG, BIG)
    assert huge.dtype == torch.float32 and torch.isfinite(huge).all()
    assert small.abs().sum() > 0
    torch.testing.assert_close(huge, small, rtol=1e-5, atol=1e-6)


def test_rloo_huge_rewards_hand_computed() -> None:
    # [0, 1e20, 2e20, 3e20]: A = 4/3 · (r − 1.5e20) = [-2e20, -2/3e20, 2/3e20, 2e20]
    close(rloo(T([[0.0, 1e20, 2e20, 3e20]])) / 1e20, [[-2.0, -2 / 3, 2 / 3, 2.0]])


@pytest.mark.parametrize("inf", [INF, -INF])
def test_infinite_rewards_are_unscorable_like_nan(inf: float) -> None:
    for fn in (rloo, lambda r: ngrpo(r, r_max=5.0), lambda r: gdpo(r[..., None])):
        torch.testing.assert_close(fn(T([[1.0, inf, 0.0, 2.0]])), fn(T([[1.0, NAN, 0.0, 2.0]])))
    # ReMax: an infinite reward or baseline gives A = 0 like a NaN one
    close(remax(T([[1.0, inf]]), T([0.5])), [[0.5, 0.0]])
    close(remax(T([[1.0, 2.0]]), T([inf])), [[0.0, 0.0]])
    # single-stream: no advantage and no tracker update for it
    est = SingleStream(normalize=False)
    close(est(T([[inf]]), ["p"]), [[0.0]])
    assert est.state_dict() == {"alpha": {}, "beta": {}, "stored": {}}


# ------------------------------------------------------------------------ dgpo
def test_dgpo_hand_computed() -> None:
    from grouprl.algorithms.advantages import dgpo

    # group 0: r = [1, 0, 0, 0, 0, 0, 0, 0], mean 1/8, MAD = (7/8 + 7·1/8)/8 = 7/32
    #   A = [(7/8)/(7/32), −(1/8)/(7/32)] = [4, −4/7]: Σ|A| = 4 + 7·4/7 = 8 = G (GRPO: 4.95)
    # group 1: mean 7/8 (easier); group 2: all equal (invalid, A = 0, not in the softmax)
    # λ = 2·softmax([−1/16, −7/16]) = [2/(1 + e^−.375), 2/(1 + e^.375)] = [1.185310, .814690]
    r = T([[1.0] + [0.0] * 7, [1.0] * 7 + [0.0], [1.0] * 8])
    a = dgpo(r, eps=0.0)
    lam0, lam1 = 2 / (1 + math.exp(-0.375)), 2 / (1 + math.exp(0.375))
    close(a[0:1], [[lam0 * 4] + [lam0 * -4 / 7] * 7])
    close(a[1:2], [[lam1 * 4 / 7] * 7 + [lam1 * -4]])
    assert torch.equal(a[2], torch.zeros(8))
    assert float(a[0].abs().sum() / lam0) == pytest.approx(8.0, rel=1e-6)
    assert lam0 > lam1 and lam0 + lam1 == pytest.approx(2.0)
    # NaN rewards: left out of mean and MAD, A = 0 there
    b = dgpo(T([[1.0, 0.0, NAN]]), eps=0.0)
    close(b, [[1.0, -1.0, 0.0]])  # one valid group: λ = 1; MAD = .5 -> ±1
    with pytest.raises(ValueError, match="temperature"):
        dgpo(r, temperature=0.0)


def test_valid_groups_filter_drops_groups_without_signal_from_the_loss() -> None:
    from grouprl.algorithms.selection import valid_groups

    out = valid_groups(T([[1.0, 0.0], [1.0, 1.0], [1.0, NAN], [float("inf"), 0.0]]))
    assert out.keep_BG.tolist() == [[True, True], [False, False], [False, False], [False, False]]
    assert not out.drop_groups_B.any() and out.max_tries == 0
    assert out.stats["valid_groups/kept_frac"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------
# DCPO (token-level)
# ---------------------------------------------------------------------------------------


def test_dcpo_by_hand():
    """Rewards [1, 0]: GRPO gives ±0.7071 (unbiased std). Entropy 0.3 <= 0.5: hot (T' = 1.2);
    gap min(0.2, 0.1) = 0.1 over p_correct 0.5: a = 0.2, α = 1/6; w = e^(−0.8 + 1) = e^0.2.
    Correct row: (5/6)·0.7071 + (1/6)·e^0.2; wrong row: (5/6)·(−0.7071). At H = H*: GRPO."""
    from grouprl.algorithms.advantages import dcpo

    r = torch.tensor([[1.0, 0.0]])
    m = torch.ones(2, 2)
    H = torch.full((2, 2), 0.3)
    old, hot, cold = torch.full((2, 2), -1.0), torch.full((2, 2), -0.8), torch.full((2, 2), -1.3)
    asked = []

    def rescore(scale):  # one re-scoring forward, at the temperature the entropy picks
        asked.append(scale)
        return hot if scale > 1 else cold

    out = dcpo(r, H, old, rescore, m)
    a = 0.5**0.5
    want = [[5 / 6 * a + math.exp(0.2) / 6] * 2, [-5 / 6 * a] * 2]
    torch.testing.assert_close(out, torch.tensor(want))
    # above the target: cold (T' = 0.8): w = e^(−1.3 + 1)
    out = dcpo(r, torch.full((2, 2), 0.7), old, rescore, m)
    torch.testing.assert_close(out[0], torch.full((2,), 5 / 6 * a + math.exp(-0.3) / 6))
    # at the target the extra term vanishes; padding gets 0
    m[1, 1] = 0
    out = dcpo(r, torch.full((2, 2), 0.5), old, rescore, m)
    torch.testing.assert_close(out, torch.tensor([[a, a], [-a, 0.0]]))
    assert asked == [1.2, 0.8, 1.2]  # one temperature per call, the one H picks
