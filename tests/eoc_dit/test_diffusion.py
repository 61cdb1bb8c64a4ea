"""Tests for eoc_dit.diffusion: DiT's schedule and respacing, DDIM/DDPM steps against hand computations,
classifier-free guidance, the step announcements, determinism and input validation.

All models here are tiny deterministic fakes; the schedule references are recomputed independently
from the formulas of DiT's ``diffusion/`` package.
"""

import numpy as np
import pytest
import torch

from eoc_dit import step_protocol
from eoc_dit.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DiffusionSchedule,
    linear_beta_schedule,
    respace_betas,
    space_timesteps,
)

SAMPLERS = [DDIMSampler, DDPMSampler]
NUM_CLASSES = 10


def reference_alphas_cumprod():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


class FakeDiT(torch.nn.Module):
    """eps = 0.1 * x + f(t, y); with ``learn_sigma`` the output is [eps; v] with v = ``var_value``.

    Records every call as (x, t, y) and, interleaved, every step announcement in ``events``.
    """

    def __init__(self, learn_sigma=False, var_value=0.0, listen=False):
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.learn_sigma = learn_sigma
        self.var_value = var_value
        self.weight = torch.nn.Parameter(torch.tensor(0.1))  # so no_grad is observable
        self.calls = []
        self.events = []
        if listen:
            setattr(self, step_protocol.LISTENER_ATTR, self._listen)

    def _listen(self, step, num_steps, cfg):
        self.events.append(("announce", step, num_steps, cfg))

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        self.events.append(("forward", x.shape[0]))
        channel = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
        shift = (0.01 * (t.to(x.dtype) / 1000 + y.to(x.dtype) / NUM_CLASSES)).view(-1, 1, 1, 1)
        eps = self.weight * x + shift * (channel + 1)
        if not self.learn_sigma:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.var_value)], dim=1)


class TrueNoiseModel(torch.nn.Module):
    """Returns the exact noise of x_t for a known x0: eps(x, t) = (x - sqrt(acp_t) x0) / sqrt(1 - acp_t)."""

    num_classes = NUM_CLASSES

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.alphas_cumprod = torch.from_numpy(reference_alphas_cumprod())

    def forward(self, x, t, y):
        acp = self.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - acp.sqrt() * self.x0) / (1 - acp).sqrt()


def make_inputs(batch=2, channels=3, size=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return noise, labels


# ----------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------


def test_linear_beta_schedule_endpoints():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    assert np.all(np.diff(betas) > 0)


def test_respaced_timesteps_match_dit_formula():
    expected = [round(i * 999 / 19) for i in range(20)]
    assert space_timesteps(1000, 20) == expected
    sampler = DDIMSampler(20)
    assert sampler.timesteps == expected[::-1]
    assert sampler.schedule.timestep_map == tuple(expected)


def test_respacing_accumulates_stride_like_dit():
    # DiT adds the float stride each step; at 21 steps that rounds the middle step to 499, not 500.
    kept = space_timesteps(1000, 21)
    assert kept[10] == 499 and round(10 * 999 / 20) == 500
    for num_steps in (1, 2, 7, 50, 250, 1000):
        kept = space_timesteps(1000, num_steps)
        assert len(kept) == num_steps and kept[0] == 0 and kept == sorted(kept)
        assert num_steps == 1 or kept[-1] == 999


@pytest.mark.parametrize("num_steps", [1, 2, 20, 250])
def test_respaced_betas_reproduce_alphas_cumprod(num_steps):
    acp = reference_alphas_cumprod()
    kept = space_timesteps(1000, num_steps)
    new_betas = respace_betas(acp, kept)
    np.testing.assert_allclose(np.cumprod(1.0 - new_betas), acp[kept], rtol=1e-12, atol=0)
    schedule = DiffusionSchedule.respaced(num_steps)
    np.testing.assert_allclose(schedule.alphas_cumprod, acp[kept], rtol=1e-12, atol=0)
    assert len(schedule) == num_steps


def test_sampler_attributes():
    for cls, name in ((DDIMSampler, "ddim"), (DDPMSampler, "ddpm")):
        sampler = cls(4)
        assert sampler.num_steps == 4 and sampler.name == name
        assert sampler.timesteps == [999, 666, 333, 0]
        assert all(type(t) is int for t in sampler.timesteps)


# ----------------------------------------------------------------------------------------------------
# Sampling math against hand computations
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, num_steps, atol", [(torch.float64, 10, 1e-9), (torch.float64, 250, 1e-9), (torch.float32, 50, 1e-3)]
)
def test_ddim_with_true_noise_recovers_x0(dtype, num_steps, atol):
    x0, labels = make_inputs(dtype=dtype, seed=1)
    x0 = x0.clamp(-1, 1)
    n, _ = make_inputs(dtype=dtype, seed=2)
    acp_T = torch.tensor(reference_alphas_cumprod()[999], dtype=dtype)
    x_T = acp_T.sqrt() * x0 + (1 - acp_T).sqrt() * n
    out = DDIMSampler(num_steps).sample(TrueNoiseModel(x0), x_T, labels)
    torch.testing.assert_close(out, x0, atol=atol, rtol=0)


def _hand_x0(x, eps, acp):
    return np.sqrt(1 / acp) * x - np.sqrt(1 / acp - 1) * eps


def test_ddim_two_steps_by_hand():
    noise, labels = make_inputs()
    model = FakeDiT()
    out = DDIMSampler(2).sample(model, noise, labels)

    acp = reference_alphas_cumprod()
    reference = FakeDiT()
    x = noise
    # Step at t = 999 (respaced index 1, previous kept step 0), then the last step at t = 0.
    t = torch.full((2,), 999)
    eps = reference(x, t, labels)
    x0 = _hand_x0(x, eps, acp[999])
    eps = (np.sqrt(1 / acp[999]) * x - x0) / np.sqrt(1 / acp[999] - 1)
    x = x0 * np.sqrt(acp[0]) + np.sqrt(1 - acp[0]) * eps
    eps = reference(x, torch.zeros(2, dtype=torch.long), labels)
    expected = _hand_x0(x, eps, acp[0])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    assert [c[1].tolist() for c in model.calls] == [[999, 999], [0, 0]]
    assert all(c[1].dtype == torch.long for c in model.calls)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_two_steps_by_hand(learn_sigma):
    noise, labels = make_inputs()
    var_value = 0.3
    model = FakeDiT(learn_sigma=learn_sigma, var_value=var_value)
    out = DDPMSampler(2).sample(model, noise, labels, generator=torch.Generator().manual_seed(7))

    acp = reference_alphas_cumprod()
    a1, a0 = acp[999], acp[0]
    beta1 = 1 - a1 / a0  # respaced beta of step 1
    reference = FakeDiT()
    x = noise
    eps = reference(x, torch.full((2,), 999), labels)
    x0 = _hand_x0(x, eps, a1)
    mean = beta1 * np.sqrt(a0) / (1 - a1) * x0 + (1 - a0) * np.sqrt(1 - beta1) / (1 - a1) * x
    min_log = np.log(beta1 * (1 - a0) / (1 - a1))  # posterior variance at step 1 (clipped log)
    if learn_sigma:
        frac = (var_value + 1) / 2
        log_var = frac * np.log(beta1) + (1 - frac) * min_log
    else:
        log_var = min_log
    step_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7), dtype=noise.dtype)
    x = mean + np.exp(0.5 * log_var) * step_noise
    eps = reference(x, torch.zeros(2, dtype=torch.long), labels)
    expected = _hand_x0(x, eps, a0)  # last step: posterior mean with coef1 = 1, coef2 = 0, no noise
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_clip_denoised_clamps_x0(cls):
    noise, labels = make_inputs()
    noise = noise * 5
    clipped = cls(1, clip_denoised=True).sample(FakeDiT(), noise, labels)
    # One step returns x0 directly.
    assert clipped.abs().max() <= 1.0
    unclipped = cls(1).sample(FakeDiT(), noise, labels)
    assert unclipped.abs().max() > 1.0


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", SAMPLERS)
def test_cfg_batches_cond_and_null(cls):
    noise, labels = make_inputs(batch=3)
    model = FakeDiT()
    cls(3).sample(model, noise, labels, cfg_scale=4.0)
    assert len(model.calls) == 3
    for x, t, y in model.calls:
        assert x.shape[0] == 6 and t.shape == (6,) and y.shape == (6,)
        torch.testing.assert_close(x[:3], x[3:], rtol=0, atol=0)
        assert y[:3].tolist() == labels.tolist()
        assert y[3:].tolist() == [NUM_CLASSES] * 3


@pytest.mark.parametrize("cls", SAMPLERS)
def test_cfg_scale_one_runs_conditional_batch(cls):
    noise, labels = make_inputs(batch=3)
    model = FakeDiT()
    cls(3).sample(model, noise, labels, cfg_scale=1.0)
    for x, _t, y in model.calls:
        assert x.shape[0] == 3 and y.tolist() == labels.tolist()


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cfg_guidance_formula_one_step(learn_sigma):
    noise, labels = make_inputs()
    scale = 3.5
    out = DDIMSampler(1).sample(FakeDiT(learn_sigma=learn_sigma), noise, labels, cfg_scale=scale)
    reference = FakeDiT()
    t = torch.zeros(2, dtype=torch.long)
    cond = reference(noise, t, labels)
    uncond = reference(noise, t, torch.full_like(labels, NUM_CLASSES))
    eps = uncond + scale * (cond - uncond)
    expected = _hand_x0(noise, eps, reference_alphas_cumprod()[0])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_cfg_variance_from_conditional_half():
    noise, labels = make_inputs()

    class HalfVariance(FakeDiT):
        def forward(self, x, t, y):
            out = super().forward(x, t, y)
            half = x.shape[0] // 2
            out[:half, x.shape[1]:] = self.var_value
            out[half:, x.shape[1]:] = float("nan")  # the unconditional variance must never be read
            return out

    gen = torch.Generator().manual_seed(3)
    model = HalfVariance(learn_sigma=True, var_value=0.2)
    out = DDPMSampler(3).sample(model, noise, labels, cfg_scale=2.0, generator=gen)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------
# Step announcements, determinism, variance channels, no side effects
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", SAMPLERS)
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_announce_step_before_each_call(cls, cfg_scale):
    noise, labels = make_inputs()
    model = FakeDiT(listen=True)
    cls(5).sample(model, noise, labels, cfg_scale=cfg_scale)
    batch = 4 if cfg_scale > 1 else 2
    expected = []
    for step in range(5):
        expected += [("announce", step, 5, cfg_scale > 1), ("forward", batch)]
    assert model.events == expected


@pytest.mark.parametrize("cls", SAMPLERS)
def test_deterministic_and_noise_untouched(cls):
    noise, labels = make_inputs()
    noise_before = noise.clone()
    model = FakeDiT(learn_sigma=True, var_value=-0.2)
    first = cls(6).sample(model, noise, labels, cfg_scale=2.0)
    second = cls(6).sample(model, noise, labels, cfg_scale=2.0)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(noise, noise_before, rtol=0, atol=0)
    assert not first.requires_grad


def test_ddpm_generator_seeds():
    noise, labels = make_inputs()
    sampler = DDPMSampler(6)
    model = FakeDiT()

    def run(seed):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return sampler.sample(model, noise, labels, generator=gen)

    torch.testing.assert_close(run(5), run(5), rtol=0, atol=0)
    assert not torch.equal(run(5), run(6))
    torch.testing.assert_close(run(None), run(0), rtol=0, atol=0)


def test_learned_variance_used_by_ddpm_ignored_by_ddim():
    noise, labels = make_inputs()

    def run(cls, var_value):
        model = FakeDiT(learn_sigma=True, var_value=var_value)
        return cls(4).sample(model, noise, labels, generator=torch.Generator().manual_seed(1))

    assert not torch.allclose(run(DDPMSampler, -0.5), run(DDPMSampler, 0.5))
    torch.testing.assert_close(run(DDIMSampler, -0.5), run(DDIMSampler, 0.5), rtol=0, atol=0)
    plain = DDIMSampler(4).sample(FakeDiT(), noise, labels)
    torch.testing.assert_close(run(DDIMSampler, 0.5), plain, rtol=0, atol=0)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_output_dtype_follows_noise(cls):
    noise, labels = make_inputs(dtype=torch.float32)
    out = cls(3).sample(FakeDiT(learn_sigma=True), noise, labels, cfg_scale=1.5)
    assert out.dtype == torch.float32 and out.shape == noise.shape


def test_progress_bar(capsys):
    noise, labels = make_inputs()
    DDIMSampler(3).sample(FakeDiT(), noise, labels, progress=False)
    assert capsys.readouterr().err == ""
    DDPMSampler(3).sample(FakeDiT(), noise, labels, progress=True)
    err = capsys.readouterr().err
    assert "ddpm" in err and "step" in err


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps, error", [(0, ValueError), (1001, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_num_steps(num_steps, error):
    for cls in SAMPLERS:
        with pytest.raises(error, match="num_steps"):
            cls(num_steps)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_bad_inputs(cls):
    noise, labels = make_inputs()
    sampler = cls(2)
    model = FakeDiT()
    cases = [
        (dict(noise=noise[0]), "noise"),
        (dict(noise=noise.long()), "noise"),
        (dict(labels=labels.float()), "labels"),
        (dict(labels=labels[:1]), "labels"),
        (dict(labels=labels.to("meta")), "labels"),
        (dict(cfg_scale=0.5), "cfg_scale"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
    ]
    for overrides, name in cases:
        kwargs = dict(model=model, noise=noise, labels=labels, cfg_scale=1.0) | overrides
        with pytest.raises(ValueError, match=name):
            sampler.sample(**kwargs)
    with pytest.raises(TypeError, match="generator"):
        sampler.sample(model, noise, labels, generator=123)
    with pytest.raises(TypeError, match="model"):
        sampler.sample("not a model", noise, labels)


@pytest.mark.parametrize("cls", SAMPLERS)
def test_cfg_needs_num_classes(cls):
    noise, labels = make_inputs()

    class NoClasses(torch.nn.Module):
        def forward(self, x, t, y):
            return x

    with pytest.raises(ValueError, match="num_classes"):
        cls(2).sample(NoClasses(), noise, labels, cfg_scale=2.0)
    cls(2).sample(NoClasses(), noise, labels, cfg_scale=1.0)  # no guidance: not needed


@pytest.mark.parametrize("cls", SAMPLERS)
def test_bad_model_output(cls):
    noise, labels = make_inputs()

    class WrongChannels(torch.nn.Module):
        num_classes = NUM_CLASSES

        def forward(self, x, t, y):
            return torch.cat([x, x, x], dim=1)

    with pytest.raises(ValueError, match="model output"):
        cls(2).sample(WrongChannels(), noise, labels)
