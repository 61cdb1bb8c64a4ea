"""EOC correction settings and the presets' coefficients (docs/DESIGN.md §2 "Correction" and "Judgment").

One formula covers every preset (issue 10, K-history correction): with C_0 the latest computed feature of
an entry (the source step s_0), C_1, C_2, C_3 the ones computed before it (steps s_1 > s_2 > s_3),
D = A[t] − A[s_0] the prior's delta and E = clamp(D / (|A[s_0]| + eps), −1, 1) its trend embedding,

    F̂ = C_0 + α·D + β₁·(C_0 − C_1) + γ·(C_0 ⊙ E) + β₂·(C_1 − C_2) + β₃·(C_2 − C_3)
      = Σ_j w_j·C_j + α·D + γ·(C_0 ⊙ E),   Σ_j w_j = 1,   β_i = −Σ_{j≥i} w_j.

A preset fixes the coefficient tuple (α, β₁, γ[, β₂[, β₃]]) of each reuse entry from the steps it
reads (``EOCConfig.coefficients(step, history)``):

- ``"trend"``       γ = θ (the paper's multiplicative form F·(1 + θ·E)); needs a prior.
- ``"delta"``       α = θ (the prior's mean change added); needs a prior.
- ``"extrapolate"`` β₁ = θ·(t − s_0)/(s_0 − s_1) (this sample's own first-order trend); needs no prior.
- ``"taylorseer"``  TaylorSeer of order O (1..3): :func:`taylorseer_weights`; needs no prior.
- ``"hicache"``     HiCache of order O with scale σ: :func:`hicache_weights`; needs no prior.

``"calibrated"`` has no θ: the coefficients per entry were fitted in closed loop for the schedule at
hand (``eoc_dit.fit_coefficients``) and are stored in the prior, the offline judgment included.

**The forecasters as their authors' code has them** (read in the index of public repositories; the
upstream repositories Shenyi-Z/TaylorSeer and fenglang918/HiCache are not in it, so copies are cited):

- TaylorSeer, ``TaylorSeer-DiT/taylor_utils/__init__.py`` of ywlq/TaylorSeer at 19c6783 (a copy of
  Shenyi-Z/TaylorSeer's DiT code): ``derivative_approximation`` (lines 5-23) runs at every full step:
  ``difference_distance = activated_steps[-1] − activated_steps[-2]`` (line 11), factor_0 = the feature,
  ``factor_{i+1} = (factor_i − previous factor_i) / difference_distance`` for i < max_order while the
  previous list has factor_i (lines 17-21): orders grow by one per computed step. ``taylor_formula``
  (lines 25-38) forecasts ``Σ_i factor_i · x^i / i!`` with ``x = step − activated_steps[-1]`` (line 31).
  Their DiT sampler counts steps DOWN (``current['step'] = i`` over ``range(num_steps)[::-1]``,
  TaylorSeer-DiT's ``diffusion/gaussian_diffusion.py``; ``activated_steps`` starts as ``[49]``,
  ``cache_functions/cache_init.py`` line 26), so both the gaps and x are negative there; factor_i
  carries (−1)^i and x^i too, so the forecast equals the one with steps counted up (ours: t − s_0 > 0,
  s_j − s_{j+1} > 0), exactly (a sign flip is exact in floating point). The gap divides by the
  distance between the LAST TWO computed steps only, whatever order: with the default schedule's
  uneven gaps (1 between the two warm-up steps, N after) factor_2 = ((C_0 − C_1)/N − (C_1 − C_2)/1)/N,
  not a Newton divided difference; :func:`taylorseer_weights` runs that same recursion. So order 1 is
  β₁ = k / (the last gap): k/N in steady state, but k/1 right after the two warm-up steps. Their DiT
  ``sample.py`` defaults to ``--max-order 4`` and ``--interval 4``; orders here stop at 3 (K <= 3).
  diffusers' ``TaylorSeerCacheConfig`` (huggingface/diffusers ``src/diffusers/hooks/taylorseer_cache.py``
  at adebaac, ``TaylorSeerState.update`` / ``predict``) counts steps up and has the same recursion
  (``new_factors[j + 1] = (new_factors[j] − prev) / delta_step``) and forecast
  (``step_offset**order / factorial(order)``); its default ``max_order`` is 1.
- HiCache, ``models/hicache_fast_impl.py`` of yiming-l21/RA-CFGCache at 76359ee (the file HiCache's
  README names as its core implementation): the same factor lists (``derivative_approximation``), and
  ``_hicache_prediction_formula`` forecasts ``F_0 + Σ_{k=1..order} factor_k · (H_k(σ·x) / k!) · σ^k`` with
  the physicists' Hermite polynomials (``_hicache_polynomial``, lines 7-24: H_0 = 1, H_1 = 2y,
  H_{n+1} = 2y·H_n − 2n·H_{n−1}), σ = ``hicache_scale_factor`` (0.5 in ``cache_init``'s "HiCache" mode,
  max_order 1 there) and x = step − last full step, counted up; with fewer factors than the order it
  uses what exists, with none beyond factor_0 it returns F_0. H_k has the parity of k, so the forecast
  is the same with steps counted down. Their code evaluates H_k(σx) in the feature dtype; ours is float64.
- GOC, qiujx0520/GOC_ICCV2025 at bb41784, ``DiT/models/models.py`` ``DiTBlock.forward`` (about lines
  125-165 of the indexed copy): ``thre_dotrend = 1.2``; at the reused steps listed in
  ``dotrend_position = [3, 5, 7, 9]`` (steps counted up from 0, ``gaussian_diffusion.py``
  ``ddim_sample_loop_progressive``) the output is ``reuse + 1.2 · (reuse − reuse_old)``, where reuse and
  reuse_old are the block's outputs at the previous two STEPS, whatever they were (computed or
  themselves reused and corrected), not divided by any gap. Where both previous steps computed this is
  ``"extrapolate"`` with θ = 1.2; under GOC's own schedule (reuse at the odd steps 1..9) reuse_old is
  the corrected output of step t − 2, so the forecast is a recursion over every earlier computed
  step (at step 9 it reaches five computed features, beyond K = 3): not a preset here.
  ``DiT/models/dynamic_models.py`` (the router variant) has ``thre_dotrend = 0.8``.

Where the authors' code starts the differences later: their FLUX/HiCache code updates derivatives only
at steps ``step > first_enhance − 2`` (TaylorSeer-DiT: ``step < num_steps − first_enhance + 1``, the same
with steps counted down). With TaylorSeer-DiT's ``first_enhance = 2`` that is every computed step after
the first, which is what these presets do; with ``first_enhance = 3`` (their FLUX default) and order ≥ 2
their orders restart at step 1, and the forecasts right after warm-up differ from these presets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import eoc_kernels

from .errors import InputTypeError, InputValueError

MODES = ("trend", "delta", "extrapolate", "taylorseer", "hicache", "calibrated")
PRIOR_MODES = ("trend", "delta", "calibrated")
THETA_MODES = ("trend", "delta", "extrapolate")
ORDER_MODES = ("taylorseer", "hicache")
# θ when none is given: the values of the feasibility probe in docs/DESIGN.md §2.
DEFAULT_THETA = {"trend": 0.2, "delta": 1.0, "extrapolate": 1.0}
# Order when none is given: diffusers' TaylorSeerCacheConfig.max_order and HiCache's cache_init default (1).
DEFAULT_ORDER = 1
MAX_ORDER = eoc_kernels.reference.MAX_HISTORY  # K <= 3 history differences per entry
# σ when none is given: HiCache's hicache_scale_factor.
DEFAULT_SIGMA = 0.5
BACKENDS = ("auto",) + eoc_kernels.dispatch.BACKENDS


def _check_number(value, name: str, *, allow_none: bool = False, minimum: float | None = None):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        expected = "a finite number or None" if allow_none else "a finite number"
        raise InputTypeError(f"EOCConfig.{name} must be {expected}, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputValueError(f"EOCConfig.{name} must be >= {minimum}, got {value}")


def coefficient_tuple(alpha: float, betas: Sequence[float], gamma: float) -> tuple[float, ...]:
    """(α, β₁, γ[, β₂[, β₃]]) with the trailing zeros trimmed to length >= 3."""
    betas = tuple(float(b) for b in betas) + (0.0,) * (MAX_ORDER - len(betas))
    coef = [float(alpha), betas[0], float(gamma), betas[1], betas[2]]
    while len(coef) > 3 and coef[-1] == 0.0:
        coef.pop()
    return tuple(coef)


def hermite(n: int, y: float) -> float:
    """The physicists' Hermite polynomial H_n(y): H_0 = 1, H_1 = 2y, H_{n+1} = 2y·H_n − 2n·H_{n−1}
    (HiCache's ``_hicache_polynomial``)."""
    previous, current = 1.0, 2.0 * y
    if n == 0:
        return previous
    for k in range(2, n + 1):
        previous, current = current, 2.0 * y * current - 2.0 * (k - 1) * previous
    return current


def _factor_weights(history: Sequence[int], order: int) -> list[list[float]]:
    """TaylorSeer's factor list at the latest computed step s_0, each factor as weights over C_0..C_m.

    m = min(order, len(history) − 1): orders grow by one per computed step. The recursion runs from
    the oldest step it needs, s_m (factor_0 = C_m), to s_0: at s_j, factor_0 = C_j and
    factor_{i+1} = (factor_i − factor_i of s_{j+1}) / (s_j − s_{j+1}). Factors the older steps also
    had but that no later factor reads are left out (they do not change factor_0..m of s_0)."""
    m = min(order, len(history) - 1)

    def basis(j):
        return [1.0 if i == j else 0.0 for i in range(m + 1)]

    factors = [basis(m)]
    for j in range(m - 1, -1, -1):
        gap = history[j] - history[j + 1]
        updated = [basis(j)]
        for previous in factors:
            updated.append([(a - b) / gap for a, b in zip(updated[-1], previous)])
        factors = updated
    return factors


def taylorseer_weights(step: int, history: Sequence[int], order: int) -> tuple[float, ...]:
    """TaylorSeer's forecast at ``step`` as weights (w_0..w_m) over the computed features C_0..C_m.

    history: the compute steps of the entry, latest first (s_0 = the source step). F̂ = Σ_i factor_i ·
    k^i / i! with k = step − s_0 and the factor lists of :func:`_factor_weights`; m = min(order,
    len(history) − 1), so with one computed feature the forecast is C_0 (plain reuse)."""
    k = step - history[0]
    factors = _factor_weights(history, order)
    return tuple(math.fsum(f[j] * k**i / math.factorial(i) for i, f in enumerate(factors))
                 for j in range(len(factors)))


def hicache_weights(step: int, history: Sequence[int], order: int, sigma: float) -> tuple[float, ...]:
    """HiCache's forecast at ``step`` as weights over C_0..C_m: TaylorSeer's factor lists with
    k^i / i! replaced by H_i(σ·k) · σ^i / i! for i >= 1 (factor_0 keeps weight 1)."""
    k = step - history[0]
    factors = _factor_weights(history, order)
    scales = [1.0] + [hermite(i, sigma * k) / math.factorial(i) * sigma**i for i in range(1, len(factors))]
    return tuple(math.fsum(f[j] * c for f, c in zip(factors, scales)) for j in range(len(factors)))


@dataclass(frozen=True)
class EOCConfig:
    """How reused features are corrected.

    mode: ``"calibrated"`` (the default) | ``"trend"`` | ``"delta"`` | ``"extrapolate"`` | ``"taylorseer"`` |
        ``"hicache"`` (see the module docstring). The one rule for defaults: ``EOCConfig()`` is the
        calibrated mode, and ``apply_eoc(model, schedule, prior)`` without a config uses ``EOCConfig()``
        (without a prior, plain caching); the calibrated mode needs a prior carrying a fit for the schedule.
    theta: the coefficient of the preset's term ("trend", "delta", "extrapolate"); None takes the preset's
        default (``DEFAULT_THETA``).
    order: the forecaster's order O in 1..3 ("taylorseer", "hicache"; None: ``DEFAULT_ORDER`` = 1). An entry
        reads up to O + 1 computed features; with fewer computed so far it uses what exists (orders
        grow by one per computed step, as in TaylorSeer's code).
    sigma: HiCache's Hermite scale σ > 0 ("hicache" only; None: ``DEFAULT_SIGMA`` = 0.5).
    judge_threshold: offline judgment — an entry is corrected only where plain reuse has a calibration
        relative error E||F[t]−F[s]||² / E||F[t]||² above this. Needs a prior when > 0.
    min_gain: offline judgment — and only where the correction lowers the calibration error by at
        least this fraction; None switches the gain test off. Applied only when a prior is given
        (without one there is nothing to measure the gain on); the prior's statistics measure
        corrections with one non-zero coefficient, so a forecaster reading C_2 or C_3 is not gain-tested
        under the default 0 (kept as the preset gives it) and refuses a non-zero min_gain. In mode
        'calibrated' both were applied when the coefficients were fitted and are not applied again.
    token_threshold: online judgment inside the op — a token is corrected only if
        ||corr|| / (||C_0|| + 1e-6) > token_threshold; <= 0 corrects every token.
    backend: op backend, ``"auto"`` or a name from ``eoc_kernels.dispatch.BACKENDS``.
    """

    mode: str = "calibrated"
    theta: float | None = None
    judge_threshold: float = 0.0
    min_gain: float | None = 0.0
    token_threshold: float = 0.0
    backend: str = "auto"
    order: int | None = None
    sigma: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputValueError(f"EOCConfig.mode must be one of {MODES}, got {self.mode!r}")
        _check_number(self.theta, "theta", allow_none=True)
        if self.theta is not None and self.mode not in THETA_MODES:
            what = "its coefficients are fitted" if self.mode == "calibrated" else "its coefficients come from order"
            raise InputValueError(f"EOCConfig.theta has no meaning in mode {self.mode!r} ({what})")
        if self.order is not None:
            if isinstance(self.order, bool) or not isinstance(self.order, int):
                raise InputTypeError(f"EOCConfig.order must be an int or None, got {self.order!r}")
            if self.mode not in ORDER_MODES:
                raise InputValueError(f"EOCConfig.order has no meaning in mode {self.mode!r} "
                                      f"(only in {', '.join(map(repr, ORDER_MODES))})")
            if not 1 <= self.order <= MAX_ORDER:
                raise InputValueError(f"EOCConfig.order must be in 1..{MAX_ORDER} (an entry reads at most "
                                      f"{MAX_ORDER + 1} computed features), got {self.order}")
        if self.sigma is not None:
            _check_number(self.sigma, "sigma")
            if self.mode != "hicache":
                raise InputValueError(f"EOCConfig.sigma has no meaning in mode {self.mode!r} (only in 'hicache')")
            if self.sigma <= 0:
                raise InputValueError(f"EOCConfig.sigma must be > 0, got {self.sigma}")
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
        if self.mode not in THETA_MODES:
            raise InputValueError(f"mode {self.mode!r} has no θ")
        return DEFAULT_THETA[self.mode] if self.theta is None else float(self.theta)

    @property
    def effective_order(self) -> int:
        if self.mode not in ORDER_MODES:
            raise InputValueError(f"mode {self.mode!r} has no order")
        return DEFAULT_ORDER if self.order is None else self.order

    @property
    def effective_sigma(self) -> float:
        if self.mode != "hicache":
            raise InputValueError(f"mode {self.mode!r} has no sigma")
        return DEFAULT_SIGMA if self.sigma is None else float(self.sigma)

    @property
    def max_history(self) -> int:
        """The largest history index i (C_i) a preset entry may read: 0 (C_0 only) for "trend" and
        "delta", 1 for "extrapolate", the order for "taylorseer" / "hicache". Not for 'calibrated'."""
        if self.mode == "calibrated":
            raise InputValueError("mode 'calibrated' reads what its fit reads")
        if self.mode in ORDER_MODES:
            return self.effective_order
        return 1 if self.mode == "extrapolate" else 0

    def history_weights(self, step: int, history: Sequence[int]) -> tuple[float, ...]:
        """The preset's forecast of a reuse entry at ``step`` as weights (w_0, ..., w_m) over the computed
        features C_0..C_m (Σ w = 1), from ``history``, the entry's compute steps latest first (at least
        one). The prior terms (α, γ) are not part of it. Not for mode 'calibrated'."""
        history = _check_history(step, history)
        if self.mode == "taylorseer":
            return taylorseer_weights(step, history, self.effective_order)
        if self.mode == "hicache":
            return hicache_weights(step, history, self.effective_order, self.effective_sigma)
        betas = self.coefficients(step, history)[1:2]
        return eoc_kernels.reference.history_weights(betas if betas != (0.0,) else ())

    def coefficients(self, step: int, history: Sequence[int]) -> tuple[float, ...]:
        """(α, β₁, γ[, β₂[, β₃]]) of this preset for a reuse entry at ``step`` whose compute steps so far are
        ``history``, latest first (history[0] = the source step; at least one, every one < step, strictly
        decreasing). Trailing zeros are trimmed to length 3. Not for mode 'calibrated'.

        "extrapolate" gives β₁ = θ·(t − s_0)/(s_0 − s_1), computed as that expression (so a P = 3 run is
        bit-identical to the three-term presets), and zeros with one computed feature; "taylorseer" and
        "hicache" convert their weights with ``eoc_kernels.reference.history_coefficients``
        (β_i = −Σ_{j≥i} w_j)."""
        if self.mode == "calibrated":
            raise InputValueError("mode 'calibrated' has no preset coefficients (they are fitted)")
        history = _check_history(step, history)
        if self.mode in ORDER_MODES:
            betas = eoc_kernels.reference.history_coefficients(list(self.history_weights(step, history)))
            return coefficient_tuple(0.0, betas, 0.0)
        theta = self.effective_theta
        if self.mode == "delta":
            return (theta, 0.0, 0.0)
        if self.mode == "trend":
            return (0.0, 0.0, theta)
        if len(history) < 2:  # extrapolation needs two computed features
            return (0.0, 0.0, 0.0)
        source, previous = history[0], history[1]
        return (0.0, theta * (step - source) / (source - previous), 0.0)


def _check_history(step: int, history: Sequence[int]) -> tuple[int, ...]:
    history = tuple(history)
    if not history:
        raise InputValueError(f"a reuse entry at step {step} needs at least one computed step before it")
    if not history[0] < step or any(a <= b for a, b in zip(history, history[1:])):
        raise InputValueError(f"history must be compute steps before step {step}, latest first "
                              f"(strictly decreasing), got {history}")
    return history
