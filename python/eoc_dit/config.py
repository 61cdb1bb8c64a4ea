"""EOC correction settings (docs/DESIGN.md §2 "Correction" and "Judgment").

One formula covers every preset: F̂ = Cc + α·D + β·(Cc − Cp) + γ·(Cc ⊙ E), with Cc / Cp this run's
features at the source step s and the compute step p before it, D = A[t] − A[s] the prior's delta and
E = clamp(D / (|A[s]| + eps), −1, 1) its trend embedding. A preset fixes (α, β, γ) from one θ:

- ``"trend"``       γ = θ (the paper's multiplicative form F·(1 + θ·E)); needs a prior.
- ``"delta"``       α = θ (the prior's mean change added); needs a prior.
- ``"extrapolate"`` β = θ·(t − s)/(s − p) (this sample's own first-order trend); needs no prior.

``"calibrated"`` has no θ: (α, β, γ) per entry were fitted in closed loop for the schedule at hand
(``eoc_dit.fit_coefficients``) and are stored in the prior, the offline judgment included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import eoc_kernels

from .errors import InputTypeError, InputValueError

MODES = ("trend", "delta", "extrapolate", "calibrated")
PRIOR_MODES = ("trend", "delta", "calibrated")
# θ when none is given: the values of the feasibility probe in docs/DESIGN.md §2.
DEFAULT_THETA = {"trend": 0.2, "delta": 1.0, "extrapolate": 1.0}
BACKENDS = ("auto",) + eoc_kernels.dispatch.BACKENDS


def _check_number(value, name: str, *, allow_none: bool = False, minimum: float | None = None):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        expected = "a finite number or None" if allow_none else "a finite number"
        raise InputTypeError(f"EOCConfig.{name} must be {expected}, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputValueError(f"EOCConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class EOCConfig:
    """How reused features are corrected.

    mode: ``"calibrated"`` (the default) | ``"trend"`` | ``"delta"`` | ``"extrapolate"`` (see the module
        docstring). The one rule for defaults: ``EOCConfig()`` is the calibrated mode, and
        ``apply_eoc(model, schedule, prior)`` without a config uses ``EOCConfig()`` (without a prior,
        plain caching); the calibrated mode needs a prior carrying a fit for the schedule.
    theta: the coefficient of the preset's term; None takes the preset's default (``DEFAULT_THETA``).
    judge_threshold: offline judgment — an entry is corrected only where plain reuse has a calibration
        relative error E||F[t]−F[s]||² / E||F[t]||² above this. Needs a prior when > 0.
    min_gain: offline judgment — and only where the correction lowers the calibration error by at
        least this fraction; None switches the gain test off. Applied only when a prior is given
        (without one there is nothing to measure the gain on). In mode 'calibrated' both were
        applied when the coefficients were fitted and are not applied again.
    token_threshold: online judgment inside the op — a token is corrected only if
        ||corr|| / (||Cc|| + 1e-6) > token_threshold; <= 0 corrects every token.
    backend: op backend, ``"auto"`` or a name from ``eoc_kernels.dispatch.BACKENDS``.
    """

    mode: str = "calibrated"
    theta: float | None = None
    judge_threshold: float = 0.0
    min_gain: float | None = 0.0
    token_threshold: float = 0.0
    backend: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputValueError(f"EOCConfig.mode must be one of {MODES}, got {self.mode!r}")
        _check_number(self.theta, "theta", allow_none=True)
        if self.mode == "calibrated" and self.theta is not None:
            raise InputValueError("EOCConfig.theta has no meaning in mode 'calibrated' (its coefficients are fitted)")
        _check_number(self.judge_threshold, "judge_threshold", minimum=0.0)
        _check_number(self.min_gain, "min_gain", allow_none=True)
        _check_number(self.token_threshold, "token_threshold")
        if self.backend not in BACKENDS:
            raise InputValueError(f"EOCConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def needs_prior(self) -> bool:
        return self.mode in PRIOR_MODES

    @property
    def effective_theta(self) -> float:
        if self.mode == "calibrated":
            raise InputValueError("mode 'calibrated' has no θ")
        return DEFAULT_THETA[self.mode] if self.theta is None else float(self.theta)

    def coefficients(self, step: int, source: int, previous: int | None) -> tuple[float, float, float]:
        """(α, β, γ) of this preset for a reuse entry at ``step`` with source step ``source`` and the
        compute step ``previous`` before it (None when there is none). Not for mode 'calibrated'."""
        theta = self.effective_theta
        if self.mode == "delta":
            return (theta, 0.0, 0.0)
        if self.mode == "trend":
            return (0.0, 0.0, theta)
        if previous is None:  # extrapolation needs two computed features
            return (0.0, 0.0, 0.0)
        return (0.0, theta * (step - source) / (source - previous), 0.0)
