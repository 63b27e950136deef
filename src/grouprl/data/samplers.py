"""Prompt samplers with per-prompt state: which prompts a step trains on (`data.sampler`).

Every sampler keeps the shuffled-epoch cursor of `PromptSampler` (the `uniform` sampler)
and adds tables indexed by dataset row: what the rollouts of each prompt scored so far.
The collector calls `next(n)` for a step's prompts and, once they are scored,
`update(indices, rewards_BG)`, in that order, in the synchronous loop and with
`train.async: one_step` alike (there the scores come from one-step-older weights, so a
scoring sampler's draws can differ from the synchronous run's). Randomness comes from
numpy generators seeded by (seed, draw count), never from a global RNG, so a run is
reproducible and every process of a distributed run (which all see the all-gathered
batch) draws the same prompts. `state_dict` holds the cursor, the tables and the draw
count: a resumed run draws exactly the prompts an uninterrupted one would have.

A rollout is a *success* when its combined reward is >= `success_at` (default 1.0: the
accuracy rewards of the built-in tasks); NaN rewards (unscorable) count for nothing.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np
from torch import Tensor

from grouprl.data.sampler import PromptSampler
from grouprl.registry import Registry

SAMPLERS: Registry = Registry("sampler")
SAMPLERS.register("uniform")(PromptSampler)

# Per-prompt tables every scored sampler keeps (float64, one entry per dataset row).
_TABLES = ("n_rollouts", "n_success", "last_pass", "last_seen")


def _json_list(values: np.ndarray) -> list[float | None]:
    """A float array as a JSON list (the data cursor is saved every step): NaN is not JSON,
    so NaN entries (rows never seen) become None."""
    out: list[float | None] = values.tolist()
    for i in np.flatnonzero(np.isnan(values)).tolist():
        out[i] = None
    return out


def _check(name: str, key: str, ok: bool, want: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"data.sampler.{key}: {name} needs {want}, got {value!r}")


class ScoredSampler(PromptSampler):
    """Base of the samplers that learn from scores (not registered itself).

    Tables, per dataset row: n_rollouts (scored rollouts so far), n_success, last_pass (the
    pass rate of the prompt's latest group; NaN when never seen), last_seen (the update
    index of that group; −1). Subclasses add their own tables in `extra_tables` and choose
    prompts in `choose(n, rng)`.
    """

    name = "scored"
    extra_tables: tuple[str, ...] = ()

    def __init__(
        self, size: int, seed: int = 0, shuffle: bool = True, *, success_at: float = 1.0
    ) -> None:
        super().__init__(size, seed=seed, shuffle=shuffle)
        _check(self.name, "success_at", math.isfinite(success_at), "a finite number", success_at)
        self.success_at = float(success_at)
        self.tables: dict[str, np.ndarray] = {}
        for key in _TABLES + self.extra_tables:
            self.tables[key] = np.zeros(size, dtype=np.float64)
        self.tables["last_pass"][:] = np.nan
        self.tables["last_seen"][:] = -1.0
        self.updates = 0  # update() calls so far
        self.draws = 0  # next() calls so far (seeds the draw)
        self._last: dict[str, float] = {}  # metrics of the latest draw / update

    # -------------------------------------------------------------- the protocol
    def next(self, n: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.draws, 0x5A3])
        self.draws += 1
        if n >= self.size:  # every prompt (and repeats): nothing to choose
            return super().next(n)
        return [int(i) for i in self.choose(n, rng)]

    def choose(self, n: int, rng: np.random.Generator) -> list[int]:
        raise NotImplementedError

    def update(self, indices: list[int], rewards_BG: Tensor) -> None:
        """Record the scored groups of `indices` (one row of rewards_BG per prompt)."""
        r_BG = rewards_BG.detach().double().cpu().numpy()
        if r_BG.shape[0] != len(indices):
            raise ValueError(f"sampler update: {len(indices)} prompts but {r_BG.shape[0]} groups")
        t = self.tables
        zero_std = 0
        for i, r_G in zip(indices, r_BG, strict=True):
            r_G = r_G[~np.isnan(r_G)]
            if r_G.size == 0:
                continue
            s_G = (r_G >= self.success_at).astype(np.float64)
            zero_std += int(r_G.max() == r_G.min())
            t["n_rollouts"][i] += s_G.size
            t["n_success"][i] += s_G.sum()
            t["last_pass"][i] = s_G.mean()
            self.observe(int(i), s_G)
            t["last_seen"][i] = self.updates
        self.updates += 1
        self._last["sampler/zero_std_groups"] = zero_std / max(len(indices), 1)
        self._last["sampler/seen_frac"] = float((t["last_seen"] >= 0).mean())

    def observe(self, i: int, success_G: np.ndarray) -> None:
        """A subclass's own bookkeeping for prompt i's new group (0/1 per rollout)."""

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    # -------------------------------------------------------------- helpers
    def weighted(
        self, weights: np.ndarray, k: int, rng: np.random.Generator, *, replace: bool = False
    ) -> list[int]:
        """k rows drawn ∝ weights (without replacement unless asked; rows of weight 0 are
        never drawn unless nothing else is left). Records the distribution's entropy."""
        w = np.clip(np.nan_to_num(weights, nan=0.0), 0.0, None)
        total = w.sum()
        p = w / total if total > 0 else np.full(len(w), 1.0 / len(w))
        nz = p[p > 0]
        self._last["sampler/entropy"] = float(-(nz * np.log(nz)).sum() / math.log(max(len(p), 2)))
        if k <= 0:
            return []
        if not replace and k > int((p > 0).sum()):
            # too few positive weights: take them all, fill uniformly from the rest
            first = [int(i) for i in np.flatnonzero(p > 0)]
            rest = np.setdiff1d(np.arange(len(p)), first)
            return first + [int(i) for i in rng.choice(rest, k - len(first), replace=False)]
        return [int(i) for i in rng.choice(len(p), size=k, replace=replace, p=p)]

    def uniform_fill(self, chosen: list[int], k: int) -> list[int]:
        """k more rows from the shuffled cursor, skipping rows already chosen this step."""
        taken, out = set(chosen), []
        for _ in range(2 * self.size):  # the cursor repeats every epoch; bounded anyway
            if len(out) >= k:
                break
            i = super().next(1)[0]
            if i not in taken:
                out.append(i)
                taken.add(i)
        return out

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            sampler=self.name,
            updates=self.updates,
            draws=self.draws,
            tables={k: _json_list(v) for k, v in self.tables.items()},
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("sampler") != self.name:
            raise ValueError(
                f"the checkpoint's prompt sampler is {state.get('sampler', 'uniform')!r}, "
                f"data.sampler is {self.name!r}; resume with the same data.sampler"
            )
        self.updates, self.draws = int(state["updates"]), int(state["draws"])
        for key in self.tables:
            self.tables[key] = np.array(state["tables"][key], dtype=np.float64)  # None -> NaN

    # -------------------------------------------------------------- shared estimates
    def pass_rate(self, prior: float) -> np.ndarray:
        """Latest pass rate per row; `prior` for rows never seen."""
        p = self.tables["last_pass"].copy()
        p[np.isnan(p)] = prior
        return p


@SAMPLERS.register("vas")
class VarianceAwareSampler(ScoredSampler):
    """MMR1's Variance-Aware Sampling (VAS): a share of each batch drawn ∝ reward variance.

    "MMR1: Enhancing Multimodal Reasoning with Variance-Aware Sampling and Open Resources",
    arXiv 2509.21268 (authors' code: verl/curriculum; released config: learnability only).

        OVS_q = p_q (1 − p_q)          p_q = the pass rate of q's latest group
        VPS = min-max normalized OVS over the dataset, refreshed every `update_every` draws
        round(mixture·n) prompts ∝ VPS (no repeats), the rest from the shuffled cursor

    MMR1 estimates p from probe rollouts before training; here p comes from the training
    rollouts, and a prompt never seen scores `unseen` (0.25, the maximum: it is explored).
    The trajectory-diversity term (TDS) is not built (its released weight is 0).
    """

    name = "vas"

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        success_at: float = 1.0,
        mixture: float = 0.5,
        update_every: int = 4,
        unseen: float = 0.25,
    ) -> None:
        super().__init__(size, seed=seed, shuffle=shuffle, success_at=success_at)
        _check("vas", "mixture", 0.0 <= mixture <= 1.0, "a share in [0, 1]", mixture)
        _check("vas", "update_every", update_every >= 1, "an integer >= 1", update_every)
        _check("vas", "unseen", 0.0 <= unseen <= 0.25, "a score in [0, 0.25]", unseen)
        self.mixture, self.update_every, self.unseen = mixture, int(update_every), unseen
        self._vps: np.ndarray | None = None

    def scores(self) -> np.ndarray:
        """VPS per row: min-max normalized p(1 − p)."""
        p = self.tables["last_pass"]
        ovs = np.where(np.isnan(p), self.unseen, p * (1.0 - p))
        lo, hi = ovs.min(), ovs.max()
        return (ovs - lo) / (hi - lo) if hi > lo else np.ones_like(ovs)

    def choose(self, n: int, rng: np.random.Generator) -> list[int]:
        if self._vps is None or (self.draws - 1) % self.update_every == 0:
            self._vps = self.scores()  # refreshed on draws 1, 1 + update_every, ...
        chosen = self.weighted(self._vps, round(self.mixture * n), rng)
        return chosen + self.uniform_fill(chosen, n - len(chosen))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # the snapshot in use is the one of the last refresh: recompute it only if the
        # next draw refreshes anyway; otherwise it must be what was saved
        self._vps = (
            np.array(state["vps"], dtype=np.float64) if state.get("vps") is not None else None
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["vps"] = None if self._vps is None else _json_list(self._vps)
        return state


@SAMPLERS.register("cures")
class CurESSampler(ScoredSampler):
    """CurES: prompts drawn ∝ exp(sqrt(p̂(1 − p̂)) / t) with Beta-mean pass rates.

    "CurES: From Gradient Analysis to Efficient Curriculum Learning for Reasoning LLMs",
    arXiv 2510.01037 (authors' code: epic/epic_sampler.py).

        p̂_q = (n_c + 1) / (n_c + n_w + 2)          Beta(n_c + 1, n_w + 1) mean
        t_q = (n_c + 1) / t_scale                  (t_scale = 0.01 in the code)
        P(q) ∝ exp(sqrt(p̂_q (1 − p̂_q)) / t_q), drawn without replacement within an epoch

    With the code's t_scale the weights stay within 0.5% of each other (t ≥ 100): the
    sampler is nearly uniform, as the released code is. A larger t_scale sharpens it.
    The rollout-count allocation is `cures_alloc`.
    """

    name = "cures"
    extra_tables = ("used",)  # 1 when the row was drawn in the current epoch

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        success_at: float = 1.0,
        t_scale: float = 0.01,
    ) -> None:
        super().__init__(size, seed=seed, shuffle=shuffle, success_at=success_at)
        _check("cures", "t_scale", t_scale > 0, "a number > 0", t_scale)
        self.t_scale = float(t_scale)

    def probabilities(self) -> np.ndarray:
        t = self.tables
        n_c, n_w = t["n_success"], t["n_rollouts"] - t["n_success"]
        p_hat = (n_c + 1.0) / (n_c + n_w + 2.0)
        score = np.exp(np.sqrt(p_hat * (1.0 - p_hat)) / ((n_c + 1.0) / self.t_scale))
        return score / score.sum()

    def choose(self, n: int, rng: np.random.Generator) -> list[int]:
        used = self.tables["used"]
        if (used == 0).sum() < n:  # as the code: a new epoch when too few rows are left
            used[:] = 0.0
        chosen = self.weighted(np.where(used == 0, self.probabilities(), 0.0), n, rng)
        used[chosen] = 1.0
        return chosen


@SAMPLERS.register("vade")
class VADESampler(ScoredSampler):
    """VADE: Thompson sampling of Beta posteriors for prompts of maximal p(1 − p).

    "VADE: Variance-Aware Dynamic Sampling via Online Sample-Level Difficulty Estimation",
    arXiv 2511.18902 (abstract and project page; no code: the form below is a reading).

        after a group: α_q += #success, β_q += #failure
        decay toward the prior Beta(α0, β0) by γ per update since q was last touched:
            α_q ← γ^Δ α_q + (1 − γ^Δ) α0   (stale prompts forget more)
        draw p̃_q ~ Beta(α_q, β_q) for a pool of pool_factor·n uniformly drawn prompts,
        keep the n with the largest p̃(1 − p̃)
    """

    name = "vade"
    extra_tables = ("alpha", "beta", "touched")

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        success_at: float = 1.0,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        decay: float = 0.99,
        pool_factor: float = 4.0,
    ) -> None:
        super().__init__(size, seed=seed, shuffle=shuffle, success_at=success_at)
        _check("vade", "prior_alpha", prior_alpha > 0, "a number > 0", prior_alpha)
        _check("vade", "prior_beta", prior_beta > 0, "a number > 0", prior_beta)
        _check("vade", "decay", 0.0 < decay <= 1.0, "a factor in (0, 1]", decay)
        _check("vade", "pool_factor", pool_factor >= 1.0, "a factor >= 1", pool_factor)
        self.a0, self.b0, self.decay, self.pool_factor = prior_alpha, prior_beta, decay, pool_factor
        self.tables["alpha"][:] = prior_alpha
        self.tables["beta"][:] = prior_beta

    def posterior(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(α, β) of `rows`, decayed to now (the current update count)."""
        t = self.tables
        lam = self.decay ** (self.updates - t["touched"][rows])
        a = lam * t["alpha"][rows] + (1.0 - lam) * self.a0
        b = lam * t["beta"][rows] + (1.0 - lam) * self.b0
        return a, b

    def observe(self, i: int, success_G: np.ndarray) -> None:
        a, b = self.posterior(np.array([i]))
        self.tables["alpha"][i] = a[0] + success_G.sum()
        self.tables["beta"][i] = b[0] + (1.0 - success_G).sum()
        # the new counts count from the next update on
        self.tables["touched"][i] = self.updates + 1

    def choose(self, n: int, rng: np.random.Generator) -> list[int]:
        pool = rng.choice(
            self.size, size=min(self.size, math.ceil(self.pool_factor * n)), replace=False
        )
        a, b = self.posterior(pool)
        p = rng.beta(a, b)
        order = np.argsort(-(p * (1.0 - p)), kind="stable")
        self._last["sampler/pool_info_mean"] = float((p * (1 - p))[order[:n]].mean())
        return [int(i) for i in pool[order[:n]]]


@SAMPLERS.register("spo_priority")
class SPOPrioritySampler(ScoredSampler):
    """SPO's prioritized sampling: prompts of a loaded batch redrawn ∝ sqrt(p̂(1 − p̂)) + 0.05.

    "Single-stream Policy Optimization", arXiv 2509.13232 (authors' code: volcengine/verl
    recipe/spo, `fit`). p̂ = α/(α + β) from a discounted Beta tracker per prompt, the one the
    `single_stream` estimator keeps (same prior and ρ; its own copy):

        α ← ρ·α + #success,  β ← ρ·β + #failure        prior Beta(0.5, 0.5), ρ = 0.9
        w_q = sqrt(p̂_q (1 − p̂_q)) + floor              floor = 0.05
        load pool_factor·n prompts from the shuffled cursor; draw n of them ∝ w
        (with replacement, as the code)
    """

    name = "spo_priority"
    extra_tables = ("alpha", "beta")

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        success_at: float = 1.0,
        rho: float = 0.9,
        prior_alpha: float = 0.5,
        prior_beta: float = 0.5,
        floor: float = 0.05,
        pool_factor: float = 1.0,
        replacement: bool = True,
    ) -> None:
        super().__init__(size, seed=seed, shuffle=shuffle, success_at=success_at)
        _check("spo_priority", "rho", 0.0 < rho <= 1.0, "a factor in (0, 1]", rho)
        _check("spo_priority", "prior_alpha", prior_alpha > 0, "a number > 0", prior_alpha)
        _check("spo_priority", "prior_beta", prior_beta > 0, "a number > 0", prior_beta)
        _check("spo_priority", "floor", floor >= 0, "a number >= 0", floor)
        _check("spo_priority", "pool_factor", pool_factor >= 1.0, "a factor >= 1", pool_factor)
        self.rho, self.floor, self.pool_factor = rho, floor, pool_factor
        self.replacement = bool(replacement)
        self.tables["alpha"][:] = prior_alpha
        self.tables["beta"][:] = prior_beta

    def weights(self, rows: np.ndarray) -> np.ndarray:
        a, b = self.tables["alpha"][rows], self.tables["beta"][rows]
        p = a / (a + b)
        return np.sqrt(p * (1.0 - p)) + self.floor

    def observe(self, i: int, success_G: np.ndarray) -> None:
        t = self.tables
        t["alpha"][i] = self.rho * t["alpha"][i] + success_G.sum()
        t["beta"][i] = self.rho * t["beta"][i] + (1.0 - success_G).sum()

    def choose(self, n: int, rng: np.random.Generator) -> list[int]:
        pool = np.array(PromptSampler.next(self, min(self.size, math.ceil(self.pool_factor * n))))
        picks = self.weighted(self.weights(pool), n, rng, replace=self.replacement)
        return [int(pool[j]) for j in picks]


@SAMPLERS.register("hard_mining")
class HardMiningSampler(ScoredSampler):
    """Fleming-R1's adaptive hard-sample mining: after a first pass, persistent failures
    are drawn `factor` times as often.

    "Fleming-R1: Toward Expert-Level Medical Reasoning via Reinforcement Learning", arXiv
    2509.15279 (abstract: a second RLVR stage mines hard samples adaptively; the rule below
    is a reading).

        stage 1 (the first `after_epochs` epochs): the shuffled cursor
        stage 2: P(q) ∝ factor if q's running pass rate n_success/n_rollouts < threshold,
                 else 1 (prompts never seen count as hard); no repeats within a step
    """

    name = "hard_mining"

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        success_at: float = 1.0,
        threshold: float = 0.3,
        factor: float = 4.0,
        after_epochs: float = 1.0,
    ) -> None:
        super().__init__(size, seed=seed, shuffle=shuffle, success_at=success_at)
        _check(
            "hard_mining", "threshold", 0.0 < threshold <= 1.0, "a pass rate in (0, 1]", threshold
        )
        _check("hard_mining", "factor", factor >= 1.0, "a factor >= 1", factor)
        _check("hard_mining", "after_epochs", after_epochs >= 0, "a number >= 0", after_epochs)
        self.threshold, self.factor, self.after_epochs = threshold, factor, after_epochs

    def hard(self) -> np.ndarray:
        t = self.tables
        running = np.where(
            t["n_rollouts"] > 0, t["n_success"] / np.maximum(t["n_rollouts"], 1), 0.0
        )
        return running < self.threshold

    def choose(self, n: int, rng: np.random.Generator) -> list[int]:
        if self.progress < self.after_epochs:
            return PromptSampler.next(self, n)
        hard = self.hard()
        self._last["sampler/hard_frac"] = float(hard.mean())
        return self.weighted(np.where(hard, self.factor, 1.0), n, rng)


def knapsack_value(n: int, p: float) -> float:
    """Value of n rollouts of a prompt of pass rate p: P(the group has signal) × p(1 − p)²
    (Knapsack RL, arXiv 2509.25849: probability of a non-zero gradient times its information)."""
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def knapsack_allocation(
    p_B: list[float | None], total: int, *, default_n: int, min_n: int, max_n: int
) -> list[int]:
    """Rollouts per prompt, summing to `total` exactly (Knapsack RL, arXiv 2509.25849).

    p_B: each prompt's estimated pass rate, None when unknown (never seen).
        unknown prompts: default_n (the homogeneous G, as the paper's first epoch);
        p = 0 or p = 1: min_n (nothing to learn that more rollouts would find);
        0 < p < 1: min_n, plus extra rollouts from a 0/1 knapsack (dynamic programming
        over k = 0..max_n − min_n extra per prompt) that maximizes Σ value(min_n + k, p).
    What the knapsack cannot place (every item at max_n) goes, round robin, to the p = 0
    prompts, then p = 1, then unknown ones, up to max_n each; what is still left goes to
    the p = 0 prompts without a cap (else p ∈ {0, 1}, else every prompt). If the minimums
    exceed `total`, the largest allocations give one back in turn until it fits.
    """
    if not 1 <= min_n <= max_n:
        raise ValueError(f"knapsack: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
    B = len(p_B)
    alloc = [default_n if p is None else min_n for p in p_B]
    items = [b for b, p in enumerate(p_B) if p is not None and 0.0 < p < 1.0]
    budget = total - sum(alloc)
    if budget > 0 and items:
        span = max_n - min_n
        # best[c] = best value with c extra rollouts over the items so far; choice per item
        NEG = float("-inf")
        best = [0.0] + [NEG] * budget
        choices: list[list[int]] = []
        for b in items:
            p = float(p_B[b])  # type: ignore[arg-type]
            gain = [
                knapsack_value(min_n + k, p) - knapsack_value(min_n, p) for k in range(span + 1)
            ]
            new, pick = [NEG] * (budget + 1), [0] * (budget + 1)
            for c in range(budget + 1):
                for k in range(min(span, c) + 1):
                    if best[c - k] == NEG:
                        continue
                    v = best[c - k] + gain[k]
                    if v > new[c] + 1e-15:  # ties: fewer extra rollouts on earlier items
                        new[c], pick[c] = v, k
            best = new
            choices.append(pick)
        c = max(range(budget + 1), key=lambda x: (best[x], -x))  # the best, least spent
        for j in range(len(items) - 1, -1, -1):
            k = choices[j][c]
            alloc[items[j]] += k
            c -= k
        budget = total - sum(alloc)
    order = (
        [b for b, p in enumerate(p_B) if p == 0.0]
        + [b for b, p in enumerate(p_B) if p == 1.0]
        + [b for b, p in enumerate(p_B) if p is None]
        + items
    )
    zeros = [b for b, p in enumerate(p_B) if p == 0.0]
    extremes = zeros + [b for b, p in enumerate(p_B) if p == 1.0]
    # up to max_n first; then, without a cap, to the unsolved prompts (else solved or unsolved
    # ones, else everyone): the paper's rule for a budget larger than every item can use
    for room_of in (
        lambda: [b for b in order if alloc[b] < max_n],
        lambda: zeros or extremes or list(range(B)),
    ):
        while budget > 0:
            room = room_of()
            if not room:
                break
            for b in room:
                if budget == 0:
                    break
                alloc[b] += 1
                budget -= 1
    while budget < 0:  # the minimums did not fit: take back from the largest
        b = max(range(B), key=lambda i: (alloc[i], -i))
        if alloc[b] <= 1:
            raise ValueError(f"knapsack: {B} prompts cannot share {total} rollouts")
        alloc[b] -= 1
        budget += 1
    return alloc


class BudgetSampler(ScoredSampler):
    """Base of the samplers that give each prompt its own number of rollouts (not
    registered itself): prompts in shuffled epochs, `budget(indices, G)` summing to
    len(indices)·G, each between min_n and max_n (`allocate`). Groups of different sizes
    are padded to the largest (`Rollouts.pad_N`: no completion, NaN reward)."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        success_at: float = 1.0,
        min_n: int = 2,
        max_n: int = 32,
    ) -> None:
        super().__init__(size, seed=seed, shuffle=shuffle, success_at=success_at)
        _check(self.name, "min_n", min_n >= 1, "an integer >= 1", min_n)
        _check(self.name, "max_n", max_n >= min_n, f"an integer >= min_n ({min_n})", max_n)
        self.min_n, self.max_n = int(min_n), int(max_n)

    def choose(self, n: int, rng: np.random.Generator) -> list[int]:
        return PromptSampler.next(self, n)

    def allocate(self, indices: list[int], total: int, min_n: int, max_n: int) -> list[int]:
        raise NotImplementedError

    def budget(self, indices: list[int], group_size: int) -> list[int]:
        """Rollouts for each of `indices`, summing to len(indices) × group_size (min_n and
        max_n are widened to include group_size)."""
        alloc = self.allocate(
            indices,
            len(indices) * group_size,
            min(self.min_n, group_size),
            max(self.max_n, group_size),
        )
        self._last["sampler/rollouts_max"] = float(max(alloc))
        self._last["sampler/rollouts_min"] = float(min(alloc))
        return alloc


@SAMPLERS.register("knapsack")
class KnapsackSampler(BudgetSampler):
    """Knapsack RL: prompts drawn in shuffled epochs, rollouts per prompt allocated by a
    knapsack over their estimated pass rates, the step's total kept at B·G.

    "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation", arXiv
    2509.25849 (allocation as in the `sampling_budget_by_knapsack` code found with it).
    A prompt's pass rate is that of its latest group; never-seen prompts get G rollouts.
    See `knapsack_allocation`.
    """

    name = "knapsack"

    def allocate(self, indices: list[int], total: int, min_n: int, max_n: int) -> list[int]:
        p = self.tables["last_pass"][indices]
        p_B = [None if math.isnan(x) else float(x) for x in p]
        return knapsack_allocation(
            p_B, total, default_n=total // max(len(indices), 1), min_n=min_n, max_n=max_n
        )


@lru_cache(maxsize=4096)
def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p >= 0.5) of Student's t with `dof` degrees of freedom: closed forms
    for 1 and 2; beyond, bisection on the CDF integrated by Simpson's rule (|error| < 1e-4
    against tables; cached per (p, dof))."""
    if dof < 1:
        raise ValueError(f"t_quantile: dof must be >= 1, got {dof}")
    if not 0.5 <= p < 1.0:
        raise ValueError(f"t_quantile: p must be in [0.5, 1), got {p}")
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    v = float(dof)
    log_c = math.lgamma((v + 1) / 2) - math.lgamma(v / 2) - 0.5 * math.log(v * math.pi)

    def density(x: float) -> float:
        return math.exp(log_c - (v + 1) / 2 * math.log1p(x * x / v))

    def cdf(t: float, steps: int = 400) -> float:  # 0.5 + ∫_0^t density, Simpson
        h = t / steps
        total = density(0.0) + density(t)
        total += sum((4 if k % 2 else 2) * density(k * h) for k in range(1, steps))
        return 0.5 + total * h / 3

    lo, hi = 0.0, max(4.0, NormalDist().inv_cdf(p) * 4)
    while cdf(hi, steps=2000) < p and hi < 1e6:  # heavy tails at small dof and p near 1
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def ci_half_width(n: int, std: float, alpha: float) -> float:
    """Half-width of the (1 − alpha) Student-t interval of a mean of n samples: t·s/√n."""
    if n < 2:
        return float("inf")
    return t_quantile(1 - alpha / 2, n - 1) * std / math.sqrt(n)


def xrpo_allocation(
    n_B: list[int],
    std_B: list[float],
    total: int,
    *,
    min_n: int,
    max_n: int,
    alpha: float,
    bonus: float,
    seen: int,
) -> list[int]:
    """Rollouts per prompt by XRPO's priority (arXiv 2510.06672, a reading of its reviews).

    n_B: rollouts each prompt has had so far; std_B: the std of its rewards. Every prompt
    gets min_n; each further rollout goes to the prompt of largest priority
        Π_q = [h_q(m) − h_q(m + 1)] + bonus·sqrt(ln(seen + 1) / m),   m = n_q + allocated_q
    with h the Student-t half-width of its mean reward (`ci_half_width`; infinite below 2
    samples: with min_n = 1 never-seen prompts come first; with min_n >= 2 they usually do,
    through their larger half-width and bonus) and at most max_n each. The sum is
    `total` exactly (beyond the caps, round robin).
    """
    B = len(n_B)
    alloc = [min_n] * B
    budget = total - min_n * B
    if budget < 0:
        raise ValueError(f"xrpo_alloc: {B} prompts x min_n {min_n} exceed {total} rollouts")
    log_t = math.log(seen + 1.0)

    def priority(b: int) -> float:
        m = n_B[b] + alloc[b]
        if m < 2:
            return float("inf")
        gain = ci_half_width(m, std_B[b], alpha) - ci_half_width(m + 1, std_B[b], alpha)
        return gain + bonus * math.sqrt(log_t / m)

    while budget > 0:
        room = [b for b in range(B) if alloc[b] < max_n] or list(range(B))
        b = max(room, key=lambda i: (priority(i), -i))
        alloc[b] += 1
        budget -= 1
    return alloc


@SAMPLERS.register("xrpo_alloc")
class XRPOAllocSampler(BudgetSampler):
    """XRPO's rollout allocation: more rollouts where one more rollout narrows the
    uncertainty of a prompt's mean reward the most, plus an exploration bonus.

    "XRPO: Pushing the limits of GRPO with Targeted Exploration and Exploitation", arXiv
    2510.06672 (from its reviews; the authors' code was not available: a reading). The
    paper grants rollouts in phases within a step, re-estimating in between; here the
    estimates come from the rollouts of earlier steps (per prompt: the count and the std
    of its 0/1 successes, sample std; unseen prompts std 0.5) and the allocation is made
    once per step (`xrpo_allocation`). Prompts are drawn in shuffled epochs.
    """

    name = "xrpo_alloc"

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        success_at: float = 1.0,
        min_n: int = 2,
        max_n: int = 32,
        alpha: float = 0.05,
        bonus: float = 0.05,
    ) -> None:
        super().__init__(
            size, seed=seed, shuffle=shuffle, success_at=success_at, min_n=min_n, max_n=max_n
        )
        _check("xrpo_alloc", "alpha", 0 < alpha < 1, "a level in (0, 1)", alpha)
        _check("xrpo_alloc", "bonus", bonus >= 0, "a number >= 0", bonus)
        self.alpha, self.bonus = alpha, bonus

    def allocate(self, indices: list[int], total: int, min_n: int, max_n: int) -> list[int]:
        t = self.tables
        n_B, std_B = [], []
        for i in indices:
            n, k = int(t["n_rollouts"][i]), float(t["n_success"][i])
            p = k / n if n else 0.5
            std_B.append(math.sqrt(p * (1 - p) * n / (n - 1)) if n >= 2 else 0.5)
            n_B.append(n)
        return xrpo_allocation(
            n_B,
            std_B,
            total,
            min_n=min_n,
            max_n=max_n,
            alpha=self.alpha,
            bonus=self.bonus,
            seen=int(t["n_rollouts"].sum()),
        )


def proportional_allocation(
    weight_B: list[float], total: int, *, min_n: int, max_n: int
) -> list[int]:
    """Counts ∝ weight_B summing to `total`, each in [min_n, max_n] (largest remainders;
    all weights 0: an even split). Raises when min_n·B > total."""
    B = len(weight_B)
    if min_n * B > total:
        raise ValueError(f"allocation: {B} prompts x min_n {min_n} exceed {total} rollouts")
    alloc = [min_n] * B
    budget = total - min_n * B
    w = [max(float(x), 0.0) for x in weight_B]
    while budget > 0:
        room = [b for b in range(B) if alloc[b] < max_n] or list(range(B))
        total_w = sum(w[b] for b in room)
        share = {b: (w[b] / total_w if total_w > 0 else 1.0 / len(room)) * budget for b in room}
        give = {
            b: min(int(share[b]), max_n - alloc[b]) if alloc[b] < max_n else int(share[b])
            for b in room
        }
        if sum(give.values()) == 0:  # hand out the remainders one by one, largest first
            for b in sorted(room, key=lambda i: (-(share[i] - int(share[i])), i))[:budget]:
                give[b] = 1
        for b, k in give.items():
            k = min(k, budget)
            alloc[b] += k
            budget -= k
    return alloc


@SAMPLERS.register("cures_alloc")
class CurESAllocSampler(BudgetSampler):
    """CurES's rollout allocation: more rollouts for prompts whose gradient estimate varies
    most, the step's total kept at B·G.

    "CurES: From Gradient Analysis to Efficient Curriculum Learning for Reasoning LLMs",
    arXiv 2510.01037 (authors' code: epic/stage_0_init_difficulty_sample_size.py). The
    paper's count is n_q ∝ σ_q with
        σ_q² = p(1 − p)²·E[g_c²] + p²(1 − p)·E[g_w²] − p²(1 − p)²·(E g_c − E g_w)²
    over the log-prob gradients g of correct and wrong answers. Ours (a reading): with
    equal gradient norms for both (no per-sample gradient is computed), σ_q = sqrt(p(1 − p))
    up to a constant, with p the prompt's pass rate over its rollouts so far (0.5 before
    any; the paper estimates it from probe rollouts). Allocated once per step, at least
    min_n and at most max_n each: prompts always or never solved get min_n.
    """

    name = "cures_alloc"

    def allocate(self, indices: list[int], total: int, min_n: int, max_n: int) -> list[int]:
        t = self.tables
        n = t["n_rollouts"][indices]
        p = np.where(n > 0, t["n_success"][indices] / np.maximum(n, 1.0), 0.5)
        sigma = np.sqrt(p * (1.0 - p))
        return proportional_allocation([float(x) for x in sigma], total, min_n=min_n, max_n=max_n)


def build_sampler(spec: dict[str, Any] | None, size: int, *, seed: int, shuffle: bool) -> Any:
    """The `data.sampler` named by spec ({name: ..., params...}) over `size` prompts."""
    spec = dict(spec or {"name": "uniform"})
    name = spec.pop("name", "uniform")
    for key in ("size", "seed", "shuffle"):
        if key in spec:
            raise ValueError(
                f"data.sampler.{key}: set by the run (train.seed, data.shuffle), not the sampler"
            )
    SAMPLERS.check_params(name, spec, "data.sampler")
    return SAMPLERS.get(name)(size, seed=seed, shuffle=shuffle, **spec)
