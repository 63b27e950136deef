"""`entropy_band`: SPINE's entropy-band regularizer on forking tokens (arXiv 2511.17938)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from grouprl.algorithms.regularizers import REGULARIZERS, Regularizer, _check_finite
from grouprl.algorithms.selection import quantile_linear, row_quantiles
from grouprl.algorithms.types import PolicyInputs, TermOutput

__all__ = ["EntropyBand"]

SCOPES = ("selected", "all")
BOUNDS = ("per_sample_quantile", "calibrated", "fixed")
PENALTIES = ("hinge", "squared")


@REGULARIZERS.register("entropy_band", needs_entropy_grad=True, calibrates=True)
class EntropyBand(Regularizer):
    """Entropy band on selected tokens, SPINE-style (a reading: no code is public).

    SPINE (Wu et al., "SPINE: Token-Selective Test-Time Reinforcement Learning with
    Entropy-Band Regularization", arXiv 2511.17938) adds an entropy-band regularizer at
    forking tokens that keeps exploration going when entropy is too low and damps noisy
    supervision when it is too high. A detailed survey entry written from the paper gives
    the form built by default (`bounds: per_sample_quantile`, `penalty: hinge`):

        per sample i, over its selected tokens: h_lo,i = 10% quantile of sg(H),
                                                h_hi,i = 50% quantile (the median)
        per_token = coef · [relu(h_lo,i − H) + relu(H − h_hi,i)]   on selected tokens,
                    0                                             elsewhere,

    recomputed every step from the detached entropies (no tuning, no state). The earlier
    build's form stays available: `bounds: calibrated` (batch percentiles low_pct /
    high_pct = 10 / 90 of the first batch, then frozen), `bounds: fixed` (`low`, `high`),
    and `penalty: squared` (relu(·)²).

    with H the policy's entropy at that position WITH gradient (needs_entropy_grad makes
    the trainer pass it undetached), so the term pushes H back into [h_lo, h_hi].
    Selected tokens: with scope="selected", completion tokens (mask != 0) whose token
    weight is > 0 (the forking-token mask); with scope="all", or when the batch has no
    token weights, every completion token. Padding is always 0.

    Bounds with `calibrated`: `low` / `high` when given (fixed). A bound left None is set ONCE from the
    distribution of H over the selected tokens of the first batch, its `low_pct` / `high_pct`
    percentile (linear interpolation, as torch.quantile), and then frozen (a calibrated
    bound that would cross a fixed one is set equal to it). The trainer calls
    regularizers per micro-batch, so it should call `calibrate(entropy_NT, mask_NT,
    token_weight_NT)` on the whole optimizer batch before the update while
    `needs_calibration` is True (i.e. once, on the first batch); if it never
    does, the first `__call__` calibrates on its own input (the first micro-batch only).
    `state_dict()` / `load_state_dict()` carry the calibrated bounds across a resume.

    The trainer's aggregation divides the summed term by its normalizer (with token_mean:
    all completion tokens), so the loss is λ·Σ_selected penalty / Σ mask, not the note's
    mean over the selected tokens; the two differ by the selected fraction (ρ = 0.2 for
    forking tokens: scale coef by 1/ρ to match that mean).
    stats (scalars): entropy_band/low, entropy_band/high (once known),
    entropy_band/selected_entropy (mean H over this call's selected tokens; a scalar,
    since the trainer's masked mean of a per-token stat divides by all completion tokens),
    entropy_band/selected_frac (selected / completion tokens in this call).
    stats_NT (per token 0/1, so their logged mean is a fraction of ALL completion tokens):
    entropy_band/below_frac (selected and H < h_lo), entropy_band/above_frac (selected and
    H > h_hi).
    """

    def __init__(
        self,
        *,
        coef: float = 0.01,
        low: float | None = None,
        high: float | None = None,
        low_pct: float = 10.0,
        high_pct: float | None = None,
        scope: str = "selected",
        bounds: str = "per_sample_quantile",
        penalty: str = "hinge",
    ) -> None:
        if bounds not in BOUNDS:
            raise ValueError(
                f"entropy_band.bounds must be one of {', '.join(BOUNDS)}; got {bounds!r}"
            )
        if penalty not in PENALTIES:
            raise ValueError(
                f"entropy_band.penalty must be one of {', '.join(PENALTIES)}; got {penalty!r}"
            )
        if bounds == "per_sample_quantile" and (low is not None or high is not None):
            raise ValueError(
                "entropy_band.low/high: fixed bounds need bounds: fixed (or calibrated); "
                "per_sample_quantile computes them per sample"
            )
        if bounds == "fixed" and (low is None or high is None):
            raise ValueError("entropy_band.bounds: fixed needs both low and high")
        self.bounds, self.penalty = bounds, penalty
        if high_pct is None:  # the median per sample; the 90th percentile of a batch
            high_pct = 50.0 if bounds == "per_sample_quantile" else 90.0
        self.coef = _check_finite("entropy_band.coef", coef)
        if self.coef < 0:
            raise ValueError(f"entropy_band.coef must be >= 0, got {coef}")
        self.fixed_low = None if low is None else _check_finite("entropy_band.low", low)
        self.fixed_high = None if high is None else _check_finite("entropy_band.high", high)
        if self.fixed_low is not None and self.fixed_high is not None:
            if self.fixed_low > self.fixed_high:
                raise ValueError(f"entropy_band: need low <= high, got low={low}, high={high}")
        self.low_pct = _check_finite("entropy_band.low_pct", low_pct)
        self.high_pct = _check_finite("entropy_band.high_pct", high_pct)
        if not 0.0 <= self.low_pct <= self.high_pct <= 100.0:
            raise ValueError(
                f"entropy_band: need 0 <= low_pct <= high_pct <= 100, got {low_pct}, {high_pct}"
            )
        if scope not in SCOPES:
            raise ValueError(
                f"entropy_band.scope must be one of {', '.join(SCOPES)}; got {scope!r}"
            )
        self.scope = scope
        self.low: float | None = self.fixed_low
        self.high: float | None = self.fixed_high

    @property
    def calibrated(self) -> bool:
        """Whether both bounds are known (fixed or calibrated); per-sample bounds always are."""
        return self.bounds == "per_sample_quantile" or (
            self.low is not None and self.high is not None
        )

    @property
    def needs_calibration(self) -> bool:
        """True until the bounds are known: the trainer then calls `calibrate` on the batch."""
        return not self.calibrated

    def selected(self, mask_NT: Tensor, token_weight_NT: Tensor | None = None) -> Tensor:
        """Bool [N, T]: the tokens the band applies to (see the class docstring)."""
        sel_NT = mask_NT != 0
        if self.scope == "selected" and token_weight_NT is not None:
            sel_NT = sel_NT & (token_weight_NT.detach() > 0)
        return sel_NT

    def calibrate(
        self, entropy_NT: Tensor, mask_NT: Tensor, token_weight_NT: Tensor | None = None
    ) -> tuple[float, float] | None:
        """Set the bounds not given as fixed from the percentiles of H over the selected
        tokens; call once on the whole first batch. A no-op once calibrated (the bounds
        stay frozen) and when no token is selected (nothing to calibrate on yet).
        Returns (low, high), or None while not calibrated."""
        if not self.calibrated:
            sel_NT = self.selected(mask_NT, token_weight_NT)
            values = entropy_NT.detach()[sel_NT].double()
            if values.numel() > 0:
                if self.low is None:
                    self.low = float(quantile_linear(values, self.low_pct / 100.0))
                if self.high is None:
                    self.high = float(quantile_linear(values, self.high_pct / 100.0))
                # A calibrated bound never crosses a fixed one.
                if self.fixed_low is not None:
                    self.high = max(self.high, self.low)
                elif self.fixed_high is not None:
                    self.low = min(self.low, self.high)
        return (self.low, self.high) if self.calibrated else None  # type: ignore[return-value]

    def __call__(self, inp: PolicyInputs) -> TermOutput:
        if inp.entropy_NT is None:
            raise ValueError("entropy_band: needs entropy_NT (with gradient), got None")
        H_NT = inp.entropy_NT
        sel_NT = self.selected(inp.mask_NT, inp.token_weight_NT)
        if not self.calibrated:
            self.calibrate(H_NT, inp.mask_NT, inp.token_weight_NT)
        n_valid = int((inp.mask_NT != 0).sum())
        n_sel = int(sel_NT.sum())
        stats: dict[str, float] = {
            "entropy_band/selected_frac": n_sel / n_valid if n_valid else 0.0
        }
        if n_sel:
            stats["entropy_band/selected_entropy"] = float(H_NT.detach()[sel_NT].mean())
        if not self.calibrated:  # no selected token seen yet: nothing to penalize
            return TermOutput(per_token_NT=torch.zeros_like(H_NT), stats=stats)
        if self.bounds == "per_sample_quantile":
            H_det = H_NT.detach().where(sel_NT, 0.0)  # padding may hold any value
            low_N, has_N = row_quantiles(H_det, sel_NT, self.low_pct / 100.0)
            high_N, _ = row_quantiles(H_det, sel_NT, self.high_pct / 100.0)
            low_NT, high_NT = low_N[:, None].expand_as(H_NT), high_N[:, None].expand_as(H_NT)
            if bool(has_N.any()):
                stats["entropy_band/low"] = float(low_N[has_N].mean())
                stats["entropy_band/high"] = float(high_N[has_N].mean())
        else:
            low_NT = torch.full_like(H_NT, float(self.low))  # type: ignore[arg-type]
            high_NT = torch.full_like(H_NT, float(self.high))  # type: ignore[arg-type]
            stats["entropy_band/low"] = float(self.low)  # type: ignore[arg-type]
            stats["entropy_band/high"] = float(self.high)  # type: ignore[arg-type]
        # Unselected positions (padding may hold any value) see H = low: zero penalty and
        # a zero, finite gradient.
        H_sel_NT = H_NT.where(sel_NT, low_NT.to(H_NT.dtype))
        below_NT = (low_NT - H_sel_NT).relu()  # relu: zero (sub)gradient on the bound
        above_NT = (H_sel_NT - high_NT).relu()
        if self.penalty == "squared":
            per_token_NT = self.coef * (below_NT.square() + above_NT.square())
        else:
            per_token_NT = self.coef * (below_NT + above_NT)
        dtype = H_NT.dtype
        return TermOutput(
            per_token_NT=per_token_NT * sel_NT.to(dtype),
            stats_NT={
                "entropy_band/below_frac": (below_NT.detach() > 0).to(dtype),
                "entropy_band/above_frac": (above_NT.detach() > 0).to(dtype),
            },
            stats=stats,
        )

    def state_dict(self) -> dict[str, Any]:
        """The current bounds (None where not yet calibrated)."""
        return {"low": self.low, "high": self.high}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore calibrated bounds; bounds fixed in the config keep the config's value."""
        for key, fixed in (("low", self.fixed_low), ("high", self.fixed_high)):
            value = state.get(key)
            if fixed is None and value is not None:
                if not math.isfinite(float(value)):
                    raise ValueError(f"entropy_band: saved {key} bound {value!r} is not finite")
                setattr(self, key, float(value))

    def __repr__(self) -> str:
        return (
            f"EntropyBand(coef={self.coef}, low={self.low}, high={self.high}, "
            f"low_pct={self.low_pct}, high_pct={self.high_pct}, scope={self.scope!r}, "
            f"bounds={self.bounds!r}, penalty={self.penalty!r})"
        )
