"""Weights both ways between eoc_dit.DiT and diffusers' DiTTransformer2DModel (docs/DESIGN.md §4.9): the
same outputs in fp32 (≤ 1e-5) from random non-zero weights, with the frequency shift and LayerNorm eps
carried over, and the same cached samples under FORA (plain and extrapolate)."""

import pytest
import torch
from torch import nn

from eoc_dit import DDIMSampler, DiT, EOCConfig, FORASchedule, apply_eoc, noise_for_seed
from eoc_dit.diffusers_conversion import ShiftedTimestepEmbedder, diffusers_to_dit, dit_to_diffusers
from eoc_dit.errors import InputTypeError, InputValueError
from tests.eoc_dit.diffusers_tiny import tiny_dit
from tests.eoc_dit.tiny import make_tiny_dit

TOL = dict(rtol=0, atol=1e-5)


def inputs(num_classes=4, batch=6):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=generator)
    t = torch.tensor([999, 731, 500, 250, 1, 0])[:batch]
    y = torch.arange(batch) % (num_classes + 1)  # the null class included
    return x, t, y


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dit_to_diffusers_gives_the_same_output(learn_sigma):
    model = make_tiny_dit(depth=2, learn_sigma=learn_sigma)
    transformer = dit_to_diffusers(model)
    x, t, y = inputs()
    with torch.no_grad():
        ours, theirs = model(x, t, y), transformer(x, timestep=t, class_labels=y).sample
    assert ours.abs().max() > 0.1  # a model that does something
    torch.testing.assert_close(theirs, ours, **TOL)
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in transformer.transformer_blocks)
    assert transformer.config.norm_eps == 1e-6


def test_both_settings_matter():
    """Without the shift or the eps carried over the outputs change: the conversion's handling is needed.
    (The eps changes them by less than the tolerance at these activations' scale, the shift by far more.)"""
    model = make_tiny_dit(depth=2)
    x, t, y = inputs()
    right = dit_to_diffusers(model)
    with torch.no_grad():
        expected = right(x, timestep=t, class_labels=y).sample
    for breaking in ("shift", "eps"):
        transformer = dit_to_diffusers(model)
        for block in transformer.transformer_blocks:
            if breaking == "shift":
                block.norm1.emb.time_proj.downscale_freq_shift = 1
            else:
                block.norm3.eps = 1e-5
        with torch.no_grad():
            difference = (transformer(x, timestep=t, class_labels=y).sample - expected).abs().max()
        assert difference > (1e-5 if breaking == "shift" else 0), breaking


def test_diffusers_to_dit_with_diffusers_defaults_gives_the_same_output():
    transformer = tiny_dit(num_classes=4, out_channels=2)  # frequency shift 1, norm_eps 1e-5 (diffusers' defaults)
    model = diffusers_to_dit(transformer)
    assert isinstance(model.t_embedder, ShiftedTimestepEmbedder) and model.blocks[0].norm2.eps == 1e-5
    assert model.learn_sigma
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), transformer(x, timestep=t, class_labels=y).sample, **TOL)


def test_round_trip_keeps_every_tensor():
    model = make_tiny_dit(depth=2, learn_sigma=True)
    back = diffusers_to_dit(dit_to_diffusers(model))
    assert type(back.t_embedder) is type(model.t_embedder)  # shift 0: the DiT's own embedder
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_padded_label_table_for_dit_pipeline():
    model = make_tiny_dit(depth=2)
    transformer = dit_to_diffusers(model, num_embeds_ada_norm=1000)
    x, t, _ = inputs()
    y = torch.tensor([0, 3, 4, 4, 1, 2])
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = transformer(x, timestep=t, class_labels=torch.where(y == 4, 1000, y)).sample  # null 4 -> 1000
    torch.testing.assert_close(theirs, ours, **TOL)


class CallsDiffusers(nn.Module):
    """Lets an eoc_dit sampler call a diffusers transformer, as a third-party sampler would: it does not
    forward step announcements, so the patched transformer counts steps from the timestep."""

    def __init__(self, transformer, num_classes):
        super().__init__()
        self.transformer, self.num_classes = transformer, num_classes

    def forward(self, x, t, y):
        return self.transformer(x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("config", [None, EOCConfig(mode="extrapolate")], ids=["plain", "extrapolate"])
def test_fora_on_diffusers_dit_equals_fora_on_our_dit(config):
    model = make_tiny_dit(depth=3, learn_sigma=True)
    transformer = dit_to_diffusers(model)
    sampler = DDIMSampler(10)
    noise = torch.cat([noise_for_seed(model, seed) for seed in range(3)])
    labels = torch.tensor([0, 1, 3])
    with torch.no_grad():
        uncached = sampler.sample(model, noise, labels, cfg_scale=3.0, progress=False)
        with apply_eoc(model, FORASchedule(3), config=config):
            ours = sampler.sample(model, noise, labels, cfg_scale=3.0, progress=False)
        with apply_eoc(transformer, FORASchedule(3), config=config):
            theirs = sampler.sample(CallsDiffusers(transformer, model.num_classes), noise, labels, cfg_scale=3.0,
                                    progress=False)
    assert (ours - uncached).abs().max() > 1e-3  # caching changed the samples ...
    torch.testing.assert_close(theirs, ours, **TOL)  # ... in the same way on both models


def test_conversion_errors_name_the_argument():
    with pytest.raises(InputTypeError, match="model must be an eoc_dit.DiT"):
        dit_to_diffusers(tiny_dit())
    with pytest.raises(InputTypeError, match="transformer must be a diffusers DiTTransformer2DModel"):
        diffusers_to_dit(make_tiny_dit())
    with pytest.raises(InputValueError, match="num_embeds_ada_norm must be an int >= the DiT's num_classes"):
        dit_to_diffusers(make_tiny_dit(), num_embeds_ada_norm=2)
    with pytest.raises(InputValueError, match="mlp_ratio"):
        dit_to_diffusers(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                             num_classes=4, mlp_ratio=2.0))
    with pytest.raises(InputValueError, match=r"transformer_blocks.1.norm1.emb.* differs from block 0's"):
        diffusers_to_dit(tiny_dit(shared_embedding=False))
