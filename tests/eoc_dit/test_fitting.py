"""Closed-loop fitting of the calibrated mode (fitting.py) and its storage in the prior."""

import pytest
import torch

from eoc_dit import (DDIMSampler, EOCConfig, FORASchedule, Prior, apply_eoc, calibrate, fit_coefficients,
                     noise_for_seed)
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
    if schedule is None:
        return DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)
    with apply_eoc(model, schedule, prior, config):
        return DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)


def test_perfect_prior_fit_finds_alpha_one_and_the_uncached_sample(model):
    # One pair, calibrated and fitted on itself: the target is exactly the prior delta at every entry.
    sampler = DDIMSampler(STEPS)
    prior = calibrate(model, sampler, [2], [11], cfg_scale=2.0, holdout=0.0, progress=False)
    fit = fit_coefficients(model, sampler, FORASchedule(3), prior, [2], [11], terms=("delta",), ridge=1e-6,
                           min_gain=None, progress=False)
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
    fit = fit_coefficients(model, DDIMSampler(STEPS), schedule, prior, LABELS, SEEDS, progress=False)
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
    errors = {}
    for name, config in [("plain", None), ("extrapolate", EOCConfig(mode="extrapolate", min_gain=None)),
                         ("trend", EOCConfig(mode="trend", min_gain=None)), ("delta", EOCConfig(mode="delta", min_gain=None)),
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
    with pytest.raises(ValueError, match="ridge"):
        fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], ridge=-1.0)
    with pytest.raises(ValueError, match="num_steps mismatch"):
        fit_coefficients(model, DDIMSampler(STEPS + 1), FORASchedule(3), prior, [1], [2])
    with pytest.raises(ValueError, match="empty"):
        fit_coefficients(model, sampler, FORASchedule(3), prior, [], [2])
    with pytest.raises(ValueError, match="do not match"):
        prior.add_fit(CoefficientFit(torch.ones(2, 3, 2, dtype=torch.bool), torch.zeros(2, 3, 2, 3), {}))
    assert not hasattr(model, "_eoc_handle")
