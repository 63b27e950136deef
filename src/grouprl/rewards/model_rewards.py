r"""Model-based rewards (registered in `REWARDS`): rewards that compose reward models.

Each names its models as scorer specs (`rewards/models.py`, a mapping with a ``kind``) and
may name registered reward functions the same way, so rule and model scores mix:

    # a "source": a pointwise score per completion
    {kind: classifier, path: /models/rm, head: 0, batch_size: 16}    # a reward model's head
    {kind: generative, base_url: http://localhost:8000/v1, model: judge}   # an LLM judge
    {reward: math_accuracy}                # a registered reward function (with `params`)
    # any source may add ref_mean / ref_std: its score becomes (s − ref_mean) / ref_std

- `reward_model`: one source's score.
- `reward_ensemble` (Coste et al., arXiv 2310.02743): mean, min (WCO) or mean − λ·Var (UWO)
  over several sources.
- `multihead_rm` (HydroX multi-objective GRPO, arXiv 2503.21819): a weighted sum of a
  classifier's K heads.
- `pairwise_winrate` (Pref-GRPO, arXiv 2508.20751): each completion's win rate against the
  rest of its group under a pairwise judge.
- `rubric_reward` (RGR-GRPO, arXiv 2511.12344): an LLM judge scores each rubric item of a
  dataset column; the weighted share met.
- `judge_constraints` (CGPO, arXiv 2409.20370): judges flag constraint violations; a flagged
  completion gets the floor instead of its reward.
- `posterior_gate` (Posterior-GRPO, arXiv 2508.05170): r_fmt + r_outcome + 1[correct]·r_think.
- `difficulty_scale` (DR-IRL's GRPO-S, arXiv 2503.18991): rewards scaled per group by
  difficulty (a hardness column × 1 − the group's mean reward).

GRPO-CARE (arXiv 2506.16141) needs an EMA copy of the policy held by the trainer; its pure
parts are here (`care_consistency_N`, `care_bonus_BG`, `ema_update_`) and `CareBonus`, a
reward left unregistered until the trainer passes the `care_consistency` column.

The math is in pure functions (shapes in their names); the classes check their parameters
when the run builds its rewards (an error names the key, e.g.
``rewards.pairwise_winrate.judge.path: no model at /x``), build their scorers then (the
weights load at the first call) and report `last_metrics`. Groups: the `group_index` column
the trainer passes (one int per row, a group's rows contiguous); without it, runs of equal
consecutive prompts. Give a reward that loads a model ``timeout: 0`` (in-process: the GPU,
one load per run); see `rewards/models.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from grouprl.rewards.base import REWARDS, RewardSpec, load_reward_fn
from grouprl.rewards.length_control import group_ids
from grouprl.rewards.models import ScorerError, build_scorer
from grouprl.rewards.outcome import accepted, to_floats

__all__ = [
    "CareBonus",
    "DifficultyScale",
    "JudgeConstraints",
    "MultiheadRM",
    "PairwiseWinrate",
    "PosteriorGate",
    "RewardEnsemble",
    "RewardModel",
    "RubricReward",
    "Source",
    "care_bonus_BG",
    "care_consistency_N",
    "difficulty_weights_B",
    "ema_update_",
    "ensemble_N",
    "gate_by_flags_N",
    "posterior_gate_N",
    "rubric_items",
    "rubric_score",
    "standardize_NK",
    "weighted_heads_N",
    "winrates_G",
]

AGGREGATES = ("mean", "min", "uwo")
PENALTIES = ("var", "std")
STANDARDIZE = ("none", "batch")
RUBRIC_TEMPLATE = (
    "You grade a response against one rubric criterion.\n\nQuestion:\n{prompt}\n\n"
    "Response:\n{completion}\n\nCriterion: {criterion}\n\n"
    "Does the response meet the criterion? Give one short reason, then end with one line "
    "'Score: 1' if it does or 'Score: 0' if it does not."
)


def _bad(reward: str, key: str, need: str, value: Any) -> ValueError:
    return ValueError(f"rewards.{reward}.{key}: must be {need}, got {value!r}")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _none_if_nan(values: Iterable[float]) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in values]


def _group_rows(prompts: Sequence[Any], group_index: Sequence[Any] | None) -> list[list[int]]:
    """The rows of each group, groups in order of first appearance: by `group_index` when
    given, else runs of equal consecutive prompts."""
    ids = list(group_index) if group_index is not None else group_ids(prompts)
    if len(ids) != len(prompts):
        raise ValueError(f"group_index has {len(ids)} entries for {len(prompts)} rows")
    rows: dict[Any, list[int]] = {}
    for i, g in enumerate(ids):
        rows.setdefault(g, []).append(i)
    return list(rows.values())


def _subset(columns: Mapping[str, Any], rows: Sequence[int], n: int) -> dict[str, Any]:
    """The columns of `rows` only (list columns of length n are cut, the rest kept)."""
    return {
        k: [v[i] for i in rows] if isinstance(v, (list, tuple)) and len(v) == n else v
        for k, v in columns.items()
    }


# ---------------------------------------------------------------- sources


class Source:
    """A pointwise score per completion from a scorer head or a registered reward function.

    spec: ``{kind: ..., <scorer parameters>, head: 0}`` (a `REWARD_MODELS` kind other than
    pairwise) or ``{reward: <name>, params: {...}}`` (or the name alone; a name with a colon
    is a "module:function" or "file.py:function" path), either with
    optional ``ref_mean`` / ``ref_std``: the score becomes (s − ref_mean) / ref_std (a
    standardization on a reference set, as Coste et al. standardize each ensemble member).
    Calling it gives Tensor[N] float64, NaN where it could not score (None, unparsed).
    """

    def __init__(self, spec: Any, where: str) -> None:
        self.where = where
        if isinstance(spec, str):
            spec = {"reward": spec}
        if not isinstance(spec, Mapping):
            raise ValueError(
                f"{where}: a score source is a mapping with 'kind' (a reward model) or "
                f"'reward' (a registered reward function), got {spec!r}"
            )
        spec = dict(spec)
        head = spec.pop("head", 0)
        if isinstance(head, bool) or not isinstance(head, int) or head < 0:
            raise ValueError(f"{where}.head: must be an integer >= 0, got {head!r}")
        self.head = head
        ref_mean, ref_std = spec.pop("ref_mean", 0.0), spec.pop("ref_std", 1.0)
        if not _is_number(ref_mean):
            raise ValueError(f"{where}.ref_mean: must be a finite number, got {ref_mean!r}")
        if not _is_number(ref_std) or ref_std <= 0:
            raise ValueError(f"{where}.ref_std: must be a number > 0, got {ref_std!r}")
        self.ref_mean, self.ref_std = float(ref_mean), float(ref_std)
        self.scorer: Any = None
        self.fn: Any = None
        if "reward" in spec:
            if "kind" in spec:
                raise ValueError(f"{where}: give 'kind' (a reward model) or 'reward', not both")
            name, params = spec.pop("reward"), spec.pop("params", {})
            if spec:
                raise ValueError(
                    f"{where}: unknown keys {sorted(spec)} beside 'reward' (its options go "
                    f"under 'params')"
                )
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"{where}.reward: a registered reward's name or a 'module:function' path, "
                    f"got {name!r}"
                )
            if head:
                raise ValueError(f"{where}.head: only for a reward model")
            # a registered name, or a "module:function" / "file.py:function" path
            spec_kw = {"path": name} if ":" in name else {"name": name}
            try:
                self.fn = load_reward_fn(RewardSpec(**spec_kw, params=params or {}))
            except Exception as e:
                raise ValueError(f"{where}.reward: {e}") from None
            self.label = name
        elif "kind" in spec:
            if spec["kind"] == "pairwise":
                raise ValueError(
                    f"{where}.kind: a pairwise judge compares two completions; a pointwise "
                    f"score is needed here (kind: classifier on the same path gives its "
                    f"Bradley–Terry score)"
                )
            self.scorer = build_scorer(spec, where)
            self.label = spec["kind"]
        else:
            raise ValueError(
                f"{where}: needs 'kind' (a reward model: classifier, generative) or 'reward' "
                f"(a registered reward function)"
            )

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any]
    ) -> torch.Tensor:
        n = len(completions)
        if n == 0:
            return torch.zeros(0, dtype=torch.float64)
        if self.scorer is not None:
            scores_NK = self.scorer.score(prompts, completions, **columns)
            if self.head >= scores_NK.shape[1]:
                raise ScorerError(
                    f"{self.where}.head: {self.head}, but the model has {scores_NK.shape[1]} heads"
                )
            raw = scores_NK[:, self.head].double()
        else:
            kwargs = {**columns, "prompts": list(prompts), "completions": list(completions)}
            out = self.fn(**accepted(kwargs, self.fn))
            try:
                values, _ = to_floats(out, n)
            except Exception as e:
                raise ValueError(f"{self.where}.reward: {self.label!r} {e}") from None
            raw = torch.tensor(values, dtype=torch.float64)
        return (raw - self.ref_mean) / self.ref_std


def _sources(specs: Any, where: str, *, minimum: int) -> list[Source]:
    if not isinstance(specs, (list, tuple)) or len(specs) < minimum:
        raise ValueError(
            f"{where}: must be a list of at least {minimum} score sources, got {specs!r}"
        )
    return [Source(s, f"{where}.{i}") for i, s in enumerate(specs)]


# ---------------------------------------------------------------- reward_model


@REWARDS.register("reward_model")
class RewardModel:
    """One reward model's score (or any score source's): r = (s_head − ref_mean) / ref_std.

    E.g. a classifier reward model's logit, `model: {kind: classifier, path: ..., head: 0}`.
    None where the source gave none."""

    def __init__(self, *, model: Any = None) -> None:
        if model is None:
            raise ValueError("rewards.reward_model.model: required: a reward model (kind: ...)")
        self.model = Source(model, "rewards.reward_model.model")
        self.last_metrics: dict[str, float] = {}
        self.__name__ = "reward_model"

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return _none_if_nan(self.model(prompts, completions, columns).tolist())


# ---------------------------------------------------------------- reward_ensemble (D37)


def standardize_NK(scores_NK: torch.Tensor) -> torch.Tensor:
    """Each column z-scored over its finite rows: (s − mean) / std (population std; a
    column with std 0 is only centered). NaN stays NaN."""
    out = scores_NK.clone().double()
    for k in range(out.shape[1]):
        col = out[:, k]
        ok = torch.isfinite(col)
        if ok.sum() == 0:
            continue
        mean = col[ok].mean()
        std = col[ok].std(unbiased=False)
        col[ok] = (col[ok] - mean) / (std if std > 0 else 1.0)
    return out


def ensemble_N(
    scores_NK: torch.Tensor, aggregate: str = "min", lam: float = 0.5, penalty: str = "var"
) -> torch.Tensor:
    """Combine K reward models' scores per row ("Reward Model Ensembles Help Mitigate
    Overoptimization", Coste et al., arXiv 2310.02743, §3):

        mean: (1/K) Σ_k R_k;   min (WCO): min_k R_k;
        uwo:  (1/K) Σ_k R_k − λ·Var_k R_k   (Var over the members, 1/K; penalty "std":
              λ·std instead, the reading of grouprl's ALGORITHMS.md)

    over each row's finite scores (a member that could not score is left out; a row with
    none is NaN). Tensor[N, K] -> Tensor[N] float64."""
    x = scores_NK.double()
    ok = torch.isfinite(x)
    count = ok.sum(dim=1)
    zero = torch.where(ok, x, torch.zeros_like(x))
    mean = zero.sum(dim=1) / count.clamp(min=1)
    if aggregate == "mean":
        out = mean
    elif aggregate == "min":
        out = torch.where(ok, x, torch.full_like(x, math.inf)).min(dim=1).values
    elif aggregate == "uwo":
        var = (torch.where(ok, x - mean[:, None], torch.zeros_like(x)) ** 2).sum(dim=1)
        var = var / count.clamp(min=1)
        out = mean - lam * (var if penalty == "var" else var.sqrt())
    else:
        raise ValueError(f"ensemble_N: aggregate must be one of {', '.join(AGGREGATES)}")
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


@REWARDS.register("reward_ensemble")
class RewardEnsemble:
    """Several reward models combined per completion: min (WCO), mean, or mean − λ·Var (UWO)
    ("Reward Model Ensembles Help Mitigate Overoptimization", arXiv 2310.02743).

    K sources (`members`, at least two) combined per completion by `ensemble_N`: ``min`` (WCO, the default: no hyper-parameter), ``mean``,
    or ``uwo`` (mean − `lam`·Var, `penalty: std` for λ·std; λ = 0.5 is ours, the paper's
    value unread). Members are put on one scale by their own ``ref_mean`` / ``ref_std``
    (statistics on a reference set, as the paper standardizes each RM) or, with
    `standardize: batch`, by z-scoring each member over the call's batch.
    last_metrics: reward_ensemble/disagreement (mean over rows of the members' std) and
    reward_ensemble/member_k (each member's mean)."""

    def __init__(
        self,
        *,
        members: list | None = None,
        aggregate: str = "min",
        lam: float = 0.5,
        penalty: str = "var",
        standardize: str = "none",
    ) -> None:
        name = "reward_ensemble"
        if aggregate not in AGGREGATES:
            raise _bad(name, "aggregate", f"one of {', '.join(AGGREGATES)}", aggregate)
        if not _is_number(lam) or lam < 0:
            raise _bad(name, "lam", "a number >= 0", lam)
        if penalty not in PENALTIES:
            raise _bad(name, "penalty", f"one of {', '.join(PENALTIES)}", penalty)
        if standardize not in STANDARDIZE:
            raise _bad(name, "standardize", f"one of {', '.join(STANDARDIZE)}", standardize)
        self.members = _sources(members, f"rewards.{name}.members", minimum=2)
        self.aggregate, self.lam, self.penalty = aggregate, float(lam), penalty
        self.standardize = standardize
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        scores_NK = torch.stack([m(prompts, completions, columns) for m in self.members], dim=1)
        if self.standardize == "batch":
            scores_NK = standardize_NK(scores_NK)
        out = ensemble_N(scores_NK, self.aggregate, self.lam, self.penalty)
        ok = torch.isfinite(scores_NK)
        spread = [
            row[m].std(unbiased=False).item()
            for row, m in zip(scores_NK, ok, strict=True)
            if m.sum() > 1
        ]
        self.last_metrics = {
            "reward_ensemble/disagreement": sum(spread) / len(spread) if spread else 0.0,
            **{
                f"reward_ensemble/member_{k}": scores_NK[ok[:, k], k].mean().item()
                for k in range(scores_NK.shape[1])
                if ok[:, k].any()
            },
        }
        return _none_if_nan(out.tolist())


# ---------------------------------------------------------------- multihead_rm (D38)


def weighted_heads_N(scores_NK: torch.Tensor, weights_K: torch.Tensor) -> torch.Tensor:
    """r = Σ_k w_k·s_k, the multi-aspect reward combined into one scalar ("Optimizing Safe
    and Aligned Language Generation: A Multi-Objective GRPO Approach", arXiv 2503.21819).
    Tensor[N, K], Tensor[K] -> Tensor[N] float64; NaN when any weighted head is NaN."""
    return (scores_NK.double() * weights_K.double()[None, :]).sum(dim=1)


@REWARDS.register("multihead_rm")
class MultiheadRM:
    """A weighted sum of a multi-output reward model's K heads, r = Σ_k w_k·s_k ("Optimizing
    Safe and Aligned Language Generation: A Multi-Objective GRPO Approach", arXiv 2503.21819).

    The heads are aspects such as politeness, meaningfulness, actionability and safety;
    the paper's weights are unread (default: equal, 1/K). `model`: a classifier spec (no
    `head`); `weights`: K numbers, checked against the model's heads at the first call.
    To give each aspect its own group normalization instead (GDPO), list one
    `reward_model` per head (same path: one loaded model, one cache) with `advantage: gdpo`.
    last_metrics: multihead_rm/head_k (each head's mean)."""

    def __init__(self, *, model: Any = None, weights: list | None = None) -> None:
        name, where = "multihead_rm", "rewards.multihead_rm.model"
        if not isinstance(model, Mapping) or "kind" not in model:
            raise ValueError(
                f"{where}: required: a reward model mapping (kind: classifier, path: ...)"
            )
        if model.get("kind") == "pairwise":
            raise ValueError(f"{where}.kind: a pointwise model is needed (classifier)")
        if "head" in model:
            raise ValueError(f"{where}.head: not used here: `weights` weighs every head")
        self.scorer = build_scorer(model, where)
        if weights is not None and (
            not isinstance(weights, (list, tuple))
            or not weights
            or not all(_is_number(w) for w in weights)
        ):
            raise _bad(
                name,
                "weights",
                "a list of finite numbers, one per head (or null: 1/K each)",
                weights,
            )
        self.weights = None if weights is None else [float(w) for w in weights]
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        scores_NK = self.scorer.score(prompts, completions, **columns)
        k = scores_NK.shape[1]
        weights = self.weights if self.weights is not None else [1.0 / k] * k
        if len(weights) != k:
            raise ScorerError(
                f"rewards.multihead_rm.weights: {len(weights)} weights for a model with {k} heads"
            )
        out = weighted_heads_N(scores_NK, torch.tensor(weights))
        self.last_metrics = {
            f"multihead_rm/head_{j}": scores_NK[:, j].double().nanmean().item() for j in range(k)
        }
        return _none_if_nan(out.tolist())


# ---------------------------------------------------------------- pairwise_winrate (D39)


def winrates_G(pref_GG: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """Pref-GRPO's reward ("Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable
    Text-to-Image Reinforcement Learning", arXiv 2508.20751): with P_ij = P(o_i ≻ o_j),

        w_i = (1 / (G − 1)) Σ_{j≠i} 1[P_ij > 0.5]    (a tie, P_ij = 0.5, counts 1/2)
        soft: w_i = (1 / (G − 1)) Σ_{j≠i} P_ij         (the expected win rate)

    Tensor[G, G] (the diagonal is ignored) -> Tensor[G] float64; G >= 2."""
    g = pref_GG.shape[0]
    if pref_GG.shape != (g, g) or g < 2:
        raise ValueError(f"winrates_G: a [G, G] matrix with G >= 2, got {tuple(pref_GG.shape)}")
    p = pref_GG.double()
    won = p if soft else (p > 0.5).double() + 0.5 * (p == 0.5).double()
    won = won * (1.0 - torch.eye(g, dtype=torch.float64))
    return won.sum(dim=1) / (g - 1)


@REWARDS.register("pairwise_winrate")
class PairwiseWinrate:
    """Each completion's win rate against the rest of its group under a pairwise judge
    ("Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image Reinforcement
    Learning", arXiv 2508.20751).

    The judge is `judge`, a ``kind: pairwise`` spec; the win rates are `winrates_G`; the group's GRPO z-score of the win rates is then the
    advantage. Win rates are spread over [0, 1] whatever the size of the score gaps, so tiny
    pointwise differences do not become large advantages ("illusory advantages").

    Each unordered pair is judged once (P(o_j ≻ o_i) = 1 − P(o_i ≻ o_j), exact for the
    Bradley–Terry mode and for a joint judge with both_orders): G(G − 1)/2 pairs per group,
    all of a call's pairs in one batched judge call. soft: the expected win rate instead of
    counting wins. A group of one completion gets None. last_metrics:
    pairwise_winrate/pairs, /margin (mean |2P − 1|) and /ties (share of P = 0.5)."""

    def __init__(self, *, judge: Any = None, soft: bool = False) -> None:
        where = "rewards.pairwise_winrate.judge"
        if not isinstance(judge, Mapping) or judge.get("kind") != "pairwise":
            raise ValueError(
                f"{where}: required: a pairwise judge (kind: pairwise, path: ...), got {judge!r}"
            )
        self.judge = build_scorer(judge, where)
        self.soft = bool(soft)
        self.last_metrics: dict[str, float] = {}
        self.__name__ = "pairwise_winrate"

    def __call__(
        self, prompts: list, completions: list, group_index: list | None = None, **columns: Any
    ) -> list[float | None]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"pairwise_winrate: {len(prompts)} prompts for {n} completions")
        groups = _group_rows(prompts, group_index)
        pairs = [(i, j) for rows in groups for a, i in enumerate(rows) for j in rows[a + 1 :]]
        probs = self.judge.prefer(
            [prompts[i] for i, _ in pairs],
            [completions[i] for i, _ in pairs],
            [completions[j] for _, j in pairs],
        )
        p_of = {pair: float(p) for pair, p in zip(pairs, probs.tolist(), strict=True)}
        out: list[float | None] = [None] * n
        for rows in groups:
            if len(rows) < 2:
                continue
            pref = torch.full((len(rows), len(rows)), 0.5, dtype=torch.float64)
            for a, i in enumerate(rows):
                for b in range(a + 1, len(rows)):
                    p = p_of[(i, rows[b])]
                    pref[a, b], pref[b, a] = p, 1.0 - p
            for i, w in zip(rows, winrates_G(pref, self.soft).tolist(), strict=True):
                out[i] = w
        ps = list(p_of.values())
        self.last_metrics = {
            "pairwise_winrate/pairs": float(len(ps)),
            "pairwise_winrate/margin": sum(abs(2 * p - 1) for p in ps) / len(ps) if ps else 0.0,
            "pairwise_winrate/ties": sum(p == 0.5 for p in ps) / len(ps) if ps else 0.0,
        }
        return out


# ---------------------------------------------------------------- rubric_reward (D40)


def rubric_items(value: Any, where: str) -> list[tuple[str, float]]:
    """A row's rubric as (criterion, weight) items: a list of strings (weight 1) or of
    mappings {criterion (or text), weight}; a JSON string of such a list; one plain string
    (one criterion); None or [] (no rubric)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [(text, 1.0)] if text else []
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{where}: not a JSON list of rubric items: {e}") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: a list of rubric items, got {type(value).__name__}")
    items: list[tuple[str, float]] = []
    for k, item in enumerate(value):
        if isinstance(item, str):
            items.append((item, 1.0))
            continue
        if not isinstance(item, Mapping):
            raise ValueError(
                f"{where}[{k}]: a string or a mapping {{criterion, weight}}, got {item!r}"
            )
        text = item.get("criterion", item.get("text"))
        weight = item.get("weight", 1.0)
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}[{k}].criterion: a non-empty string, got {text!r}")
        if not _is_number(weight) or weight < 0:
            raise ValueError(f"{where}[{k}].weight: a number >= 0, got {weight!r}")
        items.append((text, float(weight)))
    return items


def rubric_score(
    scores_K: Sequence[float], weights_K: Sequence[float], threshold: float | None = None
) -> float:
    """RGR-GRPO's rubric reward ("Reward and Guidance through Rubrics: Promoting Exploration
    to Improve Multi-Domain Reasoning", arXiv 2511.12344; item weights unread, ours):

        r = Σ_k w_k·s_k / Σ_k w_k   over the items the judge scored (s_k ∈ [0, 1]);
        threshold t: s_k ← 1[s_k >= t] (met or not)

    NaN when no item with weight > 0 was scored."""
    num = den = 0.0
    for s, w in zip(scores_K, weights_K, strict=True):
        if not math.isfinite(s):
            continue
        if threshold is not None:
            s = 1.0 if s >= threshold else 0.0
        num += w * s
        den += w
    return num / den if den > 0 else math.nan


@REWARDS.register("rubric_reward")
class RubricReward:
    """The weighted share of a row's rubric items an LLM judge finds met ("Reward and Guidance
    through Rubrics: Promoting Exploration to Improve Multi-Domain Reasoning", arXiv 2511.12344).

    A generative judge (`judge`, a ``kind: generative`` spec) scores each item of the row's rubric (`rubric_column`,
    default "rubric": `rubric_items`) in one request per (completion, item), all of a
    call's requests `judge.concurrency` at a time; r = `rubric_score`. The judge's template
    gets the item as {criterion}; without a `template` of its own the judge uses
    `RUBRIC_TEMPLATE` ("Score: 1" if met, "Score: 0" if not) mapped to [0, 1]
    (min_score 0, max_score 1). threshold: count an item as met when its score >= t (null:
    partial credit). A row without a rubric, or whose items all failed to parse, gets None.
    last_metrics: rubric_reward/items (per row), /met (mean item score), /unparsed (share).
    """

    def __init__(
        self, *, judge: Any = None, rubric_column: str = "rubric", threshold: float | None = None
    ) -> None:
        name, where = "rubric_reward", "rewards.rubric_reward.judge"
        if not isinstance(judge, Mapping) or judge.get("kind") != "generative":
            raise ValueError(
                f"{where}: required: an LLM judge (kind: generative, base_url: ..., model: ...), got {judge!r}"
            )
        spec = dict(judge)
        if spec.get("template") is None:
            spec["template"] = RUBRIC_TEMPLATE
            if "min_score" not in spec and "max_score" not in spec:
                spec["min_score"], spec["max_score"] = 0.0, 1.0
        self.judge = build_scorer(spec, where)
        if "criterion" not in self.judge.fields:
            raise ValueError(
                f"{where}.template: must hold a {{criterion}} placeholder (the rubric item)"
            )
        if not isinstance(rubric_column, str) or not rubric_column:
            raise _bad(name, "rubric_column", "a dataset column's name", rubric_column)
        if threshold is not None and not _is_number(threshold):
            raise _bad(name, "threshold", "a number or null", threshold)
        self.rubric_column = rubric_column
        self.threshold = None if threshold is None else float(threshold)
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        n = len(completions)
        if self.rubric_column not in columns:
            raise ValueError(
                f"rewards.rubric_reward.rubric_column: no column {self.rubric_column!r} in the "
                f"data (columns: {', '.join(sorted(k for k, v in columns.items() if isinstance(v, list))) or 'none'})"
            )
        rubrics = columns[self.rubric_column]
        where = f"rewards.rubric_reward.rubric_column ({self.rubric_column})"
        items = [rubric_items(rubrics[i], f"{where}, row {i}") for i in range(n)]
        rows = [i for i in range(n) for _ in items[i]]
        flat = [it for row_items in items for it in row_items]
        sub = _subset(columns, rows, n)
        sub["criterion"] = [text for text, _ in flat]
        scores = self.judge.score([prompts[i] for i in rows], [completions[i] for i in rows], **sub)
        scores_flat = scores[:, 0].double().tolist()
        out: list[float | None] = []
        start = 0
        for row_items in items:
            k = len(row_items)
            s = scores_flat[start : start + k]
            start += k
            value = rubric_score(s, [w for _, w in row_items], self.threshold) if k else math.nan
            out.append(None if not math.isfinite(value) else value)
        finite = [s for s in scores_flat if math.isfinite(s)]
        self.last_metrics = {
            "rubric_reward/items": len(flat) / max(n, 1),
            "rubric_reward/met": sum(finite) / len(finite) if finite else 0.0,
            "rubric_reward/unparsed": (len(flat) - len(finite)) / len(flat) if flat else 0.0,
        }
        return out


# ---------------------------------------------------------------- judge_constraints (D41)


def gate_by_flags_N(
    rewards_N: torch.Tensor, flags_JN: torch.Tensor, floor: float = 0.0
) -> torch.Tensor:
    """CGPO's constraint gate as read here ("The Perfect Blend: Redefining RLHF with Mixture
    of Judges", arXiv 2409.20370): r_i = floor when any judge j flags completion i
    (flags_JN[j, i]), else r_i. Tensor[N], Tensor[J, N] bool -> Tensor[N] float64."""
    flagged = (
        flags_JN.bool().any(dim=0)
        if flags_JN.numel()
        else torch.zeros_like(rewards_N, dtype=torch.bool)
    )
    return torch.where(flagged, torch.full_like(rewards_N.double(), floor), rewards_N.double())


class _Judge:
    """One constraint judge: a source and its violation rule (above and/or below)."""

    def __init__(self, spec: Any, where: str) -> None:
        if not isinstance(spec, Mapping):
            raise ValueError(
                f"{where}: a judge is a mapping (a score source plus flag_above/flag_below), got {spec!r}"
            )
        spec = dict(spec)
        above, below = spec.pop("flag_above", None), spec.pop("flag_below", None)
        name = spec.pop("name", None)
        if above is None and below is None:
            raise ValueError(
                f"{where}: needs flag_above and/or flag_below (when the judge's score flags a violation)"
            )
        for key, value in (("flag_above", above), ("flag_below", below)):
            if value is not None and not _is_number(value):
                raise ValueError(f"{where}.{key}: must be a finite number, got {value!r}")
        self.above = None if above is None else float(above)
        self.below = None if below is None else float(below)
        self.source = Source(spec, where)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{where}.name: a non-empty string, got {name!r}")
        self.name = name or self.source.label

    def flags(self, values_N: torch.Tensor) -> torch.Tensor:
        """Bool Tensor[N]: value > flag_above or value < flag_below (NaN: not flagged)."""
        flagged = torch.zeros_like(values_N, dtype=torch.bool)
        if self.above is not None:
            flagged |= values_N > self.above
        if self.below is not None:
            flagged |= values_N < self.below
        return flagged


@REWARDS.register("judge_constraints")
class JudgeConstraints:
    """A completion that any constraint judge flags gets the floor instead of its reward
    ("The Perfect Blend: Redefining RLHF with Mixture of Judges", CGPO, arXiv 2409.20370).

    The rule is our reading of the abstract (CGPO's constrained optimizers are not built). `judges`: a list of score
    sources (rule rewards or models) each with ``flag_above`` and/or ``flag_below`` and an
    optional ``name``; a completion is flagged when any judge's score is past its bound (a
    judge that cannot score a row does not flag it). `reward`: the source of the reward,
    scored only on the unflagged rows (a flagged one costs no reward-model call); flagged
    rows get `floor` (0.0), `gate_by_flags_N`. CGPO's per-task stratification (each task its
    own reward model and settings) is left to the data: use one reward per task. last_metrics:
    judge_constraints/violations (share flagged), /<judge>/violations, /unscored (judge NaNs).
    """

    def __init__(
        self, *, reward: Any = None, judges: list | None = None, floor: float = 0.0
    ) -> None:
        name = "judge_constraints"
        if reward is None:
            raise ValueError(f"rewards.{name}.reward: required: the score source being gated")
        self.reward = Source(reward, f"rewards.{name}.reward")
        if not isinstance(judges, (list, tuple)) or not judges:
            raise _bad(name, "judges", "a non-empty list of judges", judges)
        self.judges = [_Judge(j, f"rewards.{name}.judges.{i}") for i, j in enumerate(judges)]
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise _bad(name, "judges", "judges with distinct names (give each a `name`)", names)
        if not _is_number(floor):
            raise _bad(name, "floor", "a finite number", floor)
        self.floor = float(floor)
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        n = len(completions)
        values = [j.source(prompts, completions, columns) for j in self.judges]
        flags_JN = (
            torch.stack([j.flags(v) for j, v in zip(self.judges, values, strict=True)])
            if n
            else torch.zeros(len(self.judges), 0, dtype=torch.bool)
        )
        flagged = flags_JN.any(dim=0)
        keep = [i for i in range(n) if not flagged[i]]
        rewards_N = torch.full((n,), math.nan, dtype=torch.float64)
        if keep:
            sub = _subset(columns, keep, n)
            rewards_N[keep] = self.reward(
                [prompts[i] for i in keep], [completions[i] for i in keep], sub
            )
        out = gate_by_flags_N(rewards_N, flags_JN, self.floor)
        unscored = sum(int(torch.isnan(v).sum()) for v in values)
        self.last_metrics = {
            "judge_constraints/violations": flagged.double().mean().item() if n else 0.0,
            "judge_constraints/unscored": unscored / max(n * len(values), 1),
            **{
                f"judge_constraints/{j.name}/violations": f.double().mean().item() if n else 0.0
                for j, f in zip(self.judges, flags_JN, strict=True)
            },
        }
        return _none_if_nan(out.tolist())


# ---------------------------------------------------------------- posterior_gate (D36)


def posterior_gate_N(
    format_N: torch.Tensor, outcome_N: torch.Tensor, think_N: torch.Tensor, correct_at: float = 1.0
) -> torch.Tensor:
    """Posterior-GRPO's gated process reward ("Posterior-GRPO: Rewarding Reasoning Processes
    in Code Generation", arXiv 2508.05170):

        r = r_fmt + r_outcome + 1[r_outcome >= correct_at]·r_think

    so a wrong answer gets no credit for its reasoning however good it looks. NaN format or
    think scores count 0; a NaN outcome gives NaN. Tensors [N] -> Tensor[N] float64."""
    o = outcome_N.double()
    f = torch.nan_to_num(format_N.double(), nan=0.0)
    t = torch.nan_to_num(think_N.double(), nan=0.0)
    return f + o + torch.where(o >= correct_at, t, torch.zeros_like(t))


@REWARDS.register("posterior_gate")
class PosteriorGate:
    """r = r_fmt + r_outcome + 1[r_outcome >= correct_at]·r_think: reasoning credit only for a
    correct outcome ("Posterior-GRPO: Rewarding Reasoning Processes in Code Generation",
    arXiv 2508.05170).

    `posterior_gate_N`. `outcome`: a score source (default ``{reward: math_accuracy}``);
    `think`: the reasoning-quality source (a process reward model, e.g. ``{kind:
    classifier, path: ...}``, or any registered reward), required, scored only on the
    correct rows; `format`: an optional source added as r_fmt (null: 0). The paper's
    normalization of r_think is unread: give the think source ref_mean / ref_std to put it
    on the outcome's scale. last_metrics: posterior_gate/correct (share), /think (mean over
    the correct rows)."""

    def __init__(
        self, *, think: Any = None, outcome: Any = None, format: Any = None, correct_at: float = 1.0
    ) -> None:
        name = "posterior_gate"
        if think is None:
            raise ValueError(f"rewards.{name}.think: required: the reasoning-quality score source")
        self.think = Source(think, f"rewards.{name}.think")
        self.outcome = Source(
            outcome if outcome is not None else {"reward": "math_accuracy"},
            f"rewards.{name}.outcome",
        )
        self.format = None if format is None else Source(format, f"rewards.{name}.format")
        if not _is_number(correct_at):
            raise _bad(name, "correct_at", "a finite number", correct_at)
        self.correct_at = float(correct_at)
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        n = len(completions)
        outcome_N = self.outcome(prompts, completions, columns)
        format_N = (
            self.format(prompts, completions, columns)
            if self.format is not None
            else torch.zeros(n, dtype=torch.float64)
        )
        correct = [i for i in range(n) if outcome_N[i] >= self.correct_at]
        think_N = torch.zeros(n, dtype=torch.float64)
        if correct:
            sub = _subset(columns, correct, n)
            think_N[correct] = self.think(
                [prompts[i] for i in correct], [completions[i] for i in correct], sub
            )
        out = posterior_gate_N(format_N, outcome_N, think_N, self.correct_at)
        think_ok = think_N[correct][torch.isfinite(think_N[correct])] if correct else think_N[:0]
        self.last_metrics = {
            "posterior_gate/correct": len(correct) / max(n, 1),
            "posterior_gate/think": think_ok.mean().item() if len(think_ok) else 0.0,
        }
        return _none_if_nan(out.tolist())


# ---------------------------------------------------------------- difficulty_scale (D42)


def difficulty_weights_B(
    mean_reward_B: torch.Tensor, hardness_B: torch.Tensor, max_reward: float = 1.0
) -> torch.Tensor:
    """GRPO-S's reward scale per prompt as built here ("Inverse Reinforcement Learning with
    Dynamic Reward Scaling for LLM Alignment" (DR-IRL), arXiv 2503.18991; the paper's exact
    form is unread, this one is ours):

        d_b = h_b · max(0, r_max − mean_G r_b)     data-level hardness × model-level gap
        w_b = d_b / mean_b' d_b'                    (mean weight 1 over the batch's groups)

    Groups with a NaN mean are left out of the mean and get weight 1; all d = 0: every w = 1.
    Tensor[B], Tensor[B] -> Tensor[B] float64."""
    m = mean_reward_B.double()
    d = hardness_B.double() * (max_reward - m).clamp(min=0.0)
    ok = torch.isfinite(d)
    w = torch.ones_like(d)
    if ok.any():
        scale = d[ok].mean()
        if scale > 0:
            w[ok] = d[ok] / scale
    return w


@REWARDS.register("difficulty_scale")
class DifficultyScale:
    """Rewards scaled per prompt by its difficulty, hardness × (max reward − the group's mean)
    ("Inverse Reinforcement Learning with Dynamic Reward Scaling for LLM Alignment", GRPO-S,
    arXiv 2503.18991).

    The form is ours (`difficulty_weights_B`; the paper's is unread): each completion's reward r_i (from `reward`, default
    ``{reward: math_accuracy}``) times its group's w_b, which grows with the data-level
    hardness h_b (the `hardness_column` of the prompt, a number >= 0, e.g. 1 − the cosine
    similarity of the prompt to known-easy references; none: 1) and with the model-level gap
    `max_reward` − mean_G r. A weight constant over a group does not change the group's
    z-scored GRPO advantage: use it with ``advantage: {name: grpo, scale: batch}`` (the
    recipe) or ``scale: none``. last_metrics: difficulty_scale/weight_min, /weight_max."""

    def __init__(
        self, *, reward: Any = None, hardness_column: str | None = None, max_reward: float = 1.0
    ) -> None:
        name = "difficulty_scale"
        self.reward = Source(
            reward if reward is not None else {"reward": "math_accuracy"}, f"rewards.{name}.reward"
        )
        if hardness_column is not None and (
            not isinstance(hardness_column, str) or not hardness_column
        ):
            raise _bad(name, "hardness_column", "a dataset column's name or null", hardness_column)
        if not _is_number(max_reward):
            raise _bad(name, "max_reward", "a finite number", max_reward)
        self.hardness_column = hardness_column
        self.max_reward = float(max_reward)
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def _hardness(self, columns: Mapping[str, Any], rows: list[int]) -> float:
        if self.hardness_column is None:
            return 1.0
        where = f"rewards.difficulty_scale.hardness_column ({self.hardness_column})"
        if self.hardness_column not in columns:
            raise ValueError(f"{where}: no such column in the data")
        value = columns[self.hardness_column][rows[0]]
        if not _is_number(value) or value < 0:
            raise ValueError(f"{where}: row {rows[0]}: a number >= 0, got {value!r}")
        return float(value)

    def __call__(
        self, prompts: list, completions: list, group_index: list | None = None, **columns: Any
    ) -> list[float | None]:
        n = len(completions)
        cols = {**columns, "group_index": group_index} if group_index is not None else columns
        r = self.reward(prompts, completions, cols)
        groups = _group_rows(prompts, group_index)
        means = []
        for rows in groups:
            vals = r[rows]
            vals = vals[torch.isfinite(vals)]
            means.append(vals.mean().item() if len(vals) else math.nan)
        hard = torch.tensor([self._hardness(columns, rows) for rows in groups], dtype=torch.float64)
        w_B = difficulty_weights_B(torch.tensor(means, dtype=torch.float64), hard, self.max_reward)
        out = torch.full((n,), math.nan, dtype=torch.float64)
        for rows, w in zip(groups, w_B.tolist(), strict=True):
            out[rows] = r[rows] * w
        self.last_metrics = {
            "difficulty_scale/weight_min": w_B.min().item() if len(w_B) else 1.0,
            "difficulty_scale/weight_max": w_B.max().item() if len(w_B) else 1.0,
        }
        return _none_if_nan(out.tolist())


# ---------------------------------------------------------------- GRPO-CARE (D35): pure parts


def care_consistency_N(
    answer_logp_NT: torch.Tensor, answer_mask_NT: torch.Tensor, cap: float = 0.95
) -> torch.Tensor:
    """GRPO-CARE's answer consistency ("GRPO-CARE: Consistency-Aware Reinforcement Learning
    for Multimodal Reasoning", arXiv 2506.16141; TencentARC/GRPO-CARE
    ``grpo_trainer_ref_ema.py``): the EMA reference's likelihood of the answer given the
    generated reasoning,

        c_i = min(cap, exp(Σ_t m_it·log π_ref(y_t) / (Σ_t m_it + 1e-6)))

    with m the answer tokens' mask (the tokens after ``<answer>``, before the closing tag).
    Tensor[N, T] log-probs, Tensor[N, T] mask -> Tensor[N] float64."""
    m = answer_mask_NT.double()
    mean = (answer_logp_NT.double() * m).sum(dim=1) / (m.sum(dim=1) + 1e-6)
    return torch.exp(mean).clamp(max=cap)


def care_bonus_BG(
    acc_BG: torch.Tensor,
    consistency_BG: torch.Tensor,
    bonus: float = 0.5,
    margin: float | None = 0.01,
    acc_floor: float = 0.1,
) -> torch.Tensor:
    """GRPO-CARE's consistency bonus (arXiv 2506.16141; the authors' code), per group:

        accurate_i  = acc_i > acc_floor  and  acc_i >= mean_G acc
        consistent_i = c_i >= mean_{accurate} c − margin   (margin None: 0)
        bonus_i = b·acc_i  if accurate_i and consistent_i, else 0

    and the trainer's reward is r_i = acc_i + format_i + bonus_i (GRPO advantage; b = 0.5,
    margin = 0.01). A group without an accurate row gets no bonus. (The authors' code takes
    mean acc over a device's batch, one group per device in their scripts.)
    Tensors [B, G] -> Tensor[B, G] float64."""
    acc = acc_BG.double()
    c = consistency_BG.double()
    accurate = (acc > acc_floor) & (acc >= acc.mean(dim=1, keepdim=True))
    count = accurate.sum(dim=1, keepdim=True)
    mean_c = torch.where(accurate, c, torch.zeros_like(c)).sum(dim=1, keepdim=True) / count.clamp(
        min=1
    )
    consistent = c >= mean_c - (margin or 0.0)
    give = accurate & consistent & (count > 0)
    return torch.where(give, bonus * acc, torch.zeros_like(acc))


@torch.no_grad()
def ema_update_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ, in place, parameter by parameter (GRPO-CARE's EMA
    reference, arXiv 2506.16141: decay 0.995 every 10 steps; the authors' code
    ``param_ema.copy_(torch.lerp(param, param_ema, decay))``); buffers are copied. The two
    modules must have the same parameter names and shapes; decay in [0, 1] (0: a copy)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    src = dict(source.named_parameters())
    tgt = dict(target.named_parameters())
    if src.keys() != tgt.keys():
        missing = sorted(src.keys() ^ tgt.keys())[:3]
        raise ValueError(f"ema_update_: the modules differ in parameters (e.g. {missing})")
    for name, p in tgt.items():
        s = src[name]
        if s.shape != p.shape:
            raise ValueError(f"ema_update_: {name} has shape {tuple(p.shape)} vs {tuple(s.shape)}")
        p.copy_(torch.lerp(s.detach().to(p.dtype), p, decay))
    src_buf = dict(source.named_buffers())
    for name, b in target.named_buffers():
        if name in src_buf and src_buf[name].shape == b.shape:
            b.copy_(src_buf[name])


@REWARDS.register("care_bonus", needs_ema_reference=True)
class CareBonus:
    """GRPO-CARE's consistency bonus as a reward (arXiv 2506.16141): `care_bonus_BG` per group.

    It reads each row's consistency c_i from the `column` column (default
    "care_consistency": `care_consistency_N` of the trainer's EMA reference, which
    `train.ema_reference` turns on; training/ema.py). accuracy: the score source of acc_i (default
    ``{reward: math_accuracy}``; NaN counts 0); bonus b (0.5), margin (0.01), acc_floor
    (0.1) as in the authors' script. The paper's full reward is acc + format + bonus:
    list the accuracy and format rewards beside this one, each with weight 1.
    """

    def __init__(
        self,
        *,
        accuracy: Any = None,
        bonus: float = 0.5,
        margin: float | None = 0.01,
        acc_floor: float = 0.1,
        column: str = "care_consistency",
    ) -> None:
        name = "care_bonus"
        self.accuracy = Source(
            accuracy if accuracy is not None else {"reward": "math_accuracy"},
            f"rewards.{name}.accuracy",
        )
        for key, value in (("bonus", bonus), ("acc_floor", acc_floor)):
            if not _is_number(value):
                raise _bad(name, key, "a finite number", value)
        if margin is not None and not _is_number(margin):
            raise _bad(name, "margin", "a finite number or null", margin)
        self.bonus, self.margin, self.acc_floor = float(bonus), margin, float(acc_floor)
        self.column = column
        self.last_metrics: dict[str, float] = {}
        self.__name__ = name

    def __call__(
        self, prompts: list, completions: list, group_index: list | None = None, **columns: Any
    ) -> list[float | None]:
        if self.column not in columns:
            raise ValueError(
                f"rewards.care_bonus: no {self.column!r} column: the trainer must keep an EMA "
                f"reference of the policy and pass each completion's answer consistency"
            )
        cols = {**columns, "group_index": group_index} if group_index is not None else columns
        acc = torch.nan_to_num(self.accuracy(prompts, completions, cols), nan=0.0)
        c = torch.tensor([float(v) for v in columns[self.column]], dtype=torch.float64)
        out = torch.zeros(len(completions), dtype=torch.float64)
        for rows in _group_rows(prompts, group_index):
            b = care_bonus_BG(
                acc[rows][None], c[rows][None], self.bonus, self.margin, self.acc_floor
            )
            out[rows] = b[0]
        self.last_metrics = {
            "care_bonus/share": (out > 0).double().mean().item() if len(out) else 0.0
        }
        return out.tolist()
