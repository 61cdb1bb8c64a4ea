"""Closed-loop fitting of the calibrated mode (fitting.py) and its storage in the prior: the per-entry
solver on synthetic features (model selection on held-out pairs), the anchor, the trajectory refinement
and the closed loop on a tiny DiT."""

import math
import re

import pytest
import torch

import eoc_kernels
from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, Prior, apply_eoc, calibrate, fit_coefficients, noise_for_seed
from eoc_dit.fitting import (
    JUDGED,
    TERMS,
    _ClosedLoopFitter,
    default_anchors,
    preset_coefficients,
    preset_name,
    refinement_directions,
    trajectory_score_db,
)
from eoc_dit.prior import CoefficientFit
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 9
LABELS, SEEDS = [0, 1, 2, 3], [20, 21, 22]
TUNE_SEEDS = [30, 31]


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


def pairs_batch(model, labels, seeds):
    noise = torch.cat([noise_for_seed(model, s) for _ in labels for s in seeds])
    return noise, torch.tensor([label for label in labels for _ in seeds])


def sample(model, batch, schedule=None, prior=None, config=None):
    """Uncached without a schedule; with one: plain caching when config is None (even with a prior)."""
    if schedule is None:
        return DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)
    with apply_eoc(model, schedule, prior if config is not None else None, config):
        return DDIMSampler(STEPS).sample(model, *batch, cfg_scale=2.0)


# ------------------------------------------------------------------ the per-entry solver, no model
def polynomial_entry(degree, step, history, samples=8, gen=None, block=0):
    """An entry whose features are, per sample and element, a random polynomial of ``degree`` in the step."""
    coefficients = torch.randn(samples, 3, 5, degree + 1, generator=gen, dtype=torch.float64)

    def feature(s):
        x = s / 10.0
        return sum(coefficients[..., i] * x**i for i in range(degree + 1)).float()

    return dict(block=block, branch=0, truth=feature(step), history=[feature(s) for s in history], delta=None,
                trend=None)


def lagrange_betas(step, history):
    """β₁..β_K of the exact polynomial extrapolation through the computed steps ``history`` (latest first)."""
    weights = [math.prod((step - m) / (s - m) for m in history if m != s) for s in history]
    return eoc_kernels.reference.history_coefficients(weights)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_solver_recovers_the_order_and_weights_of_polynomial_features(degree):
    gen = torch.Generator().manual_seed(degree)
    step, history = 11, (9, 6, 3, 0)  # FORA(3): C_0..C_3 computed at 9, 6, 3, 0
    fitter = _ClosedLoopFitter(12, 1, ("extrapolate",), ridge=0.0, max_order=3)
    coef = fitter(step, [polynomial_entry(degree, step, history, gen=gen)])[(0, 0)]
    # The lowest order that is exact on held-out pairs, with the weights of the exact extrapolation.
    assert fitter.models[(step, 0, 0)] == f"order {degree}"
    betas = lagrange_betas(step, history[: degree + 1])
    expected = [0.0, betas[0], 0.0, *betas[1:]]
    assert coef == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # TaylorSeer's recursion is not that extrapolation beyond order 1, so the fit is not a preset there.
    taylorseer = EOCConfig(mode="taylorseer", order=degree).coefficients(step, history)
    assert (degree == 1) == (coef == pytest.approx(taylorseer, rel=1e-4, abs=1e-4))


def test_solver_keeps_plain_reuse_where_a_correction_hurts_held_out_pairs():
    gen = torch.Generator().manual_seed(0)
    step, history = 5, (3, 0)
    # Entry (0, 0): the next feature is unrelated to the history (noise); entry (1, 0): it is linear in the step.
    noise = [torch.randn(6, 1, 2, generator=gen) for _ in range(3)]
    unrelated = dict(block=0, branch=0, truth=noise[0], history=noise[1:], delta=None, trend=None)
    linear = polynomial_entry(1, step, history, samples=6, gen=gen, block=1)
    fitter = _ClosedLoopFitter(6, 2, ("extrapolate",), ridge=0.0, max_order=1)
    result = fitter(step, [unrelated, linear])
    assert fitter.models[(step, 0, 0)] == "plain" and result[(0, 0)] == (0.0, 0.0, 0.0)
    assert fitter.models[(step, 1, 0)] == "order 1" and result[(1, 0)][1] == pytest.approx(2 / 3, rel=1e-4)
    # On the fitting pairs themselves the correction of the noise entry would look like a gain: the held-out
    # measurement is what keeps it off.
    u, r = (noise[1] - noise[2]).flatten(), (noise[0] - noise[1]).flatten()
    beta = float(u @ r / (u @ u))
    assert float((r - beta * u).pow(2).sum()) < float(r.pow(2).sum())


def test_solver_shrinks_toward_the_anchor_and_chooses_it_when_it_is_best():
    gen = torch.Generator().manual_seed(3)
    step, history = 5, (3, 0)
    entry = polynomial_entry(1, step, history, samples=6, gen=gen)
    exact = 2 / 3
    anchor = torch.zeros(6, 1, 2, 5, dtype=torch.float64)
    anchor[step, 0, 0, 1] = exact  # the anchor is the exact extrapolation: nothing fitted beats it
    fitter = _ClosedLoopFitter(6, 1, ("extrapolate",), ridge=1e-3, max_order=1, anchor=anchor)
    assert fitter(step, [entry])[(0, 0)] == pytest.approx((0.0, exact, 0.0))
    assert fitter.models[(step, 0, 0)] == "anchor"
    # A heavy ridge toward an anchor pulls the fit to it, not to zero.
    anchor[step, 0, 0, 1] = 0.25
    ridged = _ClosedLoopFitter(6, 1, ("extrapolate",), ridge=1e6, max_order=1, anchor=anchor)
    assert ridged(step, [dict(entry)])[(0, 0)][1] == pytest.approx(0.25, abs=1e-4)


def test_guided_objective_is_least_squares_on_the_guided_combination():
    gen = torch.Generator().manual_seed(0)
    cache, prev = (torch.randn(4, 3, 5, generator=gen) for _ in range(2))  # CFG batch [cond 2; uncond 2]
    truth = cache + 0.7 * (cache - prev) + 0.3 * torch.randn(4, 3, 5, generator=gen)
    entry = dict(block=0, branch=1, truth=truth, history=[cache, prev], delta=None, trend=None)
    u, r = cache - prev, truth - cache
    for guidance, mapped in [(None, lambda v: v), (3.0, lambda v: 3.0 * v[:2] - 2.0 * v[2:])]:
        fitter = _ClosedLoopFitter(2, 1, ("extrapolate",), 0.0, 0.0, None, guidance, max_order=1)
        beta = fitter(1, [entry])[(0, 1)][1]
        expected = float((mapped(u) * mapped(r)).sum() / mapped(u).pow(2).sum())
        assert fitter.models[(1, 0, 1)] == "order 1" and beta == pytest.approx(expected, rel=1e-6)
        assert fitter.coef[1, 0, 1].tolist() == pytest.approx([0.0, expected, 0.0, 0.0, 0.0], rel=1e-6)
    assert _ClosedLoopFitter(2, 1, ("extrapolate",), 0.0, 0.0, None, 3.0)(1, [entry])[(0, 1)][1] != pytest.approx(
        _ClosedLoopFitter(2, 1, ("extrapolate",), 0.0, 0.0, None, None)(1, [entry])[(0, 1)][1], rel=1e-3)


# ------------------------------------------------------------------ fits on the tiny DiT
def test_perfect_prior_fit_finds_alpha_one_and_the_uncached_sample(model):
    # One pair, calibrated and fitted on itself: the target is exactly the prior delta at every entry.
    sampler = DDIMSampler(STEPS)
    prior = calibrate(model, sampler, [2], [11], cfg_scale=2.0, holdout=0.0, progress=False)
    fit = fit_coefficients(model, sampler, FORASchedule(3), prior, [2], [11], terms=("delta",), ridge=1e-6,
                           anchors=(None,), refine=None, min_gain=None, progress=False)
    reused = ~fit.mask
    torch.testing.assert_close(fit.coef[reused][:, 0], torch.ones(int(reused.sum())), atol=1e-4, rtol=0)
    assert (fit.coef[reused][:, 1:] == 0).all() and (fit.coef[fit.mask] == 0).all()
    prior.add_fit(fit)
    batch = (noise_for_seed(model, 11), torch.tensor([2]))
    uncached = sample(model, batch)
    calibrated = sample(model, batch, FORASchedule(3), prior, EOCConfig(mode="calibrated"))
    plain = sample(model, batch, FORASchedule(3))
    assert (calibrated - uncached).abs().max() <= 1e-3 * (plain - uncached).abs().max()


def test_calibrated_never_scores_below_its_anchor_on_the_tune_pairs(model, prior):
    schedule = FORASchedule(3)
    tune = pairs_batch(model, LABELS, TUNE_SEEDS)  # 8 pairs: the anchors are screened on 2, finalists on all
    fit = fit_coefficients(model, DDIMSampler(STEPS), schedule, prior, LABELS, SEEDS, tune_seeds=TUNE_SEEDS,
                           progress=False)
    info = fit.info
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
    uncached = sample(model, tune)
    score = trajectory_score_db(sample(model, tune, schedule, fitted, EOCConfig(mode="calibrated")), uncached)
    presets = {}
    for config in default_anchors(TERMS):  # the default terms: every preset, trend and delta with the prior
        needs = config is not None and config.needs_prior
        presets[preset_name(config)] = trajectory_score_db(sample(model, tune, schedule, prior if needs else None,
                                                                  config), uncached)
    # The anchor is the best of the finalists (scored on all 8 pairs); the screened-out ones were scored on 2.
    finalists = [n for n, count in info["anchor_score_samples"].items() if count == 8]
    assert len(finalists) == 3 and info["anchor"] == max(finalists, key=lambda n: presets[n])
    assert info["anchor_score_db"][info["anchor"]] == pytest.approx(presets[info["anchor"]], abs=1e-4)
    # The refinement keeps only what scores higher: the fit's score is its kept point's, never below the anchor.
    tried = info["tune_score_db"]
    assert score == pytest.approx(tried[info["refine_point"]], abs=1e-4) and score >= presets[info["anchor"]] - 1e-4
    assert score > presets[info["anchor"]] + 0.01 and info["refine_point"] != info["anchor"]  # it did find a gain
    # Every tried point is a finite difference along one direction or a Gauss-Newton step.
    assert {n for n in tried if n != info["anchor"]} <= {f"fd {d}" for d in info["refine_weights"]} | {
        "gauss-newton 1", "gauss-newton 1 (damped)", "gauss-newton 2", "gauss-newton 2 (damped)"}


def test_blend_zero_is_the_anchor_preset_exactly(model, prior, batch):
    schedule, anchor = FORASchedule(2), EOCConfig(mode="taylorseer", order=2)
    fit = fit_coefficients(model, DDIMSampler(STEPS), schedule, prior, LABELS, SEEDS, anchors=(anchor,),
                           refine="blend", gains=(0.0,), progress=False)
    assert fit.info["anchor"] == "taylorseer:2" and fit.info["gain"] == 0.0 and fit.coef.shape[-1] == 4  # reads C_2
    torch.testing.assert_close(fit.coef.double(), preset_coefficients(fit.mask, anchor, None)[..., :4], rtol=0,
                               atol=1e-7)
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
    assert torch.equal(sample(model, batch, schedule, fitted, EOCConfig(mode="calibrated")),
                       sample(model, batch, schedule, None, anchor))


def test_blend_is_chosen_on_the_tune_seeds_by_closeness_to_uncached(model, prior):
    sampler, schedule = DDIMSampler(STEPS), FORASchedule(2)  # FORA(2): β matters on this tiny model
    base = fit_coefficients(model, sampler, schedule, prior, [1, 2], [20], anchors=(None,), refine=None,
                            progress=False)
    grid = (0.25, 1.0, 2.0, 16.0)
    tuned = fit_coefficients(model, sampler, schedule, prior, [1, 2], [20], anchors=(None,), refine="blend",
                             gains=grid, tune_seeds=[30, 31], progress=False)
    assert base.info["gain"] == 1.0 and "tune_score_db" not in base.info
    scores = tuned.info["tune_score_db"]  # the blends the climb tried, 0 = the anchor (plain reuse here)
    assert {"0", "1"} <= set(scores) <= {"0", "0.25", "1", "2", "16"} and tuned.info["tune_samples"] == 4
    assert str(tuned.info["gain"]).removesuffix(".0") == max(scores, key=scores.get)
    torch.testing.assert_close(tuned.coef, tuned.info["gain"] * base.coef)
    # Each score is the closeness of the tune pairs' samples with that blend to their uncached samples.
    tune = pairs_batch(model, [1, 2], [30, 31])
    for g in scores:
        fitted = Prior(prior.mean, prior.stats, prior.metadata,
                       fits=[CoefficientFit(base.mask, float(g) * base.coef, {})])
        expected = trajectory_score_db(sample(model, tune, schedule, fitted, EOCConfig(mode="calibrated")),
                                       sample(model, tune))
        assert scores[g] == pytest.approx(expected, abs=1e-3)  # batch-size float noise: ~1e-5


def test_terms_and_order_restrict_the_fit(model, prior):
    kwargs = dict(anchors=(None,), refine=None, progress=False)
    fit = fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [1, 2], [20, 21],
                           terms=("extrapolate",), **kwargs)
    assert (fit.coef[..., 0] == 0).all() and (fit.coef[..., 2] == 0).all()
    # β_i needs i computes before the source: FORA(3) computes at 0, 3, 6, so steps 1-2 have none, 4-5 β₁ only.
    assert (fit.coef[1:3] == 0).all() and (fit.coef[4:6, ..., 3:] == 0).all() and (fit.coef[4:6, ..., 1] != 0).any()
    assert fit.coef.shape[-1] == 4 and (fit.coef[7:9, ..., 3] != 0).any()
    assert set(fit.info["orders"]) <= {"0", "1", "2"} and fit.info["orders"]["0"] >= 12  # steps 1-2: plain
    first = fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [1, 2], [20, 21], max_order=1,
                             **kwargs)
    assert first.coef.shape[-1] == 3 and set(first.info["orders"]) <= {"0", "1"}
    trend = fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [1, 2], [20, 21],
                             terms=("trend",), **kwargs)
    assert (trend.coef[..., [0, 1]] == 0).all() and (trend.coef[1:3, ..., 2] != 0).any()


def test_default_anchors_read_only_the_prior_terms_the_fit_may():
    names = [preset_name(c) for c in default_anchors(("extrapolate",))]
    assert names == ["plain", "extrapolate:0.8", "extrapolate:1", "extrapolate:1.2", "taylorseer:1", "taylorseer:2",
                     "taylorseer:3", "hicache:1", "hicache:2", "hicache:3"]
    assert [preset_name(c) for c in default_anchors(TERMS)][-2:] == ["trend", "delta"]


def test_judgment_that_disables_everything_is_plain_fora(model, prior, batch):
    fit = fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [1], [20], judge_threshold=1e9,
                           tune_seeds=[30], progress=False)
    assert (fit.coef == 0).all() and fit.info["corrected_entries"] == 0 and fit.info["models"] == {JUDGED: 36}
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
    for gains, error in [((), ValueError), ((1.0, -0.5), ValueError), ((1.0, float("nan")), ValueError),
                         (2.0, TypeError)]:
        with pytest.raises(error, match="gains"):
            fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], gains=gains)
    for anchors, error in [((), ValueError), ((EOCConfig(),), ValueError), (("taylorseer:2",), TypeError),
                           (3, TypeError)]:
        with pytest.raises(error, match="anchors"):
            fit_coefficients(model, sampler, FORASchedule(3), prior, [1], [2], anchors=anchors)
    for kwargs in [dict(judge_threshold=-0.1), dict(judge_threshold=None), dict(min_gain=float("nan")),
                   dict(min_gain="0"), dict(max_order=4), dict(max_order=1.0), dict(refine="adam"),
                   dict(refine_split="block"), dict(refine_split=None), dict(refine_iterations=0),
                   dict(refine_iterations=2.0), dict(refine_iterations=True)]:
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


@pytest.mark.parametrize("split, iterations", [("phase", 2), ("phase-block-branch", 3)])
def test_refinement_takes_steps_with_a_single_tune_pair(model, prior, split, iterations):
    # One tune pair has no halves to check: the step is judged on the pair alone (it was refused every time).
    schedule = FORASchedule(3)
    fit = fit_coefficients(model, DDIMSampler(STEPS), schedule, prior, [1], SEEDS, tune_seeds=[30], progress=False,
                           refine_split=split, refine_iterations=iterations)
    info = fit.info
    assert info["tune_samples"] == 1 and info["refine_point"].startswith("gauss-newton")
    assert info["refine_split"] == split and info["refine_iterations"] == iterations
    steps = [int(name.split()[1]) for name in info["tune_score_db"] if name.startswith("gauss-newton")]
    assert steps and max(steps) <= iterations
    pattern = r"(anchor|fit)@(1|2|3|4\+)" + ("" if split == "phase" else r"/b\d+\.(attn|mlp)")
    assert all(re.fullmatch(pattern, name) for name in info["refine_weights"] if name != "fit")
    tried = info["tune_score_db"]
    assert tried[info["refine_point"]] > tried[info["anchor"]]
    tune = pairs_batch(model, [1], [30])
    fitted = Prior(prior.mean, prior.stats, prior.metadata, fits=[fit])
    score = trajectory_score_db(sample(model, tune, schedule, fitted, EOCConfig(mode="calibrated")),
                                sample(model, tune))
    assert score == pytest.approx(tried[info["refine_point"]], abs=1e-4)


@pytest.mark.parametrize("split", ["phase-block", "phase-block-branch"])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_refinement_directions_split_by_block_and_branch_sum_to_the_phase_directions(interval, split):
    steps, blocks = 14, 3
    mask = FORASchedule(interval).mask(steps, blocks)
    mask[interval + 1, 2, 1] = True  # one branch computing alone: its phases shift against its sibling's
    gen = torch.Generator().manual_seed(interval)
    anchor = torch.randn(steps, blocks, 2, 5, generator=gen, dtype=torch.float64) * ~mask.unsqueeze(-1)
    anchor[:, 1, :, :] = 0  # block 1 has no anchor correction: its directions come from the fit
    computes = torch.cumsum(mask.long(), dim=0) - mask.long()  # computes before each step, per column
    anchor[computes == 1] = 0  # one compute before: the anchor is plain reuse (as every history preset)
    fitted = torch.randn(steps, blocks, 2, 5, generator=gen, dtype=torch.float64) * ~mask.unsqueeze(-1)
    by_phase = dict(refinement_directions(mask, anchor, fitted))
    by_split = dict(refinement_directions(mask, anchor, fitted, split))
    assert list(by_phase)[-1] == list(by_split)[-1] == "fit" and torch.equal(by_split["fit"], fitted - anchor)
    branches = {"attn": 0, "mlp": 1}
    for name, direction in by_split.items():
        if name == "fit":
            continue
        kind, place = name.split("@")
        phase, where_name = place.split("/b")
        block, _, branch = where_name.partition(".")
        assert (branch != "") == (split == "phase-block-branch")
        n = 4 if phase == "4+" else int(phase)
        where = ~mask & (computes.clamp(max=4) == n)
        where[:, [b for b in range(blocks) if b != int(block)]] = False
        if branch:
            where[:, :, 1 - branches[branch]] = False
        source = anchor if kind == "anchor" else fitted
        assert torch.equal(direction, source * where.unsqueeze(-1)) and bool((direction != 0).any())
        assert (kind == "fit") == (int(block) == 1 or n == 1)
    count = sum(1 for name in by_split if name != "fit")
    assert count == len({(p, b) for p in range(1, 5) for b in range(blocks) for k in range(2)
                         if bool((~mask & (computes.clamp(max=4) == p))[:, b, k].any())}
                        if split == "phase-block" else
                        {(p, b, k) for p in range(1, 5) for b in range(blocks) for k in range(2)
                         if bool((~mask & (computes.clamp(max=4) == p))[:, b, k].any())})
    # Each phase direction is the sum of its parts of the same kind (block 1's anchor part is zero).
    for name, direction in by_phase.items():
        if name != "fit":
            parts = [d for n, d in by_split.items() if n.split("/")[0] == name]
            assert parts and torch.allclose(sum(parts), direction, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="refine_split"):
        refinement_directions(mask, anchor, fitted, "block")
