"""`entropy_band`: SPINE's entropy-band regularizer on forking tokens (arXiv 2511.17938)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from grouprl.algorithms.regularizers import REGULARIZERS, Regularizer, _check_finite
from grouprl.algorithms.selection import quantile_linear
from grouprl.algorithms.types import PolicyInputs, TermOutput

__all__ = ["EntropyBand"]

SCOPES = ("selected", "all")


@REGULARIZERS.register("entropy_band", needs_entropy_grad=True, calibrates=True)
class EntropyBand(Regularizer):
    """Entropy band on selected tokens, SPINE-style: proposal (only the abstract is known).

    SPINE (Wu et al., arXiv 2511.17938) says only that it adds an entropy-band regularizer
    at forking tokens that keeps exploration going when entropy is too low and damps noisy
    supervision when it is too high. The form here is grouprl's own proposal (a squared
    hinge outside a band calibrated from the batch's entropy percentiles), not the authors'
    code:

        per_token = coef · [relu(h_lo − H)² + relu(H − h_hi)²]   on selected tokens,
                    0                                           elsewhere,

    with H the policy's entropy at that position WITH gradient (needs_entropy_grad makes
    the trainer pass it undetached), so the term pushes H back into [h_lo, h_hi].
    Selected tokens: with scope="selected", completion tokens (mask != 0) whose token
    weight is > 0 (the forking-token mask); with scope="all", or when the batch has no
    token weights, every completion token. Padding is always 0.

    Bounds: `low` / `high` when given (fixed). A bound left None is set ONCE from the
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
        high_pct: float = 90.0,
        scope: str = "selected",
    ) -> None:
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
        """Whether both bounds are known (fixed or calibrated)."""
        return self.low is not None and self.high is not None

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
        low, high = float(self.low), float(self.high)  # type: ignore[arg-type]
        stats["entropy_band/low"] = low
        stats["entropy_band/high"] = high
        # Unselected positions (padding may hold any value) see H = low: zero penalty and
        # a zero, finite gradient.
        H_sel_NT = H_NT.where(sel_NT, torch.full_like(H_NT, low))
        below_NT = (low - H_sel_NT).clamp(min=0.0)
        above_NT = (H_sel_NT - high).clamp(min=0.0)
        per_token_NT = self.coef * (below_NT.square() + above_NT.square())
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
            f"low_pct={self.low_pct}, high_pct={self.high_pct}, scope={self.scope!r})"
        )
