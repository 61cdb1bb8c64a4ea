"""The samplers' DiT-compatibility options (docs/DESIGN.md §4.2) against a hand-written loop of the
original DiT release's maths: ``forward_with_cfg`` guiding only the first 3 of 4 latent channels on
the doubled batch, guided-diffusion's DDIM (eta 0) and ``p_sample`` (learned-range variance, noise
drawn with ``randn_like`` of the doubled batch)."""

import math

import numpy as np
import pytest
import torch

from eoc_dit import DDIMSampler, DDPMSampler, DiT
from eoc_dit.errors import InputValueError

STEPS, B = 5, 3


@pytest.fixture(scope="module")
def latent_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                learn_sigma=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if "adaLN" in name else 0.6 / p.shape[-1] ** 0.5)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def original_loop(model, z, y, scale, timestep_map, kind, generator=None):
    """sample.py of the DiT release: x = [z; z], labels [y; null]; each step forward_with_cfg (guide channels
    0-2, the rest of each half unguided), then guided-diffusion's update on the whole doubled batch."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac_all = np.cumprod(1.0 - betas)
    ac = ac_all[list(timestep_map)]  # respaced alphas_cumprod
    ac_prev = np.append(1.0, ac[:-1])
    rbetas = 1.0 - ac / ac_prev
    post_var = rbetas * (1.0 - ac_prev) / (1.0 - ac)
    post_log = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = rbetas * np.sqrt(ac_prev) / (1.0 - ac), (1.0 - ac_prev) * np.sqrt(1.0 - rbetas) / (1.0 - ac)
    x = torch.cat([z, z])
    y_in = torch.cat([y, torch.full_like(y, model.num_classes)])
    C = z.shape[1]
    for i in reversed(range(len(timestep_map))):
        t = torch.full((2 * B,), timestep_map[i], dtype=torch.long)
        half = x[:B]
        out = model(torch.cat([half, half]), t, y_in)  # forward_with_cfg
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps[:B], eps[B:]
        half_eps = uncond + scale * (cond - uncond)
        out = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)
        eps, var_values = out[:, :C], out[:, C:]
        x0 = math.sqrt(1.0 / ac[i]) * x - math.sqrt(1.0 / ac[i] - 1.0) * eps
        if kind == "ddim":
            eps = (math.sqrt(1.0 / ac[i]) * x - x0) / math.sqrt(1.0 / ac[i] - 1.0)
            x = math.sqrt(ac_prev[i]) * x0 + math.sqrt(1.0 - ac_prev[i]) * eps
        else:
            frac = (var_values + 1.0) / 2.0
            log_var = frac * math.log(rbetas[i]) + (1.0 - frac) * post_log[i]
            mean = coef1[i] * x0 + coef2[i] * x
            noise = torch.randn(x.shape, generator=generator)  # th.randn_like(x): the doubled batch
            x = mean + (1.0 if i != 0 else 0.0) * torch.exp(0.5 * log_var) * noise
    return x[:B]


def test_ddim_with_cfg_on_three_channels_is_the_original(latent_dit):
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 3])
    sampler = DDIMSampler(STEPS, cfg_channels=3)
    with torch.no_grad():
        ours = sampler.sample(latent_dit, z, y, cfg_scale=4.0)
        theirs = original_loop(latent_dit, z, y, 4.0, sampler.schedule.timestep_map, "ddim")
        all_channels = DDIMSampler(STEPS).sample(latent_dit, z, y, cfg_scale=4.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float((all_channels - theirs).abs().max()) > 1e-3  # the option is what makes them agree


def test_ddpm_with_dit_noise_order_is_the_original(latent_dit):
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 1, 0])
    sampler = DDPMSampler(STEPS, cfg_channels=3, dit_noise_order=True)
    with torch.no_grad():
        ours = sampler.sample(latent_dit, z, y, cfg_scale=3.0, generator=torch.Generator().manual_seed(7))
        theirs = original_loop(latent_dit, z, y, 3.0, sampler.schedule.timestep_map, "ddpm",
                               torch.Generator().manual_seed(7))
        own_order = DDPMSampler(STEPS, cfg_channels=3).sample(latent_dit, z, y, cfg_scale=3.0,
                                                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float((own_order - theirs).abs().max()) > 1e-3


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_cfg_channels(value):
    with pytest.raises(InputValueError, match="cfg_channels"):
        DDIMSampler(STEPS, cfg_channels=value)


def test_eoc_sample_cfg_channels(tmp_path, capsys):
    from eoc_dit.cli import _make_sampler, build_parser, main

    common = ["sample", "--model", "DiT-S/8", "--input-size", "16", "--steps", "3", "--cfg-scale", "3",
              "--labels", "0", "5", "--seeds", "1", "--out", str(tmp_path / "x.npy")]
    parse = build_parser().parse_args
    assert _make_sampler(parse(common)).cfg_channels is None
    sampler = _make_sampler(parse([*common, "--cfg-channels", "3"]))
    assert isinstance(sampler, DDIMSampler) and sampler.cfg_channels == 3
    sampler = _make_sampler(parse([*common, "--sampler", "ddpm", "--cfg-channels", "3", "--dit-noise-order"]))
    assert isinstance(sampler, DDPMSampler) and sampler.cfg_channels == 3 and sampler.dit_noise_order
    assert main([*common, "--sampler", "ddpm", "--cfg-channels", "3", "--dit-noise-order"]) == 0
    assert main([*common, "--dit-noise-order"]) == 2
    assert "DDPM option" in capsys.readouterr().err
    assert main([*common, "--cfg-channels", "0"]) == 2
    assert "cfg_channels" in capsys.readouterr().err
