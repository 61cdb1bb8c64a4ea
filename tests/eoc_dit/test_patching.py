"""apply_eoc / remove_eoc against independent hand-written caching loops (docs/DESIGN.md §2, §4)."""

import pytest
import torch

from eoc_dit import (
    DDIMSampler,
    DDPMSampler,
    EOCConfig,
    FORASchedule,
    MaskSchedule,
    apply_eoc,
    calibrate,
    noise_for_seed,
    remove_eoc,
)
from eoc_dit.executor import StepStrategy
from eoc_dit.models import modulate
from eoc_dit.patching import EOCHandle
from eoc_dit.prior import Prior
from eoc_dit.schedules import Schedule, TaylorSeerSchedule
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 9


class HandCachedDiT(torch.nn.Module):
    """An independent caching loop: the DiT forward written out, each branch either computed or
    replaced by ``correct(step, block, branch, history)`` where history lists (step, F) computed so far."""

    def __init__(self, model, mask, correct):
        super().__init__()
        self.model, self.mask, self.correct = model, mask, correct
        self.num_classes = model.num_classes
        self.calls = 0
        self.history = {}

    def forward(self, x, t, y):
        m, step = self.model, self.calls
        self.calls += 1
        if step == 0:
            self.history = {(l, k): [] for l in range(len(m.blocks)) for k in range(2)}
        x = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y, False)
        for l, block in enumerate(m.blocks):
            chunks = block.adaLN_modulation(c).chunk(6, dim=1)
            for k, (norm, branch) in enumerate(((block.norm1, block.attn), (block.norm2, block.mlp))):
                shift, scale, gate = chunks[3 * k : 3 * k + 3]
                if self.mask[step, l, k]:
                    feature = branch(modulate(norm(x), shift, scale))
                    self.history[(l, k)].append((step, feature))
                else:
                    feature = self.correct(step, l, k, self.history[(l, k)])
                x = x + gate.unsqueeze(1) * feature
        return m.unpatchify(m.final_layer(x, c))


def plain_reuse(step, l, k, history):
    return history[-1][1]


def extrapolate(theta):
    def correct(step, l, k, history):
        (s, cc) = history[-1]
        if len(history) < 2:
            return cc
        (p, cp) = history[-2]
        return cc + theta * (step - s) / (s - p) * (cc - cp)

    return correct


def with_prior(prior, theta, form):
    def correct(step, l, k, history):
        (s, cc) = history[-1]
        a_t, a_s = prior.mean[step, l, k].float(), prior.mean[s, l, k].float()  # [H, N, C]
        d = a_t - a_s
        rows = d.shape[0]
        d = d.repeat_interleave(cc.shape[0] // rows, dim=0).to(cc.dtype)
        if form == "delta":
            return cc + theta * d
        e = ((a_t - a_s) / (a_s.abs() + prior.trend_eps)).clamp(-1, 1)
        e = e.repeat_interleave(cc.shape[0] // rows, dim=0).to(cc.dtype)
        return cc * (1 + theta * e)

    return correct


def close(a, b, scale_of=None):
    scale = (scale_of if scale_of is not None else b).abs().max()
    torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    return make_tiny_dit()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=generator), torch.tensor([0, 3, 1])


@pytest.fixture(scope="module")
def uncached(model, inputs):
    return DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)


@pytest.fixture(scope="module")
def prior(model):
    return calibrate(model, DDIMSampler(STEPS), [0, 1, 2, 3], [5, 6], cfg_scale=2.0, max_gap=4, holdout=0.25,
                     progress=False)


def run(model, inputs, schedule, prior=None, config=None, cfg_scale=2.0, sampler=None):
    sampler = sampler or DDIMSampler(STEPS)
    with apply_eoc(model, schedule, prior=prior, config=config):
        return sampler.sample(model, *inputs, cfg_scale=cfg_scale)


def test_compute_everything_is_bit_identical(model, inputs, uncached):
    assert torch.equal(run(model, inputs, FORASchedule(1)), uncached)
    mask = torch.ones(STEPS, len(model.blocks), 2, dtype=torch.bool)
    assert torch.equal(run(model, inputs, MaskSchedule(mask)), uncached)


def test_remove_restores_bit_identical_model(inputs):
    model = make_tiny_dit()
    before = DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
    handle = apply_eoc(model, FORASchedule(3), config=EOCConfig(mode="extrapolate"))
    cached = DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
    assert not torch.equal(cached, before)
    remove_eoc(model)
    assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in model.blocks)
    assert not hasattr(model, "_eoc_handle")
    assert torch.equal(DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0), before)
    handle.remove()  # idempotent
    remove_eoc(model)  # no-op on an unpatched model


def test_context_manager_restores(model, inputs, uncached):
    with apply_eoc(model, FORASchedule(2)):
        pass
    assert torch.equal(DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0), uncached)


@pytest.mark.parametrize("interval,warmup", [(2, 0), (3, 0), (3, 2)])
def test_plain_fora_equals_hand_loop(model, inputs, interval, warmup):
    schedule = FORASchedule(interval, warmup)
    hand = HandCachedDiT(model, schedule.mask(STEPS, len(model.blocks)), plain_reuse)
    expected = DDIMSampler(STEPS).sample(hand, *inputs, cfg_scale=2.0)
    got = run(model, inputs, schedule)
    close(got, expected)


def test_mask_schedule_with_single_branch_reuse_equals_hand_loop(model, inputs):
    # Attention and MLP reused independently: exercises cached_branch as well as cached_block.
    generator = torch.Generator().manual_seed(3)
    mask = torch.rand(STEPS, len(model.blocks), 2, generator=generator) < 0.5
    mask[0] = True
    assert (mask[:, :, 0] != mask[:, :, 1]).any() and (~mask).all(-1).any()
    hand = HandCachedDiT(model, mask, extrapolate(0.7))
    expected = DDIMSampler(STEPS).sample(hand, *inputs, cfg_scale=2.0)
    got = run(model, inputs, MaskSchedule(mask), config=EOCConfig(mode="extrapolate", theta=0.7))
    close(got, expected)


@pytest.mark.parametrize("interval", [2, 3])
def test_extrapolate_equals_hand_loop(model, inputs, uncached, interval):
    schedule = FORASchedule(interval)
    hand = HandCachedDiT(model, schedule.mask(STEPS, len(model.blocks)), extrapolate(1.0))
    expected = DDIMSampler(STEPS).sample(hand, *inputs, cfg_scale=2.0)
    got = run(model, inputs, schedule, config=EOCConfig(mode="extrapolate", theta=1.0))
    close(got, expected)
    assert not torch.allclose(got, run(model, inputs, schedule), atol=1e-3)  # the correction did something


@pytest.mark.parametrize("form,theta", [("trend", 0.5), ("delta", 0.8)])
def test_prior_presets_equal_hand_loop(model, inputs, prior, form, theta):
    schedule = FORASchedule(3)
    hand = HandCachedDiT(model, schedule.mask(STEPS, len(model.blocks)), with_prior(prior, theta, form))
    expected = DDIMSampler(STEPS).sample(hand, *inputs, cfg_scale=2.0)
    config = EOCConfig(mode=form, theta=theta, min_gain=None)
    got = run(model, inputs, schedule, prior=prior, config=config)
    close(got, expected)
    assert not torch.allclose(got, run(model, inputs, schedule), atol=1e-3)


@pytest.mark.parametrize("mode", ["trend", "delta", "extrapolate"])
def test_theta_zero_is_plain_fora(model, inputs, prior, mode):
    plain = run(model, inputs, FORASchedule(3))
    assert torch.equal(run(model, inputs, FORASchedule(3), prior, EOCConfig(mode=mode, theta=0.0)), plain)


@pytest.mark.parametrize("mode", ["trend", "delta", "extrapolate"])
def test_judgment_that_disables_everything_is_plain_fora(model, inputs, prior, mode):
    plain = run(model, inputs, FORASchedule(3))
    config = EOCConfig(mode=mode, theta=1.0, judge_threshold=1e9)
    assert torch.equal(run(model, inputs, FORASchedule(3), prior, config), plain)
    config = EOCConfig(mode=mode, theta=1.0, min_gain=1e9)  # no correction can gain that much
    assert torch.equal(run(model, inputs, FORASchedule(3), prior, config), plain)


def test_judgment_keeps_only_entries_that_gain(model, prior):
    # With min_gain=0 the judgment keeps an entry exactly when its calibration error does not grow.
    handle = apply_eoc(model, FORASchedule(3), prior, EOCConfig(mode="delta", theta=1.0, min_gain=0.0))
    try:
        kept = dropped = 0
        for (t, l, k), plan in handle.plan.entries.items():
            plain = prior.plain_error(t, plan.source, l, k)
            corrected = prior.corrected_error(t, plan.source, plan.previous, l, k, (1.0, 0.0, 0.0))
            assert plan.corrected == (corrected <= plain)
            kept += plan.corrected
            dropped += not plan.corrected
    finally:
        handle.remove()
    assert kept + dropped == len(handle.plan.entries) > 0


def test_huge_token_threshold_corrects_nothing(model, inputs):
    plain = run(model, inputs, FORASchedule(3))
    config = EOCConfig(mode="extrapolate", token_threshold=1e9)
    assert torch.equal(run(model, inputs, FORASchedule(3), config=config), plain)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_perfect_prior_reproduces_uncached_sample(cfg_scale):
    # Calibrated on exactly the sampled (label, seed): every corrected feature is the uncached one,
    # by induction over steps, so the cached sample equals the uncached sample.
    model = make_tiny_dit(seed=4)
    sampler = DDIMSampler(STEPS)
    prior = calibrate(model, sampler, [2], [11], cfg_scale=cfg_scale, holdout=0.0, progress=False)
    noise, labels = noise_for_seed(model, 11), torch.tensor([2])
    uncached = sampler.sample(model, noise, labels, cfg_scale=cfg_scale)
    config = EOCConfig(mode="delta", theta=1.0, judge_threshold=0.0, min_gain=None)
    corrected = run(model, (noise, labels), FORASchedule(3), prior, config, cfg_scale=cfg_scale)
    plain = run(model, (noise, labels), FORASchedule(3), cfg_scale=cfg_scale)
    plain_error = (plain - uncached).abs().max()
    assert plain_error >= 1e-4 * uncached.abs().max()  # caching alone changes the sample clearly
    assert (corrected - uncached).abs().max() <= 1e-3 * plain_error


def test_step_counting_without_announcements(model, inputs, uncached):
    """A third-party sampler that never announces steps: the timestep going up starts a new run."""

    class Quiet(torch.nn.Module):  # hides the listener attribute, so nothing is announced
        def __init__(self, inner):
            super().__init__()
            self.inner, self.num_classes = inner, inner.num_classes

        def forward(self, x, t, y):
            return self.inner(x, t, y)

    schedule = FORASchedule(3)
    expected = run(model, inputs, schedule, config=EOCConfig(mode="extrapolate"))
    with apply_eoc(model, schedule, config=EOCConfig(mode="extrapolate")) as handle:
        first = DDIMSampler(STEPS).sample(Quiet(model), *inputs, cfg_scale=2.0)
        assert handle.step == STEPS - 1
        second = DDIMSampler(STEPS).sample(Quiet(model), *inputs, cfg_scale=2.0)  # resets on its own
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_ddpm_sampler_runs_patched(model, inputs):
    sampler = DDPMSampler(STEPS)
    uncached = sampler.sample(model, *inputs, cfg_scale=2.0)
    assert torch.equal(run(model, inputs, FORASchedule(1), sampler=sampler), uncached)


def test_observer_sees_every_computed_branch(model, inputs):
    seen = []
    with apply_eoc(model, FORASchedule(2), observer=lambda t, l, k, f: seen.append((t, l, k, tuple(f.shape)))):
        DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
    expected = [(t, l, k) for t in range(0, STEPS, 2) for l in range(len(model.blocks)) for k in range(2)]
    assert [s[:3] for s in seen] == expected
    assert all(s[3] == (6, 16, 32) for s in seen)  # CFG doubles the batch of 3


# ------------------------------------------------------------------------------------------ bad input
def test_bad_arguments(model, prior):
    with pytest.raises(TypeError, match="model"):
        apply_eoc("not a model", FORASchedule(2))
    with pytest.raises(TypeError, match="schedule"):
        apply_eoc(model, 3)
    with pytest.raises(TypeError, match="config"):
        apply_eoc(model, FORASchedule(2), config={"mode": "trend"})
    with pytest.raises(TypeError, match="prior"):
        apply_eoc(model, FORASchedule(2), prior="prior.safetensors", config=EOCConfig(mode="trend"))
    with pytest.raises(ValueError, match="needs a prior"):
        apply_eoc(model, FORASchedule(2), config=EOCConfig(mode="trend"))
    with pytest.raises(ValueError, match="judge_threshold"):
        apply_eoc(model, FORASchedule(2), config=EOCConfig(mode="extrapolate", judge_threshold=0.1))
    assert not hasattr(model, "_eoc_handle")  # failed patches leave nothing behind


def test_double_patch_is_refused(model):
    with apply_eoc(model, FORASchedule(2)):
        with pytest.raises(ValueError, match="already patched"):
            apply_eoc(model, FORASchedule(3))


def test_schedule_block_count_mismatch(model):
    mask = torch.ones(STEPS, len(model.blocks) + 1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="block count mismatch.*4 blocks.*3"):
        with apply_eoc(model, MaskSchedule(mask)):
            DDIMSampler(STEPS).sample(model, torch.randn(1, 1, 8, 8), torch.tensor([0]))


def test_step_count_mismatch(model):
    mask = torch.ones(STEPS, len(model.blocks), 2, dtype=torch.bool)
    with apply_eoc(model, MaskSchedule(mask)):
        with pytest.raises(ValueError, match=f"num_steps mismatch.*{STEPS}.*{STEPS + 2}|step count mismatch"):
            DDIMSampler(STEPS + 2).sample(model, torch.randn(1, 1, 8, 8), torch.tensor([0]))


def test_prior_step_and_cfg_mismatch(model, prior):
    config = EOCConfig(mode="delta")
    with apply_eoc(model, FORASchedule(3), prior, config):
        with pytest.raises(ValueError, match=f"num_steps mismatch.*{STEPS}.*{STEPS + 1}"):
            DDIMSampler(STEPS + 1).sample(model, torch.randn(1, 1, 8, 8), torch.tensor([0]), cfg_scale=2.0)
        with pytest.raises(ValueError, match="cfg mismatch"):
            DDIMSampler(STEPS).sample(model, torch.randn(1, 1, 8, 8), torch.tensor([0]), cfg_scale=1.0)


def test_prior_of_another_model_is_refused(prior):
    wider = make_tiny_dit(hidden_size=48)
    with pytest.raises(ValueError, match="width: the prior has 32, the model has 48"):
        apply_eoc(wider, FORASchedule(3), prior, EOCConfig(mode="delta"))
    deeper = make_tiny_dit(depth=4)
    with pytest.raises(ValueError, match="num_blocks: the prior has 3, the model has 4"):
        apply_eoc(deeper, FORASchedule(3), prior, EOCConfig(mode="delta"))


def test_schedule_gap_beyond_prior_max_gap(model, prior):
    # FORA interval 6 reuses 5 steps after its source, the prior judges gaps up to 4.
    with pytest.raises(ValueError, match="max_gap mismatch.*5.*max_gap=4"):
        apply_eoc(model, FORASchedule(6), prior, EOCConfig(mode="delta"))
    # Without the judgment no statistics are needed, so the same schedule is accepted.
    apply_eoc(model, FORASchedule(6), prior, EOCConfig(mode="delta", min_gain=None)).remove()


def test_unavailable_backend_fails_at_patch_time(model, monkeypatch):
    import eoc_kernels.triton._common as triton_common

    monkeypatch.setattr(triton_common, "INTERPRETED", False)  # CPU tensors, no interpreter: triton cannot run
    with pytest.raises(ValueError, match="triton.*not available"):
        apply_eoc(model, FORASchedule(2), config=EOCConfig(mode="extrapolate", backend="triton"))
    assert not hasattr(model, "_eoc_handle")
    with pytest.raises(ValueError, match="cuda.*not available"):  # the CUDA C++ kernels: not on CPU tensors
        apply_eoc(model, FORASchedule(2), config=EOCConfig(mode="extrapolate", backend="cuda"))
    assert not hasattr(model, "_eoc_handle")
    with pytest.raises(ValueError, match="backend must be one of"):  # no backend by that name exists
        EOCConfig(mode="extrapolate", backend="rocm")


def test_sampler_refuses_noise_on_another_device(model):
    with pytest.raises(ValueError, match="noise must be on the model's device"):
        DDIMSampler(STEPS).sample(model, torch.randn(1, 1, 8, 8, device="meta"), torch.tensor([0], device="meta"))


class CountdownSchedule(Schedule):
    """Computes at the last step and every ``interval`` steps counted back from it (and at step 0):
    its mask depends on the run length, not only on the step index."""

    def __init__(self, interval):
        self.interval = interval

    def mask(self, num_steps, num_blocks):
        steps = torch.tensor([t == 0 or (num_steps - 1 - t) % self.interval == 0 for t in range(num_steps)])
        return steps[:, None, None].expand(num_steps, num_blocks, 2).clone()


def test_plans_follow_a_mask_that_changes_with_the_run_length(model, inputs):
    # One handle, runs of different lengths: each run must follow its own mask (source steps and β
    # recomputed), not the plans of the run before. Caught a bug: plans were cached by entry only.
    schedule, config = CountdownSchedule(3), EOCConfig(mode="extrapolate")
    with apply_eoc(model, schedule, config=config):
        got = {steps: DDIMSampler(steps).sample(model, *inputs, cfg_scale=2.0) for steps in (8, 9, 7, 8)}
    for steps in (7, 8, 9):
        mask = schedule.mask(steps, len(model.blocks))
        assert not torch.equal(mask, schedule.mask(steps + 1, len(model.blocks))[:steps])  # the test can fail
        hand = HandCachedDiT(model, mask, extrapolate(1.0))
        close(got[steps], DDIMSampler(steps).sample(hand, *inputs, cfg_scale=2.0))


def test_a_length_dependent_schedule_refuses_an_unannounced_run(model, inputs):
    class Unannounced(torch.nn.Module):  # a third-party sampler's view: calls the model, announces nothing
        def __init__(self, inner):
            super().__init__()
            self.inner, self.num_classes = inner, inner.num_classes

        def forward(self, x, t, y):
            return self.inner.forward(x, t, y)

    with apply_eoc(model, CountdownSchedule(3)):
        with pytest.raises(ValueError, match="depends on the step count"):
            DDIMSampler(5).sample(Unannounced(model), *inputs)


def test_prior_terms_are_built_once_and_only_where_a_coefficient_reads_them(model, inputs, prior):
    # mode trend reads E only: no D may be built, and each E exactly once (one [H, N, C] slab per entry).
    H, N, C = prior.mean.shape[3:]
    slab = H * N * C * 4  # fp32 model
    for mode, reads in (("trend", "trend"), ("delta", "delta")):
        with apply_eoc(model, FORASchedule(3), prior, EOCConfig(mode=mode, min_gain=None)) as handle:
            DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
            DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)  # a second run builds nothing more
            corrected = sum(entry.corrected for entry in handle.plan.entries.values())
            assert corrected == len(handle.plan.entries) > 0
            terms = handle.prior_terms
            # Segments hold every reused block of a FORA step: one stacked tensor per step and read term.
            assert not terms._entries and all(key[0] == (2 if reads == "trend" else 0) for key in terms._segments)
            assert terms.bytes == len(handle.plan.entries) * slab


def test_default_config_is_one_rule(model, prior):
    from eoc_dit.fitting import fit_coefficients

    assert EOCConfig().mode == "calibrated"
    prior = Prior(prior.mean, prior.stats, prior.metadata)
    prior.add_fit(fit_coefficients(model, DDIMSampler(STEPS), FORASchedule(3), prior, [0, 1], [7], gains=(1.0,),
                                   progress=False))
    with apply_eoc(model, FORASchedule(3), prior) as handle:
        assert handle.config == EOCConfig()
    with apply_eoc(model, FORASchedule(3)) as handle:
        assert handle.config is None  # no prior: plain caching
    with pytest.raises(ValueError, match="needs a prior"):
        apply_eoc(model, FORASchedule(3), config=EOCConfig())


# ------------------------------------------------------------------------------------------ strategies
class ForecastingStrategy(StepStrategy):
    """Hands in a preset's coefficients step by step, checking what StepContext.history shows on the way."""

    def __init__(self, config, observed, num_generations):
        self.config, self.observed, self.num_generations = config, observed, num_generations
        self.entries_seen = 0

    def step_coefficients(self, context):
        coefficients = {}
        for l, k in context.reuse_entries:
            entry = context.entry(l, k)
            history = context.history(l, k)
            assert len(history) == min(len(entry.history), self.num_generations)
            for s, feature in zip(entry.history, history):  # C_j is this run's feature at the step s_j
                assert torch.equal(feature, self.observed[(s, l, k)])
            assert context.cached(l, k) is not None and torch.equal(context.cached(l, k), history[0])
            assert (context.previous(l, k) is None) == (len(history) < 2)
            coefficients[(l, k)] = self.config.coefficients(context.step, entry.history)
            self.entries_seen += 1
        return coefficients


@pytest.mark.parametrize("order", [1, 3])
def test_strategy_history_and_coefficients_equal_the_fused_preset(model, inputs, order):
    config = EOCConfig(mode="taylorseer", order=order)
    schedule = TaylorSeerSchedule(2)
    fused = run(model, inputs, schedule, config=config)
    observed = {}

    def observer(step, block, branch, feature):
        observed[(step, block, branch)] = feature.clone()

    strategy = ForecastingStrategy(config, observed, num_generations=4)
    with EOCHandle(model, schedule, observer=observer, strategy=strategy) as handle:
        branchwise = DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
        assert handle.plan.num_generations == 4 and handle.cache.buffer.shape[0] == 4  # what the strategy keeps
    assert strategy.entries_seen > 0
    close(branchwise, fused)


def test_strategy_generations_are_checked(model, inputs):
    strategy = ForecastingStrategy(EOCConfig(mode="taylorseer", order=2), {}, num_generations=5)
    with pytest.raises(ValueError, match="num_generations must be an int in 1..4"):
        EOCHandle(model, FORASchedule(2), strategy=strategy)
    class ReadsTooFar(StepStrategy):
        num_generations = 2

        def step_coefficients(self, context):
            return {entry: (0.0, 1.0, 0.0, 0.5) for entry in context.reuse_entries}

    with EOCHandle(model, FORASchedule(2), strategy=ReadsTooFar()):  # β₂ needs C_2: two generations are kept
        with pytest.raises(ValueError, match="read C_2.*keeps 2"):
            DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
