"""Closed-loop fitting of the EOC coefficients for one schedule: the "calibrated" mode as the best fitted
forecaster (docs/DESIGN.md §2.3; issue 10 item 5).

Every forecaster of the field is linear in an entry's last computed features C_0 (latest) … C_3 and the
prior's terms, so the coefficients c = (α, β₁, γ, β₂, β₃) of

    F̂ = C_0 + α·D + β₁·(C_0 − C_1) + γ·(C_0 ⊙ E) + β₂·(C_1 − C_2) + β₃·(C_2 − C_3)

(the K-history correction) cover TaylorSeer, HiCache, extrapolation and the prior's presets alike. The
fit has three parts, all on calibration pairs:

1. **Anchor.** The best fixed preset for the schedule (``anchors``: plain reuse, extrapolate θ ∈ {0.8,
   1, 1.2}, TaylorSeer and HiCache of order 1..3, trend, delta), chosen by pooled trajectory score
   (``trajectory_score_db``) of the tune pairs: each preset's final samples against the uncached ones.
   Presets whose coefficients coincide on this schedule are scored once; with many presets and enough
   tune pairs, every one is scored on a quarter of the pairs and the best ``ANCHOR_FINALISTS`` on all.
2. **Closed loop, per entry, model selection.** The fitting pairs are sampled as ONE batch under the
   schedule; at every step with a reuse entry the model also runs uncached on that step's input, giving
   the target F* of each entry (the branch output a full forward would produce here). With the
   candidate terms u (those of the slots above that exist for the entry: C_i needs i computes before the
   source, D and E a prior) and r = F* − C_0, a model S (a subset of the slots: the history differences
   nested by order, 0 = none … ``max_order``, each with or without α and γ where ``terms`` allows them)
   has the ridge solution toward the anchor a,

       θ_S = argmin ||P(r − Σ_{j∈S} θ_j u_j)||² + λ·mean(diag G_S)·||θ_S − a_S||²,   G = [<P u_i, P u_j>],

   where P maps the CFG batch to what reaches the guided output, s·cond + (1 − s)·uncond (``guided``).
   Each entry keeps the candidate with the lowest error on HELD-OUT pairs (two folds by the parity of
   the pair's index: fit on one, measure on the other, both ways): plain reuse, the anchor's own
   coefficients, or a fitted model; that is the offline judgment, with ``judge_threshold`` and
   ``min_gain`` on top. The chosen model is refitted on every pair, and the corrected feature (not F*)
   is what the sampler goes on with, so later entries are fitted on the trajectory of the fit.
3. **Trajectory refinement.** One-step-optimal is not trajectory-optimal (the project's study and the
   product owner found it; on the testbed the per-entry fit alone scores below its anchor), so the stored
   coefficients are a + Σ_i φ_i·d_i, moved from the anchor along a few directions d_i
   (``refinement_directions``: the anchor's own correction in each phase of the run, by how many computes
   precede the entry, and the fit's difference θ − a), with φ fitted on the trajectory: Gauss-Newton on
   the tune pairs' final samples against their uncached ones (one finite difference per direction for
   the Jacobian, Levenberg-Marquardt steps over every pixel of every tune sample, a step kept only where
   the pooled trajectory score rises on the tune pairs and on each half of them). φ = 0 is the anchor
   itself and is kept unless a step scores higher, so the fit never scores below its anchor, hence below
   the best preset it was chosen among, on the tune pairs. ``refine="blend"`` instead keeps
   a + g·(θ − a) with g among ``gains`` (a climb over the sorted grid from g = 0 and the value nearest 1);
   ``refine=None`` keeps the fit θ as it is.

What the studies on the testbed's calibration split found (benchmarks/results/calibrated-study-*.md and
calibrated-kfit-*.md): targets from the uncached forward beat targets recomputed on each branch's own
(already wrong) input; the CFG-aware objective P adds a little; the per-entry one-step fit alone scores
below the presets it is anchored on, and the prior's delta, fitted per entry at gain 1, wrecks samples
beyond the fitting batch; but moved along by the trajectory refinement, the fitted prior terms of the
first interval (where only C_0 exists and every preset is plain reuse) are the largest gain at FORA
N ≥ 4, so the default terms are all three.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
from torch import nn

from . import distributed
from .calibration import seed_noise
from .config import EOCConfig
from .errors import InputTypeError, InputValueError
from .executor import StepContext, StepStrategy
from .patching import EOCHandle, apply_eoc, default_adapter
from .planner import history_reads, make_plan, trimmed
from .prior import CoefficientFit, Prior
from .prior_terms import DELTA, TREND
from .schedules import Schedule

TERMS = ("delta", "extrapolate", "trend")  # α, β₁..β_K (the sample's own history), γ
DEFAULT_TERMS = TERMS
MAX_ORDER = 3  # K: history differences C_{i-1} − C_i per entry, i = 1..3
NUM_COEFS = 5  # (α, β₁, γ, β₂, β₃)
BETA_SLOTS = (1, 3, 4)  # the slots of β₁, β₂, β₃ in the coefficient vector
PRIOR_SLOTS = {"delta": 0, "trend": 2}
#: Candidate blends g of (fitted − anchor); 0 is the anchor itself and is always a candidate.
DEFAULT_GAINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
#: The fixed presets the anchor is chosen among (None = plain reuse); by default those whose prior terms are
#: among the fit's ``terms`` (``default_anchors``).
DEFAULT_ANCHORS = (None,
                   EOCConfig(mode="extrapolate", theta=0.8), EOCConfig(mode="extrapolate", theta=1.0),
                   EOCConfig(mode="extrapolate", theta=1.2),
                   *(EOCConfig(mode="taylorseer", order=o) for o in (1, 2, 3)),
                   *(EOCConfig(mode="hicache", order=o, sigma=0.5) for o in (1, 2, 3)),
                   EOCConfig(mode="trend"), EOCConfig(mode="delta"))
JUDGED = "plain (judged)"  # the model of an entry the offline judgment turns off
ANCHOR_FINALISTS = 3  # presets scored on every tune pair after a first round on a quarter of them
REFINEMENTS = ("gauss-newton", "blend", None)
BRANCH_NAMES = ("attn", "mlp")
REFINE_SPLITS = ("phase", "phase-block", "phase-block-branch")  # the refinement's directions (refinement_directions)
REFINE_STEP = 0.5  # the finite-difference step of each refinement direction's weight
REFINE_ITERATIONS = 2
REFINE_DAMPING = 1e-3  # Marquardt's λ, relative to the diagonal of JᵀJ
REFINE_MAX_MOVE = 3.0  # the largest change of one weight per step
REFINE_NEGLIGIBLE = 1e-6  # a direction whose JᵀJ diagonal is below this fraction of the largest is left at 0


def default_anchors(terms) -> tuple[EOCConfig | None, ...]:
    """``DEFAULT_ANCHORS`` whose prior term (trend: "trend", delta: "delta") is among ``terms``: a fit of the
    sample's own history alone (``terms=("extrapolate",)``) reads no means of the prior, its anchor neither
    (what a prior stored as coefficients only needs)."""
    return tuple(c for c in DEFAULT_ANCHORS if c is None or c.mode not in PRIOR_SLOTS or c.mode in terms)


def preset_name(config: EOCConfig | None) -> str:
    """The spec of a preset as ``eoc evaluate`` writes it: 'plain', 'extrapolate:1.2', 'taylorseer:2',
    'hicache:2' (with ':SIGMA' when σ is not 0.5), 'trend'."""
    if config is None:
        return "plain"
    if config.mode in ("taylorseer", "hicache"):
        name = f"{config.mode}:{config.effective_order}"
        if config.mode == "hicache" and config.effective_sigma != 0.5:
            name += f":{config.effective_sigma:g}"
        return name
    return config.mode if config.theta is None else f"{config.mode}:{config.theta:g}"


def _model_name(slots) -> str:
    """'order 2 + delta + trend' for the slots of a fitted model."""
    order = sum(s in BETA_SLOTS for s in slots)
    extras = [name for name, slot in PRIOR_SLOTS.items() if slot in slots]
    return " + ".join([f"order {order}"] + extras)


def _ridge_toward(rhs: torch.Tensor, gram: torch.Tensor, anchor: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin θᵀGθ − 2bᵀθ + λ·mean(diag G)·||θ − a||² (fp64); a singular system falls back to the
    pseudo-inverse."""
    scale = ridge * gram.diagonal().mean().clamp(min=1e-30)
    system = gram + scale * torch.eye(gram.shape[0], dtype=gram.dtype)
    target = rhs + scale * anchor
    try:
        return torch.linalg.solve(system, target)
    except torch.linalg.LinAlgError:
        return torch.linalg.pinv(system) @ target


def _error(plain: torch.Tensor, rhs: torch.Tensor, gram: torch.Tensor, theta: torch.Tensor) -> float:
    """||P(r − Σ θ_j u_j)||² from the statistics: plain − 2θ·b + θᵀGθ."""
    return float(plain - 2 * (theta @ rhs) + theta @ gram @ theta)


class _ClosedLoopFitter:
    """The per-entry solver: each reuse entry's coefficients (α, β₁, γ, β₂, β₃), recorded in ``coef``
    [T, L, 2, 5] (fp64), with the chosen model in ``models`` {(t, l, k): name}.

    Each entry on its own: the candidates of the module docstring are measured by their error
    ||P(r − Σ_j θ_j u_j)||² on held-out pairs, with r = F* − C_0 and P the map of a [2B, ...] CFG batch to
    what reaches the guided output, s·cond + (1 − s)·uncond (``guidance`` = s; None: P = identity).

    anchor: [T, L, 2, 5] the anchor preset's coefficients (None: plain reuse, zeros).
    """

    def __init__(self, num_steps, num_blocks, terms, ridge=1e-3, judge_threshold=0.0, min_gain=0.0, guidance=None,
                 uncond_first=False, *, max_order=MAX_ORDER, anchor=None):
        self.terms, self.ridge, self.judge_threshold, self.min_gain = tuple(terms), ridge, judge_threshold, min_gain
        self.guidance, self.max_order = guidance, max_order
        self.uncond_first = uncond_first  # the CFG batch is [uncond; cond] (diffusers' PixArt pipeline)
        self.coef = torch.zeros(num_steps, num_blocks, 2, NUM_COEFS, dtype=torch.float64)
        self.anchor = (torch.zeros_like(self.coef) if anchor is None else anchor.to(torch.float64).clone())
        self.models: dict[tuple[int, int, int], str] = {}
        self.disabled = torch.zeros(num_steps, num_blocks, 2, dtype=torch.bool)  # judged off: plain reuse in the end
        self.heldout = {"plain": 0.0, "anchor": 0.0, "chosen": 0.0}  # held-out errors summed over entries
        # Sharing among ranks (distributed.py): this rank's samples, all ranks' samples, the group.
        self.local_samples, self.total_samples, self.group = None, None, None

    @property
    def num_generations(self) -> int:
        """How many computed features per entry the closed loop keeps: C_0..C_K for the fit's orders and the
        anchor's."""
        fit = self.max_order if "extrapolate" in self.terms else 0
        return 1 + max(fit, max((history_reads(c) for c in self.anchor.view(-1, NUM_COEFS).tolist()), default=0))

    def _per_sample(self, value: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [B, n]: P(value) of each sample, flat (without P, a sample's rows of every CFG
        half side by side)."""
        if self.guidance is not None:
            cond, uncond = value.chunk(2)
            if self.uncond_first:
                cond, uncond = uncond, cond
            return (self.guidance * cond + (1.0 - self.guidance) * uncond).flatten(1)
        samples = self.local_samples or value.shape[0]
        return value.reshape(value.shape[0] // samples, samples, -1).transpose(0, 1).reshape(samples, -1)

    def _slots(self, e, anchor: torch.Tensor) -> list[int]:
        """The coefficient slots whose terms this entry measures: the fit's candidates that exist for it and
        the anchor's non-zero ones."""
        history, available = e["history"], []
        if "extrapolate" in self.terms:
            available += list(BETA_SLOTS[: min(self.max_order, len(history) - 1)])
        for name, slot in PRIOR_SLOTS.items():
            if name in self.terms and e[name] is not None:
                available.append(slot)
        return sorted(set(available) | {j for j in range(NUM_COEFS) if anchor[j] != 0})

    def _entry_statistics(self, e, slots: list[int]) -> torch.Tensor:
        """[B, 2 + m + m²] fp64 per sample: ||P r||², ||P F*||², <P u_j, P r>, <P u_i, P u_j> for the terms of
        ``slots``. Each sample's sums come from its own contiguous rows, so they do not depend on the batch
        they came in."""
        history, truth, delta, trend = e["history"], e["truth"], e["delta"], e["trend"]
        cache = history[0]
        batch = cache.shape[0]

        def term(slot):
            if slot == 0:
                return delta.double().repeat_interleave(batch // delta.shape[0], 0)
            if slot == 2:
                return cache.double() * trend.double().repeat_interleave(batch // trend.shape[0], 0)
            i = BETA_SLOTS.index(slot)  # β_{i+1}: C_i − C_{i+1}
            return (history[i] - history[i + 1]).double()

        target = self._per_sample((truth - cache).double()).contiguous()
        truth_p = self._per_sample(truth.double()).contiguous() if self.judge_threshold > 0 else None
        u = torch.stack([self._per_sample(term(j)) for j in slots], dim=1) if slots else None  # [B, m, n]
        rows = []
        for b in range(target.shape[0]):
            values = [torch.dot(target[b], target[b]).view(1),
                      (torch.dot(truth_p[b], truth_p[b]) if truth_p is not None else target.new_zeros(())).view(1)]
            if u is not None:
                ub = u[b].contiguous()
                values += [torch.mv(ub, target[b]), torch.mm(ub, ub.t()).flatten()]
            rows.append(torch.cat(values))
        return torch.stack(rows).cpu()

    def _candidates(self, slots: list[int], anchor: torch.Tensor) -> list[tuple[str, list[int] | None]]:
        """(name, fitted slots) of every candidate model; None for the fixed ones (plain, anchor)."""
        fixed = [("plain", None)] + ([("anchor", None)] if bool((anchor != 0).any()) else [])
        betas = [s for s in BETA_SLOTS if s in slots and "extrapolate" in self.terms
                 and BETA_SLOTS.index(s) < self.max_order]
        extras = [s for name, s in PRIOR_SLOTS.items() if (name in self.terms or anchor[s] != 0) and s in slots]
        fitted = []
        for order in range(len(betas) + 1):
            for count in range(len(extras) + 1):
                for chosen in itertools.combinations(extras, count):
                    model = sorted(betas[:order] + list(chosen))
                    if model:
                        fitted.append((_model_name(model), model))
        return fixed + fitted

    def _solve(self, slots: list[int], anchor: torch.Tensor, per_sample: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(model name, coefficients [5] fp64) of one entry from its per-sample statistics [B, w] (every
        rank's samples, in pair order)."""
        m = len(slots)
        coef = torch.zeros(NUM_COEFS, dtype=torch.float64)
        sums = per_sample.sum(dim=0)
        plain, energy = sums[0], float(sums[1])
        if float(plain) == 0:  # reuse is exact here (e.g. a branch that outputs zeros): nothing to correct
            return JUDGED, coef
        # Offline judgment, level 1: only where plain reuse's relative error exceeds judge_threshold.
        if self.judge_threshold > 0 and float(plain) / max(energy, 1e-30) <= self.judge_threshold:
            return JUDGED, coef
        if m == 0:  # no term to correct with
            return "plain", coef

        def split(s):
            return s[0], s[2 : 2 + m], s[2 + m :].reshape(m, m)

        index = {slot: i for i, slot in enumerate(slots)}
        a = torch.tensor([float(anchor[j]) for j in slots], dtype=torch.float64)
        # Two folds by the parity of the pair's index; one pair: measured on itself.
        folds = ([per_sample[0::2].sum(dim=0), per_sample[1::2].sum(dim=0)] if per_sample.shape[0] > 1 else [sums])

        def fitted(stats, model):
            _, rhs, gram = split(stats)
            rows = [index[j] for j in model]
            theta = torch.zeros(m, dtype=torch.float64)
            theta[rows] = _ridge_toward(rhs[rows], gram[rows][:, rows], a[rows], self.ridge)
            return theta

        def heldout(model):
            if len(folds) == 1:
                return _error(*split(sums), fitted(sums, model))
            return sum(_error(*split(folds[1 - f]), fitted(folds[f], model)) for f in range(2))

        scores = {}
        for name, model in self._candidates(slots, anchor):
            if model is None:
                theta = torch.zeros(m, dtype=torch.float64) if name == "plain" else a
                scores[name] = (_error(*split(sums), theta), theta, None)
            else:
                scores[name] = (heldout(model), None, model)
        # The lowest held-out error; within a relative 1e-9 of it (rounding), the first, i.e. the simpler model.
        plain_error = scores["plain"][0]
        lowest = min(score for score, _, _ in scores.values())
        best = next(n for n in scores if scores[n][0] <= lowest + 1e-9 * plain_error)
        self.heldout["plain"] += plain_error
        self.heldout["anchor"] += scores["anchor"][0] if "anchor" in scores else plain_error
        # ... and only where it lowers the held-out error by at least min_gain (else judged off).
        if best != "plain" and self.min_gain is not None and \
                (plain_error - scores[best][0]) / plain_error < self.min_gain:
            self.heldout["chosen"] += plain_error
            return JUDGED, coef
        self.heldout["chosen"] += scores[best][0]
        _, theta, model = scores[best]
        if model is not None:
            theta = fitted(sums, model)
        for slot, value in zip(slots, theta.tolist()):
            coef[slot] = value
        return best, coef

    def __call__(self, step, entries) -> dict:
        if not entries:
            return {}
        slots = [self._slots(e, self.anchor[step, e["block"], e["branch"]]) for e in entries]
        measured = [self._entry_statistics(e, s) for e, s in zip(entries, slots)]
        widths = [stats.shape[1] for stats in measured]
        per_sample = torch.cat(measured, dim=1)  # [B, Σ w]
        if self.total_samples is not None:  # every rank's samples, in pair order
            per_sample = distributed.gather_rows(per_sample, self.group,
                                                 what=f"fit_coefficients: the statistics of step {step}")
        result = {}
        for e, entry_slots, entry_stats in zip(entries, slots, per_sample.split(widths, dim=1)):
            key = (e["block"], e["branch"])
            name, coef = self._solve(entry_slots, self.anchor[step][key], entry_stats)
            self.models[(step, *key)] = name
            self.disabled[step][key] = name == JUDGED
            self.coef[step][key] = coef
            result[key] = trimmed(coef.tolist())
        return result


class ClosedLoopFitting(StepStrategy):
    """The strategy the engine runs while fitting: at every step with a reuse entry, the targets F*
    come from an uncached forward on the step's input, the solver picks each entry's coefficients,
    and the step goes on with the corrected features of those coefficients."""

    def __init__(self, solver):
        self.solver = solver
        self.num_generations = getattr(solver, "num_generations", 2)

    def step_coefficients(self, context: StepContext) -> dict:
        truths = context.uncached_features()
        wants = {name: name in self.solver.terms for name in TERMS}
        anchor = getattr(self.solver, "anchor", None)
        entries = []
        for block, branch in context.reuse_entries:
            truth = truths[(block, branch)]
            reads = anchor[context.step, block, branch] if anchor is not None else None
            entries.append(dict(
                block=block, branch=branch, truth=truth, history=context.history(block, branch),
                delta=(context.prior_term(DELTA, block, branch, truth)
                       if wants["delta"] or (reads is not None and reads[0] != 0) else None),
                trend=(context.prior_term(TREND, block, branch, truth)
                       if wants["trend"] or (reads is not None and reads[2] != 0) else None)))
        return self.solver(context.step, entries)


# ----------------------------------------------------------------------------------- argument checks
def _check_gains(gains) -> tuple[float, ...]:
    try:
        values = tuple(gains)
    except TypeError:
        raise InputTypeError(f"gains must be a sequence of numbers >= 0, got {gains!r}") from None
    if not values or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0
                         for g in values):
        raise InputValueError(f"gains must be a non-empty sequence of finite numbers >= 0 (blends of fitted − anchor; "
                              f"0 = the anchor), got {gains!r}")
    return tuple(float(g) for g in values)


def _check_anchors(anchors) -> tuple[EOCConfig | None, ...]:
    if isinstance(anchors, EOCConfig):
        anchors = (anchors,)
    try:
        values = tuple(anchors)
    except TypeError:
        raise InputTypeError(f"anchors must be a sequence of EOCConfig presets or None (plain reuse), "
                             f"got {anchors!r}") from None
    if not values:
        raise InputValueError("anchors must not be empty (None = plain reuse)")
    for value in values:
        if value is not None and not isinstance(value, EOCConfig):
            raise InputTypeError(f"anchors: each must be an EOCConfig preset or None (plain reuse), got {value!r}")
        if value is not None and value.mode == "calibrated":
            raise InputValueError("anchors: mode 'calibrated' is not a fixed preset")
    return values


def _check_number(name, value, *, optional=False, minimum=None):
    if (value is None and not optional) or (value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value))):
        raise InputValueError(f"{name} must be a finite number{' or None' if optional else ''}, got {value!r}")
    if value is not None and minimum is not None and value < minimum:
        raise InputValueError(f"{name} must be >= {minimum}, got {value}")


# ----------------------------------------------------------------------------------- trajectories
def _pairs_batch(model, pairs, device, sampler=None, group=None):
    """(noise, labels) of this rank's share of ``pairs`` [(label, seed)] (all of them in one process)."""
    if not pairs:
        raise InputValueError("labels and seeds must not be empty")
    pairs = distributed.shard(pairs, group)
    noise = torch.cat([seed_noise(model, sampler, seed) for _, seed in pairs]).to(device)
    return noise, torch.tensor([label for label, _ in pairs], device=device)


def _residuals(samples: torch.Tensor, uncached: torch.Tensor, clamp) -> torch.Tensor:
    """[b, n] fp64: each sample minus its uncached sample, flat, both clamped to ``clamp`` if given."""
    if clamp is not None:
        samples, uncached = samples.clamp(*clamp), uncached.clamp(*clamp)
    return (samples.double() - uncached.double()).flatten(1).contiguous()


def _per_sample_rows(values, group, what: str) -> torch.Tensor:
    """[pairs, ...]: one row per sample of this rank (``values``, a list of tensors of one shape), every rank's
    in pair order (``distributed.gather_rows``)."""
    return distributed.gather_rows(torch.stack(values).cpu(), group, what=f"fit_coefficients: {what}")


def _score_db(errors: torch.Tensor, elements: int) -> float:
    """Pooled −10·log10(MSE) of per-sample squared-error sums (added in pair order) over ``elements`` each."""
    mse = errors.sum() / (errors.shape[0] * elements)
    return float(-10 * torch.log10(mse)) if mse > 0 else 100.0


class _TuneSet:
    """The tune pairs in parts (a part: this rank's batch of some of the pairs and their uncached samples),
    judged by pooled trajectory score. Each candidate's residuals to the uncached samples (this rank's) and
    per-sample squared errors (every rank's, in pair order) are kept by name."""

    def __init__(self, model, sampler, pairs, parts, device, cfg_scale, clamp, group, progress):
        self.model, self.sampler, self.cfg_scale = model, sampler, cfg_scale
        self.clamp, self.group, self.progress = clamp, group, progress
        self.parts = []
        for indices in parts:
            batch = _pairs_batch(model, [pairs[i] for i in indices], device, sampler, group)
            self.parts.append((batch, sampler.sample(model, *batch, cfg_scale=cfg_scale, progress=progress)))
        self.elements = self.parts[0][1][0].numel()
        self.residuals: dict[str, list] = {}  # name -> per part: [b, n] fp64 of this rank, None where not sampled
        self.errors: dict[str, list] = {}  # name -> per part: [pairs of the part] fp64, every rank's

    def score(self, name: str, patch, parts) -> float:
        """The pooled score of candidate ``name`` over ``parts``, sampling it (under the context manager
        ``patch()``) on the parts it was not sampled on yet."""
        residuals = self.residuals.setdefault(name, [None] * len(self.parts))
        errors = self.errors.setdefault(name, [None] * len(self.parts))
        for p in parts:
            if errors[p] is None:
                batch, uncached = self.parts[p]
                with patch():
                    samples = self.sampler.sample(self.model, *batch, cfg_scale=self.cfg_scale,
                                                  progress=self.progress)
                residuals[p] = _residuals(samples, uncached, self.clamp)
                errors[p] = _per_sample_rows([torch.dot(r, r) for r in residuals[p]], self.group,
                                             "the trajectory scores")
        return _score_db(torch.cat([errors[p] for p in parts]), self.elements)


def trajectory_score_db(samples: torch.Tensor, uncached: torch.Tensor,
                        clamp: tuple[float, float] | None = None) -> float:
    """−10·log10(MSE to the uncached samples), the MSE pooled over every element of every sample: pooled
    PSNR up to a constant, for any sample space (pixels or latents). Higher is closer; identical samples
    count 100. Pooled, not a mean of per-sample figures, which near-blank easy samples dominate.
    ``clamp`` (low, high): compare the samples as they will be shown, e.g. (−1, 1) for a pixel-space
    model whose out-of-range values are clipped (errors there are invisible)."""
    if clamp is not None:
        samples, uncached = samples.clamp(*clamp), uncached.clamp(*clamp)
    mse = (samples.double() - uncached.double()).pow(2).mean()
    return float(-10 * torch.log10(mse)) if mse > 0 else 100.0


def preset_coefficients(mask: torch.Tensor, config: EOCConfig | None, prior: Prior | None) -> torch.Tensor:
    """[T, L, 2, 5] fp64: the coefficients a preset's plan gives every reuse entry under ``mask`` (zeros at
    compute entries and for plain reuse). ``prior`` is handed only to a preset that needs one, as
    ``eoc evaluate`` runs them (trend and delta: with the offline judgment of ``config``)."""
    T, L = mask.shape[:2]
    coef = torch.zeros(T, L, 2, NUM_COEFS, dtype=torch.float64)
    if config is None:
        return coef
    plan = make_plan(mask, config, prior if config.needs_prior else None)
    for (t, l, k), entry in plan.entries.items():
        coef[t, l, k, : len(entry.coef)] = torch.tensor(entry.coef, dtype=torch.float64)
    return coef


def blended(anchor: torch.Tensor, fitted: torch.Tensor, gain: float) -> torch.Tensor:
    """a + g·(θ − a) in fp64: the anchor itself at g = 0 and the fit itself at g = 1, exactly."""
    if gain == 0.0:
        return anchor.clone()
    if gain == 1.0:
        return fitted.clone()
    return anchor + gain * (fitted - anchor)


def _fit_tensor(coef: torch.Tensor) -> torch.Tensor:
    """fp32 [T, L, 2, P] with P = 3 + the trailing slots any entry uses (P in {3, 4, 5})."""
    used = [j for j in range(3, NUM_COEFS) if bool((coef[..., j] != 0).any())]
    return coef[..., : max([3] + [j + 1 for j in used])].float().contiguous()


def _computes_before(mask: torch.Tensor) -> torch.Tensor:
    """[T, L, 2] long: how many times each entry's column computed before the step."""
    counts = mask.long().cumsum(0)
    return torch.cat([torch.zeros_like(counts[:1]), counts[:-1]])


def _check_split(split) -> None:
    if split not in REFINE_SPLITS:
        raise InputValueError(f"refine_split must be one of {REFINE_SPLITS}, got {split!r}")


def refinement_directions(mask: torch.Tensor, anchor: torch.Tensor, fitted: torch.Tensor, split: str = "phase"):
    """[(name, direction [T, L, 2, 5] fp64)] the trajectory refinement moves the coefficients along, from
    the anchor a: a itself on the reuse entries with 1, 2, 3 and 4 or more computes before them
    ("anchor@n": scaling the preset per phase of the run), or, where a is zero there, the fit's θ; and
    θ − a on every entry ("fit"). ``split="phase-block"`` splits each phase's direction further by block
    ("anchor@n/b3": phase n of block 3; the phase directions are their sums), a gain per phase and block;
    ``"phase-block-branch"`` further by branch ("anchor@n/b3.mlp"; branch 0 "attn", 1 "mlp").
    Directions that are zero are left out."""
    _check_split(split)
    computes = _computes_before(mask).clamp(max=4)
    reuse = ~mask
    blocks = [None] if split == "phase" else list(range(mask.shape[1]))
    branches = [None] if split != "phase-block-branch" else [0, 1]
    directions = []
    for n in range(1, 5):
        label = f"{n}+" if n == 4 else f"{n}"
        for block, branch in itertools.product(blocks, branches):
            where = reuse & (computes == n)
            if block is not None:
                where = where & (torch.arange(mask.shape[1]) == block).view(1, -1, 1)
            if branch is not None:
                where = where & (torch.arange(2) == branch).view(1, 1, -1)
            where = where.unsqueeze(-1)
            if not bool(where.any()):
                continue
            name = label if block is None else f"{label}/b{block}"
            name = name if branch is None else f"{name}.{BRANCH_NAMES[branch]}"
            if bool((anchor * where != 0).any()):
                directions.append((f"anchor@{name}", anchor * where))
            elif bool((fitted * where != 0).any()):
                directions.append((f"fit@{name}", fitted * where))
    if bool((fitted != anchor).any()) and any(name.startswith("anchor@") for name, _ in directions):
        directions.append(("fit", fitted - anchor))
    return directions


def _gauss_newton(tune: _TuneSet, evaluate, base: str, directions, step: float, iterations: int, group):
    """Gauss-Newton on the trajectory: the weights φ of ``directions`` that bring the tune pairs' final
    samples closest to the uncached ones in least squares, from φ = 0 (the candidate ``base``, already
    scored). The Jacobian is one finite difference of ``step`` per direction, kept for every iteration;
    each iteration solves the Levenberg-Marquardt normal equations for the residuals at the current point
    (no weight moving by more than ``REFINE_MAX_MOVE``; a direction whose JᵀJ diagonal is below
    ``REFINE_NEGLIGIBLE`` of the largest keeps weight 0) and keeps the step only where the pooled score
    rises on the tune pairs and on each half of them (alternate pairs), else tries once more 100 times
    more damped, else stops. ``evaluate(name, φ)`` samples φ into ``tune`` and returns its score.
    Returns (φ, {name: score} of every point tried, the name of the point kept)."""
    p = len(directions)
    scores = {base: _score_db(torch.cat(tune.errors[base]), tune.elements)}
    for i, (name, _) in enumerate(directions):
        phi = torch.zeros(p, dtype=torch.float64)
        phi[i] = step
        scores[f"fd {name}"] = evaluate(f"fd {name}", phi)

    def rows(name):
        return torch.cat(tune.residuals[name])  # [b, n] this rank's samples, in pair order

    at_base = rows(base)
    jacobian = torch.stack([(rows(f"fd {name}") - at_base) / step for name, _ in directions], dim=1)  # [b, p, n]
    gram = _per_sample_rows([torch.mm(j, j.t()) for j in jacobian], group, "the Jacobian").sum(0)  # [p, p]
    phi, best, residual = torch.zeros(p, dtype=torch.float64), scores[base], at_base
    kept = base
    if not float(gram.diagonal().max()) > 0:  # no direction changes the samples
        return phi, scores, kept
    # A direction that barely moves the samples gets no weight: its weight is ill-determined (float noise in
    # the Jacobian would set it) and its unbounded move would take the whole trust region of the others.
    active = gram.diagonal() > REFINE_NEGLIGIBLE * float(gram.diagonal().max())
    system, diagonal = gram[active][:, active], gram.diagonal()[active]  # Marquardt: damping scales JᵀJ's diagonal

    def halves(name):  # the pooled score of each half of the tune pairs (alternate pairs)
        errors = torch.cat(tune.errors[name])
        return [_score_db(errors[h::2], tune.elements) for h in range(2)] if errors.shape[0] > 1 else []

    best_halves = halves(base)
    damping = REFINE_DAMPING
    for iteration in range(iterations):
        rhs = _per_sample_rows([torch.mv(j, r) for j, r in zip(jacobian, residual)], group, "the gradient").sum(0)
        accepted = False
        for attempt in range(2):  # Levenberg-Marquardt: a failed step is retried 100 times more damped
            move = torch.zeros_like(rhs)
            move[active] = -torch.linalg.solve(system + damping * torch.diag(diagonal), rhs[active])
            largest = float(move.abs().max())
            if largest > REFINE_MAX_MOVE:  # beyond the reach of the finite differences: a trust region
                move = move * (REFINE_MAX_MOVE / largest)
            name = f"gauss-newton {iteration + 1}" + ("" if attempt == 0 else " (damped)")
            candidate = phi + move
            scores[name] = evaluate(name, candidate)
            # Kept only where the score rises on all the tune pairs and on each half of them: a step that
            # some samples alone favour is not taken.
            if scores[name] > best and all(h > b for h, b in zip(halves(name), best_halves)):
                phi, best, residual, accepted, kept = candidate, scores[name], rows(name), True, name
                best_halves = halves(name)
                damping = max(damping / 10, REFINE_DAMPING)
                break
            damping *= 100
        if not accepted:
            break
    return phi, scores, kept


def _climb(grid: list[float], score, start: list[float]) -> float:
    """The grid value with the highest ``score`` found by climbing from the best of ``start``: each move
    to the better neighbour on the sorted grid, until neither neighbour is better."""
    for g in start:
        score(g)
    best = max(start, key=score)
    while True:
        i = grid.index(best)
        neighbours = [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)]
        better = [g for g in neighbours if score(g) > score(best)]
        if not better:
            return best
        best = max(better, key=score)


def fit_coefficients(model: nn.Module, sampler, schedule: Schedule, prior: Prior, labels, seeds, *,
                     cfg_scale: float | None = None, terms=DEFAULT_TERMS, ridge: float = 1e-3,
                     judge_threshold: float = 0.0, min_gain: float | None = 0.0, guided: bool = True,
                     gains=DEFAULT_GAINS, tune_seeds=None, tune_clamp: tuple[float, float] | None = None,
                     progress: bool = True, adapter=None, group=None, anchors=None,
                     max_order: int = MAX_ORDER, refine: str | None = "gauss-newton",
                     refine_split: str = "phase", refine_iterations: int = REFINE_ITERATIONS) -> CoefficientFit:
    """Fit the coefficients (α, β₁, γ, β₂, β₃) of every reuse entry of ``schedule``: the best fixed preset
    as anchor, per-entry models chosen on held-out pairs in closed loop, and a refinement from the anchor
    fitted on the trajectory (module docstring). The closed loop samples the (label, seed) pairs as
    ONE batch (noise as in ``calibrate``). ``prior`` gives D and E and fixes the step count and CFG; use
    calibration seeds disjoint from evaluation seeds.

    terms: the candidate terms among ``TERMS``: "extrapolate" = the history differences β₁..β_K up to
        ``max_order`` (0..3), "delta" = α·D, "trend" = γ·(C_0 ⊙ E); each entry chooses its model among
        the nested orders, each with or without the prior terms named.
    ridge: λ of the ridge toward the anchor's coefficients, relative to mean(diag G).
    judge_threshold: plain reuse where its relative error ||P r||² / ||P F*||² on the fitting pairs is
        at most this. min_gain: a model other than plain reuse only where it lowers the held-out error
        by at least this fraction (None: the lowest held-out error wins).
    guided: with CFG, fit what reaches the guided output (P above) rather than both halves alike.
    anchors: the fixed presets the anchor is chosen among (``EOCConfig`` presets; None = plain reuse), by
        pooled trajectory score on the tune pairs (one anchor is taken as given). Default:
        ``default_anchors(terms)``: plain, extrapolate θ ∈ {0.8, 1, 1.2}, TaylorSeer and HiCache of order
        1..3, and trend / delta where ``terms`` has them (with ``terms=("extrapolate",)`` neither the
        anchor nor the fit reads the prior's means).
    refine: "gauss-newton" (default), "blend" or None: the trajectory refinement from the anchor (module
        docstring, part 3); ``refine_split`` its directions (``refinement_directions``): "phase" (the
        anchor scaled per phase of the run), "phase-block" (per phase and block) or "phase-block-branch" (per
        phase, block and branch), ``refine_iterations`` its Levenberg-Marquardt steps at most (one
        trajectory of the tune pairs each; the Jacobian, one trajectory per direction, is computed once).
        gains: the candidate blends g of ``refine="blend"`` (coefficients a + g·(θ − a);
        0, the anchor, is always one; a single value is used as given, without tuning).
    tune_seeds: the pairs (label, ``tune_seeds``) that choose the anchor and the refinement are sampled
        uncached and under the schedule with each candidate; the candidate whose samples are closest to
        the uncached ones (``trajectory_score_db``) is kept. Default ``seeds``; seeds disjoint from the
        fitting seeds keep the choice honest. ``tune_clamp`` (low, high): judge the samples clipped to
        this range (pixel-space models).

    group: a torch.distributed process group (default: the initialised default group, if any): the
    pairs are shared among its ranks, each step's least-squares statistics and each trajectory's
    per-sample errors are gathered in pair order and summed in that order, and every rank returns the
    same fit, the one a single process computes (``distributed``).

    Returns a fit whose info records the choices: ``anchor`` with ``anchor_score_db`` (every preset tried,
    on ``anchor_score_samples`` tune pairs), ``models`` and ``orders`` (per-entry counts of the selection),
    ``refine_weights`` (φ per direction) or ``gain`` (the blend; with Gauss-Newton, φ of "fit"),
    ``tune_score_db`` (every point the refinement tried) and ``phase_s`` (wall time of each stage).
    ``prior.add_fit(fit)`` keeps it (and ``prior.save``
    stores it) for ``EOCConfig(mode="calibrated")`` (the default of ``apply_eoc`` when a prior is given).
    """
    if not isinstance(prior, Prior):
        raise InputTypeError(f"prior must be an eoc_dit.Prior, got {type(prior).__name__}")
    terms = tuple(terms) if not isinstance(terms, str) else (terms,)
    unknown = [t for t in terms if t not in TERMS]
    if unknown or not terms:
        raise InputValueError(f"terms must be a non-empty subset of {TERMS}, got {terms}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise InputValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 0 <= max_order <= MAX_ORDER:
        raise InputValueError(f"max_order must be an int in 0..{MAX_ORDER}, got {max_order!r}")
    gains = _check_gains(gains)
    anchors = _check_anchors(default_anchors(terms) if anchors is None else anchors)
    if refine not in REFINEMENTS:
        raise InputValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    _check_split(refine_split)
    if isinstance(refine_iterations, bool) or not isinstance(refine_iterations, int) or refine_iterations < 1:
        raise InputValueError(f"refine_iterations must be an int >= 1, got {refine_iterations!r}")
    _check_number("judge_threshold", judge_threshold, minimum=0)
    _check_number("min_gain", min_gain, optional=True)
    if tune_clamp is not None:
        bounds = tuple(tune_clamp) if isinstance(tune_clamp, (tuple, list)) else ()
        if len(bounds) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bounds) \
                or not bounds[0] < bounds[1]:
            raise InputValueError(f"tune_clamp must be (low, high) with finite low < high, got {tune_clamp!r}")
        tune_clamp = (float(bounds[0]), float(bounds[1]))
    if sampler.num_steps != prior.num_steps:
        raise InputValueError(f"num_steps mismatch: the prior has {prior.num_steps}, "
                              f"the sampler runs {sampler.num_steps}")
    cfg_scale = prior.cfg_scale if cfg_scale is None else cfg_scale
    device = next(model.parameters()).device
    group = distributed.resolve_group(group)
    progress = progress and distributed.is_main(group)
    labels, seeds = list(labels), list(seeds)
    tune_seeds = seeds if tune_seeds is None else list(tune_seeds)
    pairs = [(label, seed) for label in labels for seed in seeds]
    tune_pairs = [(label, seed) for label in labels for seed in tune_seeds]
    total = len(pairs)
    noise, y = _pairs_batch(model, pairs, device, sampler, group)
    adapter = adapter if adapter is not None else default_adapter(model)
    num_blocks = len(adapter.blocks(model))
    mask = schedule.mask(prior.num_steps, num_blocks)
    start = time.perf_counter()
    phases = {}

    # 1. The anchor: the best fixed preset on the tune pairs (presets that coincide here are scored once).
    distinct: dict[str, tuple[EOCConfig | None, torch.Tensor]] = {}
    for config in anchors:
        coef = preset_coefficients(mask, config, prior)
        if not any(torch.allclose(coef, c, rtol=0.0, atol=1e-12) for _, c in distinct.values()):  # float noise apart
            distinct[preset_name(config)] = (config, coef)
    names = list(distinct)
    tune, anchor_scores, anchor_samples = None, {}, {}
    if len(names) > 1 or refine == "gauss-newton" or (refine == "blend" and len(gains) > 1):
        _, ranks = distributed.rank_and_size(group)
        parts = [list(range(len(tune_pairs)))]
        if len(names) > ANCHOR_FINALISTS and len(tune_pairs) >= max(8, 4 * ranks):
            parts = [parts[0][0::4], [i for i in parts[0] if i % 4]]  # every 4th pair first (all labels), the rest
        tune = _TuneSet(model, sampler, tune_pairs, parts, device, cfg_scale, tune_clamp, group, progress)
        phases["reference_s"] = time.perf_counter() - start
    everything = list(range(len(tune.parts))) if tune is not None else []

    def preset_patch(name):
        config = distinct[name][0]
        return lambda: apply_eoc(model, schedule, prior if config is not None and config.needs_prior else None,
                                 config, adapter=adapter)

    if len(names) > 1:
        anchors_start = time.perf_counter()
        if len(tune.parts) > 1:  # a first round on every 4th pair, the finalists on all
            for name in names:
                anchor_scores[name], anchor_samples[name] = tune.score(name, preset_patch(name), [0]), len(parts[0])
            names = sorted(names, key=anchor_scores.get, reverse=True)[:ANCHOR_FINALISTS]
        for name in names:
            anchor_scores[name] = tune.score(name, preset_patch(name), everything)
            anchor_samples[name] = len(tune_pairs)
        phases["anchors_s"] = time.perf_counter() - anchors_start
    anchor_name = max(names, key=lambda n: anchor_scores.get(n, 0.0))
    anchor_config, anchor_coef = distinct[anchor_name]

    # 2. The closed loop: per-entry models chosen on held-out pairs, ridge toward the anchor.
    guidance = float(cfg_scale) if guided and cfg_scale > 1.0 else None
    fitter = _ClosedLoopFitter(prior.num_steps, num_blocks, terms, float(ridge), judge_threshold, min_gain, guidance,
                               uncond_first=bool(getattr(sampler, "uncond_first", False)), max_order=max_order,
                               anchor=anchor_coef)
    fitter.local_samples, fitter.total_samples, fitter.group = int(noise.shape[0]), total, group
    fit_start = time.perf_counter()
    handle = EOCHandle(model, schedule, prior, None, adapter=adapter, strategy=ClosedLoopFitting(fitter))
    try:
        sampler.sample(model, noise, y, cfg_scale=cfg_scale, progress=progress)
    finally:
        handle.remove()
    phases["closed_loop_s"] = time.perf_counter() - fit_start
    base_name, base_patch = anchor_name, preset_patch(anchor_name)
    if bool((anchor_coef[fitter.disabled] != 0).any()):  # entries judged off reuse plainly, the anchor's too
        anchor_coef = anchor_coef * ~fitter.disabled.unsqueeze(-1)
        base_name, base_patch = f"{anchor_name} (judged)", None  # scored as coefficients below

    # 3. Trajectory refinement from the anchor, on the tune pairs.
    refine_start = time.perf_counter()
    gain, blend_scores, refined, refine_scores = 1.0, {}, None, {}

    def coef_patch(coef):
        trial = Prior(prior.means, prior.stats, prior.metadata, fits=[CoefficientFit(mask, _fit_tensor(coef), {})])
        return lambda: apply_eoc(model, schedule, trial, EOCConfig(mode="calibrated"), adapter=adapter)

    base_patch = base_patch or coef_patch(anchor_coef)

    if refine == "blend" and len(gains) == 1:
        gain = gains[0]
    elif refine == "blend":  # a + g·(θ − a), g by a climb over the grid
        def score(g):
            if g not in blend_scores:
                blend_scores[g] = (tune.score(base_name, base_patch, everything) if g == 0.0 else
                                   tune.score(f"blend {g:g}", coef_patch(blended(anchor_coef, fitter.coef, g)),
                                              everything))
            return blend_scores[g]

        grid = sorted(set(gains) | {0.0})
        gain = _climb(grid, score, sorted({0.0, min(grid, key=lambda g: (abs(g - 1.0), -g))}))
    if refine == "blend":
        coef = blended(anchor_coef, fitter.coef, gain)
    elif refine == "gauss-newton":
        directions = refinement_directions(mask, anchor_coef, fitter.coef, refine_split)
        tune.score(base_name, base_patch, everything)  # the base point, φ = 0

        def at(phi):
            coef = anchor_coef.clone()
            for w, (_, direction) in zip(phi.tolist(), directions):
                coef += w * direction
            return coef

        phi, refine_point = torch.zeros(len(directions), dtype=torch.float64), base_name
        if directions:
            phi, refine_scores, refine_point = _gauss_newton(
                tune, lambda name, w: tune.score(name, coef_patch(at(w)), everything), base_name, directions,
                REFINE_STEP, refine_iterations, group)
        refined = {name: float(w) for (name, _), w in zip(directions, phi)}
        gain = refined.get("fit", 0.0)
        coef = at(phi) if bool((phi != 0).any()) else anchor_coef.clone()
    else:  # no refinement: the fit as it is
        coef = fitter.coef.clone()
    phases["refine_s"] = time.perf_counter() - refine_start
    coef = _fit_tensor(coef)

    models, orders = {}, {}
    for key, name in fitter.models.items():
        models[name] = models.get(name, 0) + 1
        if name == "anchor":
            order = history_reads(anchor_coef[key].tolist())
        else:
            order = 0 if name.startswith("plain") else int(name.split()[1])
        orders[str(order)] = orders.get(str(order), 0) + 1
    info = {"schedule": repr(schedule), "terms": list(terms), "max_order": max_order, "ridge": ridge,
            "judge_threshold": judge_threshold, "min_gain": min_gain, "guidance": guidance, "num_samples": total,
            "cfg_scale": cfg_scale, "target": "uncached forward",
            "selection": "per entry, lowest error on held-out pairs (2 folds by pair index parity)",
            "anchor": anchor_name, "models": dict(sorted(models.items())), "orders": dict(sorted(orders.items())),
            "heldout_error": {k: float(v) for k, v in fitter.heldout.items()},
            "refine": refine, "refine_split": refine_split if refine == "gauss-newton" else None,
            "refine_iterations": refine_iterations if refine == "gauss-newton" else None, "gain": gain,
            "corrected_entries": int((coef != 0).any(-1).sum()),
            "reuse_entries": int((~mask).sum()),
            "wall_time_s": round(time.perf_counter() - start, 2)}
    info["phase_s"] = {k: round(v, 2) for k, v in phases.items()}
    if tune is not None:
        info["tune_samples"] = len(tune_pairs)
        info["tune_clamp"] = None if tune_clamp is None else list(tune_clamp)
    if anchor_scores:
        info["anchor_score_db"] = dict(anchor_scores)  # every preset tried, on anchor_score_samples tune pairs
        info["anchor_score_samples"] = anchor_samples
    if blend_scores:
        # The blends tried, by g (0 = the anchor).
        info["tune_score_db"] = {f"{g:g}": blend_scores[g] for g in sorted(blend_scores)}
    if refined is not None:
        info["refine_weights"] = refined  # φ per direction: coef = anchor + Σ φ·direction
        info["tune_score_db"] = refine_scores  # every point tried; the anchor's name is φ = 0
        info["refine_point"] = refine_point  # the point kept
    return CoefficientFit(mask, coef, info)
