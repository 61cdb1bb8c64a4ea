"""Closed-loop fitting of the calibrated mode (fitting.py) and its storage in the prior."""

import math

import pytest
import torch

from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, Prior, apply_eoc, calibrate, fit_coefficients, noise_for_seed
from eoc_dit.fitting import TERMS
from eoc_dit.prior import CoefficientFit
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 9
LABELS, SEEDS = [0, 1, 2, 3], [20, 21, 22]


@pytest.fixture(scope="module")
def model():
    return make_tiny_dit(seed=4)


@pytest.fixture(scope="module")
def prior(model):
    return calibrate(model, DDIMSampler(STEPS), LABELS, SEEDS, cfg_scale=2.0, holdout=0.25, progress=False)


@pytest.fixture(scope="module")
def batch(model):
    noise = torch.cat([noise_for_seed(model, s) for _ in LABELS for s in SEEDS])
    labels = torch.tensor([label for label in LABELS for _ in SEEDS])
    return noise, labels


def sample(model, batch, schedule=None, prior=None, config=None):
    """Uncached without a schedule; with one: plain caching when config is None (even with a prior)."""
    if schedule is None:
        return DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)
    with apply_eoc(model, schedule, prior if config is not None else None, config):
        return DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)


def test_perfect_prior_fit_finds_alpha_one_and_the_uncached_sample(model):
    # One pair, calibrated and fitted on itself: the target is exactly the prior delta at every entry.
    sampler = DDIMSampler(STEPS)
    prior = calibrate(model, sampler, [2], [11], cfg_scale=2.0, holdout=0.0, progress=False)
    fit = fit_coefficients(model, sampler, FORASchedule(3), prior, [2], [11], terms=("delta",), ridge=1e-6,
                           gains=(1.0,), min_gain=None, progress=False)
    reused = ~fit.mask
    torch.testing.assert_close(fit.coef[reused][:, 0], torch.ones(int(reused.sum())), atol=1e-4, rtol=0)
    assert (fit.coef[reused][:, 1:] == 0).all() and (fit.coef[fit.mask] == 0).all()
    prior.add_fit(fit)
    batch = (noise_for_seed(model, 11), torch.tensor([2]))
    uncached = sample(model, batch)
    calibrated = sample(model, batch, FORASchedule(3), prior, EOCConfig(mode="calibrated"))
    plain = sample(model, batch, FORASchedule(3))
    assert (calibrated - uncached).abs().max() <= 1e-3 * (plain - uncached).abs().max()


def test_calibrated_beats_plain_and_every_preset_on_its_fitting_set(model, prior, batch):
    uncached = sample(model, batch)
    schedule = FORASchedule(3)
    # All three terms: on this random-weight model the prior's delta is what explains the change.
    fit = fit_coefficients(model, DDIMSampler(STEPS), schedule, prior, LABELS, SEEDS, terms=TERMS, gains=(1.0,),
                           progress=False)
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
    errors = {}
    for name, config in [("plain", None), ("extrapolate", EOCConfig(mode="extrapolate", min_gain=None)),
                         ("trend", EOCConfig(mode="trend", min_gain=None)),
                         ("delta", EOCConfig(mode="delta", min_gain=None)),
                         ("calibrated", EOCConfig(mode="calibrated"))]:
        errors[name] = float((sample(model, batch, schedule, fitted, config) - uncached).pow(2).mean())
    best_preset = min(v for k, v in errors.items() if k not in ("plain", "calibrated"))
    assert errors["calibrated"] < errors["plain"] / 5, errors
    assert errors["calibrated"] <= 1.01 * best_preset, errors


def test_terms_restrict_the_fit(model, prior):
    fit = fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [1], [20], terms=("extrapolate",),
                           progress=False)
    assert (fit.coef[..., 0] == 0).all() and (fit.coef[..., 2] == 0).all()
    # β needs a compute step before the source: none exists while step 0 is the only one computed.
    assert (fit.coef[1:3, :, :, 1] == 0).all() and (fit.coef[4:6, :, :, 1] != 0).any()


def test_judgment_that_disables_everything_is_plain_fora(model, prior, batch):
    fit = fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [1], [20], judge_threshold=1e9,
                           progress=False)
    assert (fit.coef == 0).all() and fit.info["corrected_entries"] == 0
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
    assert torch.equal(sample(model, batch, FORASchedule(3), fitted, EOCConfig(mode="calibrated")),
                       sample(model, batch, FORASchedule(3)))


def test_fits_are_saved_loaded_and_matched_by_schedule(model, prior, tmp_path):
    fits = [fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(n), prior, [1], [20], progress=False)
            for n in (2, 3)]
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=fits)
    fitted.save(tmp_path / "p.safetensors", dtype=torch.float32)
    loaded = Prior.load(tmp_path / "p.safetensors")
    assert len(loaded.fits) == 2 and not loaded.stats.keys() & {"fit.0.mask", "fit.0.coef"}
    for fit in fits:
        match = loaded.fit_for(fit.mask)
        assert torch.equal(match.coef, fit.coef) and match.info == fit.info
    with pytest.raises(ValueError, match="no coefficients fitted for FORASchedule\\(interval=4"):
        apply_eoc(model, FORASchedule(4), loaded, EOCConfig(mode="calibrated"))
    # A refit for the same schedule replaces the old one.
    loaded.add_fit(CoefficientFit(fits[0].mask, torch.zeros_like(fits[0].coef), {"note": "refit"}))
    assert len(loaded.fits) == 2 and loaded.fit_for(fits[0].mask).info == {"note": "refit"}


def test_bad_arguments(model, prior):
    sampler = DDIMSampler(STEPS)
    with pytest.raises(TypeError, match="prior"):
        fit_coefficients(model, sampler, FORASchedule(3), "prior", [1], [2])
    with pytest.raises(ValueError, match="terms"):
        fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], terms=("momentum",))
    for ridge in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ridge"):
            fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], ridge=ridge)
    with pytest.raises(ValueError, match="num_steps mismatch"):
        fit_coefficients(model, DDIMSampler(STEPS + 1), FORASchedule(3), prior, [1], [2])
    with pytest.raises(ValueError, match="empty"):
        fit_coefficients(model, sampler, FORASchedule(3), prior, [], [2])
    for gains, error in [((), ValueError), ((1.0, 0.0), ValueError), ((1.0, float("nan")), ValueError),
                         (2.0, TypeError)]:
        with pytest.raises(error, match="gains"):
            fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], gains=gains)
    for kwargs in [dict(judge_threshold=-0.1), dict(judge_threshold=None), dict(min_gain=float("nan")),
                   dict(min_gain="0")]:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], **kwargs)
    for clamp in [(1.0, -1.0), (0.0,), 5.0, (0.0, float("inf"))]:
        with pytest.raises(ValueError, match="tune_clamp"):
            fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], tune_clamp=clamp)
    with pytest.raises(ValueError, match="do not match"):
        prior.add_fit(CoefficientFit(torch.ones(2, 3, 2, dtype=torch.bool), torch.zeros(2, 3, 2, 3), {}))
    assert not hasattr(model, "_eoc_handle")


def test_targets_are_the_uncached_forward_on_the_current_input(model, batch):
    # At step 1 of FORA(3) the input equals the uncached run's (step 0 computed everything), so the
    # target of every reused entry must be the uncached run's branch output, in every block — not the
    # branch recomputed on the reused (wrong) input of the blocks after the first.
    from eoc_dit.fitting import ClosedLoopFitting
    from eoc_dit.patching import EOCHandle
    from eoc_dit.schedules import MaskSchedule

    uncached = {}
    with apply_eoc(model, MaskSchedule(torch.ones(STEPS, 3, 2, dtype=torch.bool)),
                   observer=lambda t, l, k, f: uncached.__setitem__((t, l, k), f.clone())):
        DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)
    targets = {}

    def fitter(step, entries):
        for e in entries:
            targets[(step, e["block"], e["branch"])] = e["truth"].clone()
        return {(e["block"], e["branch"]): (0.0, 0.0, 0.0) for e in entries}

    strategy = ClosedLoopFitting(fitter)
    strategy.solver.terms = ("extrapolate",)
    handle = EOCHandle(model, FORASchedule(3), None, None, strategy=strategy)
    try:
        plain = DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)
    finally:
        handle.remove()
    for block in range(3):
        for branch in range(2):
            torch.testing.assert_close(targets[(1, block, branch)], uncached[(1, block, branch)])
    assert not torch.allclose(targets[(1, 2, 0)], uncached[(1, 1, 0)])  # the comparison can fail
    # A fitter that corrects nothing leaves plain FORA exactly.
    assert torch.equal(plain, sample(model, batch, FORASchedule(3)))


def test_gain_is_chosen_on_the_tune_seeds_by_closeness_to_uncached(model, prior):
    from eoc_dit.fitting import trajectory_score_db

    sampler, schedule = DDIMSampler(STEPS), FORASchedule(2)  # FORA(2): β matters on this tiny model
    base = fit_coefficients(model, sampler, schedule, prior, [1, 2], [20], gains=(1.0,), progress=False)
    tuned = fit_coefficients(model, sampler, schedule, prior, [1, 2], [20], gains=(0.25, 1.0, 16.0),
                             tune_seeds=[30, 31], progress=False)
    assert base.info["gain"] == 1.0 and "tune_score_db" not in base.info
    scores = tuned.info["tune_score_db"]
    assert tuned.info["gain"] == max((0.25, 1.0, 16.0), key=lambda g: scores[str(g)]) \
        and tuned.info["tune_samples"] == 4
    torch.testing.assert_close(tuned.coef, tuned.info["gain"] * base.coef)
    # Each score is the closeness of the tune pairs' samples with that gain to their uncached samples.
    noise = torch.cat([noise_for_seed(model, s) for _ in (1, 2) for s in (30, 31)])
    tune = (noise, torch.tensor([1, 1, 2, 2]))
    for g in (0.25, 16.0):
        fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[CoefficientFit(base.mask, g * base.coef, {})])
        expected = trajectory_score_db(sample(model, tune, schedule, fitted, EOCConfig(mode="calibrated")),
                                       sample(model, tune))
        assert scores[str(g)] == pytest.approx(expected, abs=1e-3)  # batch-size float noise: ~1e-5
    assert min(abs(a - b) for a in scores.values() for b in scores.values() if a != b) > 5e-3


def test_trajectory_score_db():
    from eoc_dit.fitting import trajectory_score_db

    reference = torch.zeros(2, 1, 2, 2)
    assert trajectory_score_db(reference + 0.1, reference) == pytest.approx(20.0)
    assert trajectory_score_db(reference, reference) == 100.0
    # Pooled over samples: one exact sample does not hide the other (MSE 0.01 / 2, not a mean with 100).
    half = reference.clone()
    half[1] += 0.1
    assert trajectory_score_db(half, reference) == pytest.approx(-10 * math.log10(0.005))
    # Clamped: an error beyond the range is invisible, one inside it counts.
    outside = torch.full((2, 1, 2, 2), 1.5)
    assert trajectory_score_db(outside, outside + 1.0, clamp=(-1.0, 1.0)) == 100.0
    assert trajectory_score_db(outside - 0.6, outside + 1.0, clamp=(-1.0, 1.0)) == pytest.approx(-10 * math.log10(0.01))


def test_apply_eoc_defaults_to_calibrated_with_a_prior(model, prior, batch):
    fit = fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [1], [20], progress=False)
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
    with apply_eoc(model, FORASchedule(3), fitted) as handle:
        assert handle.config == EOCConfig(mode="calibrated")
    with apply_eoc(model, FORASchedule(3), fitted):
        default = DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)
    assert torch.equal(default, sample(model, batch, FORASchedule(3), fitted, EOCConfig(mode="calibrated")))
    assert not torch.equal(default, sample(model, batch, FORASchedule(3)))
    with pytest.raises(ValueError, match="no coefficients fitted for FORASchedule\\(interval=2.*"
                                         "EOCConfig\\(mode='extrapolate'\\)"):
        apply_eoc(model, FORASchedule(2), fitted)
    with apply_eoc(model, FORASchedule(3)) as handle:  # no prior: plain caching
        assert handle.config is None


def test_guided_objective_is_least_squares_on_the_guided_combination():
    from eoc_dit.fitting import _ClosedLoopFitter

    gen = torch.Generator().manual_seed(0)
    cache, prev, truth = (torch.randn(4, 3, 5, generator=gen) for _ in range(3))  # CFG batch [cond 2; uncond 2]
    entry = dict(block=0, branch=1, truth=truth, cache=cache, prev=prev, delta=None, trend=None)
    u, r = cache - prev, truth - cache
    for guidance, mapped in [(None, lambda v: v), (3.0, lambda v: 3.0 * v[:2] - 2.0 * v[2:])]:
        fitter = _ClosedLoopFitter(2, 1, ("extrapolate",), 0.0, 0.0, None, guidance)
        beta = fitter(1, [entry])[(0, 1)][1]
        expected = float((mapped(u) * mapped(r)).sum() / mapped(u).pow(2).sum())
        assert beta == pytest.approx(expected, rel=1e-6)
        assert fitter.coef[1, 0, 1].tolist() == pytest.approx([0.0, expected, 0.0], rel=1e-6)
    assert _ClosedLoopFitter(2, 1, ("extrapolate",), 0.0, 0.0, None, 3.0)(1, [entry])[(0, 1)][1] != pytest.approx(
        _ClosedLoopFitter(2, 1, ("extrapolate",), 0.0, 0.0, None, None)(1, [entry])[(0, 1)][1], rel=1e-3)
