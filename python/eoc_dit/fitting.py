"""Closed-loop fitting of the EOC coefficients for one schedule (the "calibrated" mode, docs/DESIGN.md §2).

Open-loop fits (on uncached features) lost to plain extrapolation in the feasibility probe, because
the cached trajectory drifts away from the uncached one. So the fit follows the cached trajectory:
the calibration batch is sampled under the schedule and, at every step with a reuse entry, the model
ALSO runs uncached on that step's input, giving the target F* of each entry (t, l, k): the branch
output the full forward would have produced here. With the candidate terms u = (D, Cc − Cp, Cc ⊙ E)
and r = F* − Cc, the coefficients of each entry are the ridge solution

    θ = argmin ||P(r − Σ_j θ_j u_j)||² + λ·mean(diag G)·||θ||²,   G = [<P u_i, P u_j>]

over the whole batch, where P maps the CFG batch to what reaches the guided output,
s·cond + (1 − s)·uncond (``guided``); then the offline judgment: θ = 0 where the relative error of
plain reuse is at most ``judge_threshold`` or where θ lowers it by less than ``min_gain``. The
corrected feature Cc + Σ θ_j u_j (not F*) is what the sampler goes on with, so later entries are
fitted on the trajectory the fitted coefficients produce. Last, one global gain g (θ ← g·θ) is
chosen among ``gains`` by how close the final samples of other calibration pairs come to their
uncached samples.

What the study on the testbed's calibration split found (benchmarks/results/calibrated-study-*.md):
targets from the uncached forward beat targets recomputed on each branch's own (already wrong)
input; the prior's delta term, fitted alongside, explains the fitting batch but wrecks other
samples, so the default term is the sample's own trend alone (a fitted β per entry); the CFG-aware
objective P adds a little; the least-squares β is optimal one step ahead, not for the trajectory,
and the gain makes up for it (above 1 at FORA N ≤ 4, below 1 at N = 5).
"""

from __future__ import annotations

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
from .prior import CoefficientFit, Prior
from .prior_terms import DELTA, TREND
from .schedules import Schedule

TERMS = ("delta", "extrapolate", "trend")  # α, β, γ
DEFAULT_TERMS = ("extrapolate",)
DEFAULT_GAINS = (0.5, 0.75, 1.0, 1.25, 1.5)


class _ClosedLoopFitter:
    """The per-entry solver: (α, β, γ) of each reuse entry of a step, recorded in ``coef`` [T, L, 2, 3].

    Each entry on its own: min ||P(r − Σ_j θ_j u_j)||² with r = F* − Cc, where P maps a [2B, ...]
    CFG batch to what reaches the guided output, s·cond + (1 − s)·uncond (``guidance`` = s; None:
    P = identity). The errors the guidance amplifies count as much as they will in the sample.
    """

    def __init__(self, num_steps, num_blocks, terms, ridge, judge_threshold, min_gain, guidance=None,
                 uncond_first=False):
        self.terms, self.ridge, self.judge_threshold, self.min_gain = terms, ridge, judge_threshold, min_gain
        self.guidance = guidance
        self.uncond_first = uncond_first  # the CFG batch is [uncond; cond] (diffusers' PixArt pipeline)
        self.coef = torch.zeros(num_steps, num_blocks, 2, 3)
        # Sharing among ranks (distributed.py): this rank's samples, all ranks' samples, the group.
        self.local_samples, self.total_samples, self.group = None, None, None

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

    def _entry_statistics(self, e) -> tuple[list[int], torch.Tensor]:
        """(the terms used, [B, 2 + m + m²] fp64 per sample: ||P r||², ||P F*||², <P u_j, P r>, <P u_i, P u_j>).
        Each sample's sums are dot products of its own contiguous rows, so they do not depend on the batch
        they came in."""
        cache, truth, delta, trend, prev = e["cache"], e["truth"], e["delta"], e["trend"], e["prev"]
        batch = cache.shape[0]
        candidates = {"delta": None if delta is None else delta.double().repeat_interleave(batch // delta.shape[0], 0),
                      "extrapolate": None if prev is None else (cache - prev).double(),
                      "trend": (None if trend is None
                                else cache.double() * trend.double().repeat_interleave(batch // trend.shape[0], 0))}
        used = [TERMS.index(name) for name in self.terms if candidates[name] is not None]
        target = self._per_sample((truth - cache).double()).contiguous()
        truth_p = self._per_sample(truth.double()).contiguous() if self.judge_threshold > 0 else None
        u = [self._per_sample(candidates[TERMS[j]]).contiguous() for j in used]
        rows = []
        for b in range(target.shape[0]):
            values = [torch.dot(target[b], target[b]),
                      torch.dot(truth_p[b], truth_p[b]) if truth_p is not None else target.new_zeros(())]
            values += [torch.dot(uj[b], target[b]) for uj in u]
            values += [torch.dot(ui[b], uj[b]) for ui in u for uj in u]
            rows.append(torch.stack(values))
        return used, torch.stack(rows).cpu()

    def _solve(self, used: list[int], sums: torch.Tensor) -> tuple[float, float, float]:
        """The coefficients of one entry from its statistics summed over every sample."""
        m = len(used)
        plain, energy = float(sums[0]), float(sums[1])
        if not used or plain == 0:
            return (0.0, 0.0, 0.0)
        # Offline judgment, level 1: only where plain reuse's relative error exceeds judge_threshold.
        if self.judge_threshold > 0 and plain / max(energy, 1e-30) <= self.judge_threshold:
            return (0.0, 0.0, 0.0)
        rhs, gram = sums[2 : 2 + m], sums[2 + m :].reshape(m, m)
        regularised = gram + (self.ridge * gram.diagonal().mean().clamp(min=1e-30)
                              * torch.eye(m, dtype=gram.dtype))
        theta = torch.linalg.solve(regularised, rhs)
        residual = plain - 2 * float(theta @ rhs) + float(theta @ gram @ theta)
        if self.min_gain is not None and (plain - residual) / plain < self.min_gain:  # ... and where it helps enough
            return (0.0, 0.0, 0.0)
        coef = [0.0, 0.0, 0.0]
        for j, value in zip(used, theta.tolist()):
            coef[j] = value
        return tuple(coef)

    def __call__(self, step, entries) -> dict:
        measured = [self._entry_statistics(e) for e in entries]
        if not measured:
            return {}
        widths = [stats.shape[1] for _, stats in measured]
        per_sample = torch.cat([stats for _, stats in measured], dim=1)  # [B, Σ K]
        if self.total_samples is not None:  # every rank's samples, in pair order
            per_sample = distributed.gather_rows(per_sample, self.group,
                                                 what=f"fit_coefficients: the statistics of step {step}")
        sums = per_sample.sum(dim=0).split(widths)  # in sample order, whatever the ranks
        result = {}
        for e, (used, _), entry_sums in zip(entries, measured, sums):
            key = (e["block"], e["branch"])
            result[key] = self._solve(used, entry_sums)
            self.coef[step][key] = torch.tensor(result[key])
        return result


class ClosedLoopFitting(StepStrategy):
    """The strategy the engine runs while fitting: at every step with a reuse entry, the targets F*
    come from an uncached forward on the step's input, the solver picks each entry's coefficients,
    and the step goes on with the corrected features of those coefficients."""

    def __init__(self, solver: _ClosedLoopFitter):
        self.solver = solver

    def step_coefficients(self, context: StepContext) -> dict:
        truths = context.uncached_features()
        wants = {name: name in self.solver.terms for name in TERMS}
        entries = []
        for block, branch in context.reuse_entries:
            truth = truths[(block, branch)]
            entries.append(dict(block=block, branch=branch, truth=truth, cache=context.cached(block, branch),
                                prev=context.previous(block, branch),
                                delta=context.prior_term(DELTA, block, branch, truth) if wants["delta"] else None,
                                trend=context.prior_term(TREND, block, branch, truth) if wants["trend"] else None))
        return self.solver(context.step, entries)


def _check_gains(gains) -> tuple[float, ...]:
    try:
        values = tuple(gains)
    except TypeError:
        raise InputTypeError(f"gains must be a sequence of numbers > 0, got {gains!r}") from None
    if not values or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0
                         for g in values):
        raise InputValueError(f"gains must be a non-empty sequence of finite numbers > 0, got {gains!r}")
    return tuple(float(g) for g in values)


def _batch(model, labels, seeds, device, sampler=None, group=None):
    """(noise, labels) of this rank's share of the pairs labels × seeds (all of them in one process)."""
    pairs = [(label, seed) for label in labels for seed in seeds]
    if not pairs:
        raise InputValueError("labels and seeds must not be empty")
    pairs = distributed.shard(pairs, group)
    noise = torch.cat([seed_noise(model, sampler, seed) for _, seed in pairs]).to(device)
    return noise, torch.tensor([label for label, _ in pairs], device=device)


def _pooled_score(samples: torch.Tensor, uncached: torch.Tensor, clamp, total: int, group) -> float:
    """``trajectory_score_db`` over every rank's samples: each sample's squared error summed on its own
    (fp64 dot), the per-sample sums gathered in pair order and added in that order."""
    if clamp is not None:
        samples, uncached = samples.clamp(*clamp), uncached.clamp(*clamp)
    diff = (samples.double() - uncached.double()).flatten(1).contiguous()
    per_sample = torch.stack([torch.dot(row, row) for row in diff]).cpu()
    per_sample = distributed.gather_rows(per_sample, group, what="fit_coefficients: the gain's scores")
    mse = per_sample.sum() / (total * diff.shape[1])
    return float(-10 * torch.log10(mse)) if mse > 0 else 100.0


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


def fit_coefficients(model: nn.Module, sampler, schedule: Schedule, prior: Prior, labels, seeds, *,
                     cfg_scale: float | None = None, terms=DEFAULT_TERMS, ridge: float = 1e-3,
                     judge_threshold: float = 0.0, min_gain: float | None = 0.0, guided: bool = True,
                     gains=DEFAULT_GAINS, tune_seeds=None, tune_clamp: tuple[float, float] | None = None,
                     progress: bool = True, adapter=None, group=None) -> CoefficientFit:
    """Fit (α, β, γ) per reuse entry of ``schedule`` in closed loop on the (label, seed) pairs, sampled
    as ONE batch (noise as in ``calibrate``). ``prior`` gives D and E and fixes the step count and CFG;
    use calibration seeds disjoint from evaluation seeds.

    guided: with CFG, fit what reaches the guided output (P above) rather than both halves alike.
    gains: candidate global gains g (coefficients ← g·θ); with more than one, the pairs
    (label, ``tune_seeds``) are sampled uncached and under the schedule with each g, and the g whose
    samples are closest to the uncached ones (``trajectory_score_db``) is kept. ``tune_seeds``
    defaults to ``seeds``; seeds disjoint from the fitting seeds keep the choice honest.
    ``tune_clamp`` (low, high): judge the samples clipped to this range (pixel-space models).

    group: a torch.distributed process group (default: the initialised default group, if any): the
    pairs are shared among its ranks, each step's least-squares statistics are gathered per sample
    in pair order and summed in that order, and every rank returns the same fit, the one a single
    process computes (``distributed``).

    Returns a fit; ``prior.add_fit(fit)`` keeps it (and ``prior.save`` stores it) for
    ``EOCConfig(mode="calibrated")`` (the default of ``apply_eoc`` when a prior is given).
    """
    if not isinstance(prior, Prior):
        raise InputTypeError(f"prior must be an eoc_dit.Prior, got {type(prior).__name__}")
    terms = tuple(terms) if not isinstance(terms, str) else (terms,)
    unknown = [t for t in terms if t not in TERMS]
    if unknown or not terms:
        raise InputValueError(f"terms must be a non-empty subset of {TERMS}, got {terms}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise InputValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    gains = _check_gains(gains)
    for name, value, optional in (("judge_threshold", judge_threshold, False), ("min_gain", min_gain, True)):
        if (value is None and not optional) or (value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value))):
            raise InputValueError(f"{name} must be a finite number{' or None' if optional else ''}, got {value!r}")
    if judge_threshold < 0:
        raise InputValueError(f"judge_threshold must be >= 0, got {judge_threshold}")
    if tune_clamp is not None:
        bounds = tuple(tune_clamp) if isinstance(tune_clamp, (tuple, list)) else ()
        if len(bounds) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bounds) \
                or not bounds[0] < bounds[1]:
            raise InputValueError(f"tune_clamp must be (low, high) with finite low < high, got {tune_clamp!r}")
    if sampler.num_steps != prior.num_steps:
        raise InputValueError(f"num_steps mismatch: the prior has {prior.num_steps}, "
                              f"the sampler runs {sampler.num_steps}")
    cfg_scale = prior.cfg_scale if cfg_scale is None else cfg_scale
    device = next(model.parameters()).device
    group = distributed.resolve_group(group)
    progress = progress and distributed.is_main(group)
    labels, seeds = list(labels), list(seeds)
    tune_seeds = seeds if tune_seeds is None else list(tune_seeds)
    total, tune_total = len(labels) * len(seeds), len(labels) * len(tune_seeds)
    noise, y = _batch(model, labels, seeds, device, sampler, group)
    tune_batch = _batch(model, labels, tune_seeds, device, sampler, group) if len(gains) > 1 else None
    adapter = adapter if adapter is not None else default_adapter(model)
    num_blocks = len(adapter.blocks(model))
    guidance = float(cfg_scale) if guided and cfg_scale > 1.0 else None
    fitter = _ClosedLoopFitter(prior.num_steps, num_blocks, terms, float(ridge), judge_threshold, min_gain, guidance,
                               uncond_first=bool(getattr(sampler, "uncond_first", False)))
    fitter.local_samples, fitter.total_samples, fitter.group = int(noise.shape[0]), total, group
    start = time.perf_counter()
    handle = EOCHandle(model, schedule, prior, None, adapter=adapter, strategy=ClosedLoopFitting(fitter))
    try:
        sampler.sample(model, noise, y, cfg_scale=cfg_scale, progress=progress)
    finally:
        handle.remove()
    mask = schedule.mask(prior.num_steps, handle.num_blocks)
    gain, scores = gains[0], None
    if tune_batch is not None:
        uncached = sampler.sample(model, *tune_batch, cfg_scale=cfg_scale, progress=progress)
        scores = {}
        for g in gains:
            trial = Prior(prior.means, prior.stats, prior.metadata, fits=[CoefficientFit(mask, g * fitter.coef, {})])
            with apply_eoc(model, schedule, trial, EOCConfig(mode="calibrated"), adapter=adapter):
                scores[g] = _pooled_score(sampler.sample(model, *tune_batch, cfg_scale=cfg_scale, progress=progress),
                                          uncached, tune_clamp, tune_total, group)
        gain = max(scores, key=scores.get)
    coef = gain * fitter.coef
    info = {"schedule": repr(schedule), "terms": list(terms), "ridge": ridge, "judge_threshold": judge_threshold,
            "min_gain": min_gain, "guidance": guidance, "num_samples": total, "cfg_scale": cfg_scale,
            "target": "uncached forward",
            "gain": gain, "corrected_entries": int((coef != 0).any(-1).sum()), "reuse_entries": int((~mask).sum()),
            "wall_time_s": round(time.perf_counter() - start, 2)}
    if scores is not None:
        info["tune_samples"] = tune_total
        info["tune_clamp"] = None if tune_clamp is None else [float(v) for v in tune_clamp]
        info["tune_score_db"] = {str(g): s for g, s in scores.items()}
    return CoefficientFit(mask, coef, info)
