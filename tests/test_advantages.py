"""Hand-computed checks of the GRPO advantage, reward combination and reward metrics."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl.algorithms import ADVANTAGES
from grouprl.algorithms.advantages import combine_rewards, group_reward_stats, grpo

NAN = float("nan")
EPS = 1e-6


def close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def test_registered() -> None:
    assert ADVANTAGES.get("grpo") is grpo


def test_grpo_group_scale() -> None:
    # [3, 1, 2]: mean 2, deviations [1, -1, 0], unbiased var (1+1+0)/2 = 1, std 1
    #   -> A = [1, -1, 0] / (1 + eps)
    # [1, 0, 1]: mean 2/3, deviations [1/3, -2/3, 1/3], var (1/9+4/9+1/9)/2 = 1/3,
    #   std = 0.5773503 -> A = [0.5773503, -1.1547005, 0.5773503] (before eps)
    adv = grpo(torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 1.0]]))
    s = math.sqrt(1 / 3) + EPS
    close(adv, [[1 / (1 + EPS), -1 / (1 + EPS), 0.0], [(1 / 3) / s, (-2 / 3) / s, (1 / 3) / s]])


def test_grpo_eps_is_added_to_std() -> None:
    # [1, -1]: mean 0, std sqrt((1+1)/1) = sqrt(2); eps = 0.5 -> A = 1/(1.4142136+0.5) = 0.5224
    adv = grpo(torch.tensor([[1.0, -1.0]]), eps=0.5)
    a = 1 / (math.sqrt(2) + 0.5)
    close(adv, [[a, -a]])


def test_grpo_batch_scale() -> None:
    # Groups [0, 2] and [4, 4]; group means 1 and 4 -> centered [-1, 1], [0, 0].
    # Batch std over {0, 2, 4, 4}: mean 2.5, squared deviations 6.25+0.25+2.25+2.25 = 11,
    #   unbiased var 11/3, std 1.9148542 -> A = [-1, 1] / 1.9148542 = [-0.5222330, 0.5222330]
    # The [4, 4] group is zero-variance -> exactly 0.
    adv = grpo(torch.tensor([[0.0, 2.0], [4.0, 4.0]]), scale="batch")
    s = math.sqrt(11 / 3) + EPS
    close(adv, [[-1 / s, 1 / s], [0.0, 0.0]])
    # Group scale differs: [0, 2] has std sqrt(2) -> ±0.7071068
    g = 1 / (math.sqrt(2) + EPS)
    close(grpo(torch.tensor([[0.0, 2.0], [4.0, 4.0]])), [[-g, g], [0.0, 0.0]])


def test_grpo_batch_scale_ignores_nan() -> None:
    # Valid rewards {0, 2, 4, 4} as above, plus NaNs that must not change the batch std.
    adv = grpo(torch.tensor([[0.0, 2.0, NAN], [4.0, NAN, 4.0]]), scale="batch")
    s = math.sqrt(11 / 3) + EPS
    close(adv, [[-1 / s, 1 / s, 0.0], [0.0, 0.0, 0.0]])


def test_grpo_none_scale_is_dr_grpo() -> None:
    # [3, 1, 2] - mean 2 = [1, -1, 0]; [1, 0, 0, 0] - 0.25 = [0.75, -0.25, -0.25, -0.25]
    close(grpo(torch.tensor([[3.0, 1.0, 2.0]]), scale="none"), [[1.0, -1.0, 0.0]])
    close(grpo(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), scale="none"), [[0.75, -0.25, -0.25, -0.25]])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_nan_rewards_excluded(scale: str) -> None:
    # [1, NaN, 0, 2]: valid {1, 0, 2}, mean 1, deviations [0, -1, 1], var 2/2 = 1, std 1.
    # Batch std (only this group) is the same 1 -> both scales give [0, 0, -1, 1]/(1+eps).
    adv = grpo(torch.tensor([[1.0, NAN, 0.0, 2.0]]), scale=scale)
    d = 1.0 if scale == "none" else 1 / (1 + EPS)
    close(adv, [[0.0, 0.0, -d, d]])
    assert not torch.isnan(adv).any()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_zero_variance_group_is_exactly_zero(scale: str) -> None:
    # float32 mean of seven 0.7s (or three 0.9s) is off by ~6e-8; dividing that by a
    # ~1e-8 std + 1e-6 would give |A| ~ 0.05, so an all-equal group must be detected exactly.
    rewards = torch.tensor(
        [[0.7] * 7, [0.9, 0.9, 0.9, NAN, NAN, NAN, NAN], [1.0, 0, 0, 0, 0, 0, 0]]
    )
    adv = grpo(rewards, scale=scale)
    assert torch.equal(adv[:2], torch.zeros(2, 7))
    assert adv[2, 0] > 0  # the informative group still gets a signal


def test_grpo_two_completions() -> None:
    # G = 2, [1, 0]: mean 0.5, deviations ±0.5, var (0.25+0.25)/1 = 0.5, std 0.7071068
    #   -> A = ±0.5/0.7071068 = ±0.7071068
    # [1, NaN]: one valid reward -> no baseline -> A = 0
    adv = grpo(torch.tensor([[1.0, 0.0], [1.0, NAN]]))
    a = 0.5 / (math.sqrt(0.5) + EPS)
    close(adv, [[a, -a], [0.0, 0.0]])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_all_nan_group(scale: str) -> None:
    adv = grpo(torch.tensor([[NAN, NAN, NAN], [1.0, 0.0, NAN]]), scale=scale)
    assert torch.equal(adv[0], torch.zeros(3))
    assert adv[1, 0] > 0 > adv[1, 1] and adv[1, 2] == 0


def test_grpo_dtypes() -> None:
    # float64 stays float64; integer rewards are accepted ([1, 0] -> ±0.7071 as above).
    assert grpo(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).dtype == torch.float64
    adv = grpo(torch.tensor([[1, 0]]))
    assert adv.is_floating_point() and adv[0, 0] > 0.7


def test_grpo_rejects_bad_scale_and_shape() -> None:
    with pytest.raises(ValueError, match="group, batch, none"):
        grpo(torch.zeros(2, 2), scale="std")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        grpo(torch.zeros(4))


def test_combine_rewards() -> None:
    rewards = torch.tensor([[1.0, 0.5, NAN], [NAN, 1.0, 2.0], [0.0, -1.0, 3.0], [2.0, 1.0, 3.0]])
    weights = torch.tensor([1.0, 2.0, 0.0])
    # row 0: 1·1 + 2·0.5 = 2 (NaN in the weight-0 column is ignored)
    # row 1: NaN in a weighted column: skipped (TRL's nansum) -> 2·1 = 2; strict: NaN
    # row 2: 1·0 + 2·(−1) = −2;  row 3: 1·2 + 2·1 = 4 (weight 0 drops the 3)
    out = combine_rewards(rewards, weights)
    assert out.tolist() == [2.0, 2.0, -2.0, 4.0]
    strict = combine_rewards(rewards, weights, missing="unscorable")
    assert strict[0] == 2.0 and math.isnan(strict[1]) and strict[2] == -2.0 and strict[3] == 4.0


def test_combine_rewards_shape_check() -> None:
    with pytest.raises(ValueError, match="weights"):
        combine_rewards(torch.zeros(3, 2), torch.ones(3))


def test_group_reward_stats() -> None:
    rewards = torch.tensor(
        [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.3, NAN, 0.7, 0.5], [NAN] * 4]
    )
    stats = group_reward_stats(rewards)
    # reward: 11 valid values summing to 2 + 4 + 1.5 = 7.5 -> 7.5/11
    assert stats["reward"] == pytest.approx(7.5 / 11)
    # per-group std: [1,0,1,0] mean .5, var 4·.25/3 -> sqrt(1/3); [1,1,1,1] -> 0;
    # [.3, .7, .5] mean .5, var (.04+.04+0)/2 = .04 -> .2; all-NaN -> 0. Mean over 4 groups.
    assert stats["reward_std"] == pytest.approx((math.sqrt(1 / 3) + 0.2) / 4)
    # zero-std groups: [1,1,1,1] and the all-NaN group -> 2/4
    assert stats["frac_reward_zero_std"] == 0.5
    # 5 NaN among 16 rewards
    assert stats["reward/nan_frac"] == 5 / 16
    assert set(stats) == {"reward", "reward_std", "frac_reward_zero_std", "reward/nan_frac"}


# ---------------------------------------------------------------- huge and infinite rewards

INF = float("inf")


@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("big", [1e20, 1e30, 1e38])
def test_grpo_huge_rewards_give_the_same_advantages(scale: str, big: float) -> None:
    # [0, 1, 2, 3]: mean 1.5, deviations [-1.5, -0.5, 0.5, 1.5], unbiased var 5/3,
    #   std 1.2909944 -> A = [-1.1618950, -0.3872983, 0.3872983, 1.1618950] (eps negligible).
    # Scaled by 1e20 the advantages are the same; in float32 the squared deviations
    # (~1e40) overflowed, the std was inf and every advantage 0.
    s = math.sqrt(5 / 3)
    expected = [[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]]
    small = grpo(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), scale=scale)
    huge = grpo(torch.tensor([[0.0, 1.0, 2.0, 3.0]]) * big, scale=scale)
    assert huge.dtype == torch.float32 and torch.isfinite(huge).all()
    torch.testing.assert_close(huge, small)
    torch.testing.assert_close(huge, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_grpo_hand_computed_values_are_unchanged_and_exactly_rounded() -> None:
    # test_grpo_group_scale's example: computed in float64, the float32 result is the
    # hand-computed value rounded once to float32.
    adv = grpo(torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 1.0]]))
    s = math.sqrt(1 / 3) + EPS
    hand = [[1 / (1 + EPS), -1 / (1 + EPS), 0.0], [(1 / 3) / s, (-2 / 3) / s, (1 / 3) / s]]
    assert torch.equal(adv, torch.tensor(hand, dtype=torch.float64).float())


def test_grpo_dr_grpo_scale_of_huge_rewards() -> None:
    # scale="none" returns r - mean itself: [-1.5e30, -0.5e30, 0.5e30, 1.5e30]
    adv = grpo(torch.tensor([[0.0, 1e30, 2e30, 3e30]]), scale="none")
    torch.testing.assert_close(adv, torch.tensor([[-1.5e30, -0.5e30, 0.5e30, 1.5e30]]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("inf", [INF, -INF])
def test_grpo_infinite_reward_is_unscorable(scale: str, inf: float) -> None:
    # An infinite reward is left out like NaN: [1, inf, 0, 2] -> valid {1, 0, 2}, as in
    # test_grpo_nan_rewards_excluded: A = [0, 0, -1, 1]/(1 + eps)
    adv = grpo(torch.tensor([[1.0, inf, 0.0, 2.0]]), scale=scale)
    torch.testing.assert_close(adv, grpo(torch.tensor([[1.0, NAN, 0.0, 2.0]]), scale=scale))
    assert adv[0, 1] == 0 and torch.isfinite(adv).all()


def test_combine_rewards_huge_and_infinite() -> None:
    rewards = torch.tensor([[1e30, 2e30], [3e38, 3e38], [INF, 1.0], [1.0, INF]])
    out = combine_rewards(rewards, torch.tensor([1.0, 1.0]), missing="unscorable")
    # row 0: 3e30; row 1: 6e38 is beyond float32 -> unscorable; rows 2, 3: inf -> unscorable
    assert out.dtype == torch.float32
    assert out[0] == pytest.approx(3e30, rel=1e-6)
    assert torch.isnan(out[1:]).all()
    # skipping: an infinite reward is left out like a NaN one; the sum still must fit
    skip = combine_rewards(rewards, torch.tensor([1.0, 1.0]))
    assert math.isnan(skip[1]) and skip[2:].tolist() == [1.0, 1.0]
    # an infinite reward of weight 0 is only logged, as NaN would be
    assert combine_rewards(torch.tensor([[2.0, INF]]), torch.tensor([1.0, 0.0])).tolist() == [2.0]


def test_group_reward_stats_huge_and_infinite() -> None:
    # per-group std of [0, 1e20, 2e20, 3e20] is 1e20·sqrt(5/3); inf counts as unscorable
    stats = group_reward_stats(torch.tensor([[0.0, 1e20, 2e20, 3e20], [1.0, INF, 1.0, 1.0]]))
    assert stats["reward_std"] == pytest.approx(1e20 * math.sqrt(5 / 3) / 2, rel=1e-6)
    assert stats["reward/nan_frac"] == 1 / 8
    assert stats["frac_reward_zero_std"] == 0.5
