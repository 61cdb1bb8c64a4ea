"""diffusers pipelines as they are (docs/DESIGN.md §4.9): the step clock under DDIM, DPM-Solver++ and Euler
with CFG batches, a second call starting a fresh run, and calibration and fitting through the pipeline's
own __call__ (class labels for DiTPipeline, precomputed prompt embeddings for PixArt)."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from eoc_dit import EOCConfig, FORASchedule, apply_eoc, calibrate, fit_coefficients
from eoc_dit.diffusers_pipeline import PipelineSampler
from eoc_dit.errors import InputTypeError, InputValueError
from tests.eoc_dit.diffusers_tiny import dit_pipeline, pixart_pipeline, prompt_embeddings, tiny_dit

STEPS = 6
SCHEDULERS = {"ddim": DDIMScheduler, "dpm-solver++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def dit_images(pipe, seeds=(0, 1), labels=(3, 7), cfg=3.0):
    with torch.no_grad():
        return pipe(class_labels=list(labels), guidance_scale=cfg, num_inference_steps=STEPS,
                    generator=generators(seeds), output_type="pt").images


def count_computes(transformer):
    counter = [0]
    transformer.transformer_blocks[-1].ff.net[0].register_forward_pre_hook(
        lambda module, inputs: counter.__setitem__(0, counter[0] + 1))
    return counter


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_step_clock_follows_the_pipeline_under_any_scheduler(scheduler):
    pipe = dit_pipeline(scheduler=SCHEDULERS[scheduler]())
    uncached = dit_images(pipe)
    computes = count_computes(pipe.transformer)
    with apply_eoc(pipe.transformer, FORASchedule(1)):
        assert torch.equal(dit_images(pipe), uncached)  # all-compute: bit-identical through the pipeline
    with apply_eoc(pipe.transformer, FORASchedule(2), config=EOCConfig(mode="extrapolate")) as handle:
        computes[0] = 0
        first = dit_images(pipe)
        assert handle.step == STEPS - 1 and computes[0] == 3  # steps 0, 2, 4 of one CFG batch per step
        second = dit_images(pipe)  # the timestep goes up again: a fresh run
        assert computes[0] == 6 and handle.step == STEPS - 1
    assert torch.equal(first, second)
    assert not torch.allclose(first, uncached)
    assert torch.equal(dit_images(pipe), uncached)  # removed


def test_sampler_noise_is_the_pipelines_own_noise():
    pipe = dit_pipeline()
    sampler = PipelineSampler(pipe, STEPS)
    noise = torch.cat([sampler.noise_for_seed(s) for s in (0, 1)])
    with torch.no_grad():
        ours = sampler.sample(pipe.transformer, noise, torch.tensor([3, 7]), cfg_scale=3.0, progress=False)
    assert torch.equal(ours, dit_images(pipe))

    embeds, mask, negative, negative_mask = prompt_embeddings()
    pixart = pixart_pipeline()
    sampler = PipelineSampler(pixart, STEPS, prompt_embeds=embeds, prompt_attention_mask=mask,
                              negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
    noise = torch.cat([sampler.noise_for_seed(s) for s in (0, 1)])
    with torch.no_grad():
        ours = sampler.sample(pixart.transformer, noise, torch.tensor([0, 2]), cfg_scale=4.0, progress=False)
        theirs = pixart(prompt=None, negative_prompt=None, prompt_embeds=embeds[[0, 2]],
                        prompt_attention_mask=mask[[0, 2]], negative_prompt_embeds=negative.expand(2, -1, -1),
                        negative_prompt_attention_mask=negative_mask.expand(2, -1), guidance_scale=4.0,
                        num_inference_steps=STEPS, generator=generators((0, 1)), output_type="pt", height=8, width=8,
                        use_resolution_binning=False).images
    assert torch.equal(ours, theirs)


def test_calibrate_and_fit_through_dit_pipeline():
    pipe = dit_pipeline(scheduler=DPMSolverMultistepScheduler())
    sampler = PipelineSampler(pipe, STEPS)
    transformer = pipe.transformer
    prior = calibrate(transformer, sampler, labels=[1, 2], seeds=[0, 1], cfg_scale=3.0, max_gap=2, progress=False)
    assert (prior.num_steps, prior.num_blocks, prior.num_halves, prior.cfg_scale) == (STEPS, 2, 2, 3.0)
    assert prior.metadata.sampler == "DiTPipeline/DPMSolverMultistepScheduler"
    schedule = FORASchedule(2)
    fit = fit_coefficients(transformer, sampler, schedule, prior, labels=[1, 2], seeds=[3], tune_seeds=[4],
                           gains=(0.5, 1.0), progress=False)
    assert fit.info["corrected_entries"] > 0 and fit.info["num_samples"] == 2
    prior.add_fit(fit)
    with apply_eoc(transformer, schedule):
        plain = dit_images(pipe)
    with apply_eoc(transformer, schedule, prior):  # calibrated: the default with a prior
        calibrated = dit_images(pipe)
        again = dit_images(pipe)
    assert torch.equal(calibrated, again)
    assert not torch.equal(calibrated, plain)


def test_calibrate_and_fit_through_pixart_pipeline_with_prompt_embeddings():
    embeds, mask, negative, negative_mask = prompt_embeddings()
    pipe = pixart_pipeline()
    sampler = PipelineSampler(pipe, STEPS, prompt_embeds=embeds, prompt_attention_mask=mask,
                              negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
    assert sampler.uncond_first
    transformer = pipe.transformer
    prior = calibrate(transformer, sampler, labels=[0, 1, 2], seeds=[0, 1], cfg_scale=4.0, max_gap=2, progress=False)
    assert prior.num_blocks == 4  # two blocks, each (attn1, attn2) and (ff, empty)
    assert float(prior.mean[:, 1, 1].abs().max()) == 0.0 and float(prior.mean[:, 0, 1].abs().max()) > 0  # empty / attn2
    fit = fit_coefficients(transformer, sampler, FORASchedule(2), prior, labels=[0, 2], seeds=[3], gains=(1.0,),
                           progress=False)
    assert fit.coef[:, 0, 1].abs().sum() > 0  # attn2 got coefficients, the empty branch none
    assert fit.coef[:, 1, 1].abs().sum() == 0
    prior.add_fit(fit)
    noise = torch.cat([sampler.noise_for_seed(s) for s in (5, 6)])
    with torch.no_grad(), apply_eoc(transformer, FORASchedule(2), prior):
        first = sampler.sample(transformer, noise, torch.tensor([1, 2]), cfg_scale=4.0, progress=False)
        second = sampler.sample(transformer, noise, torch.tensor([1, 2]), cfg_scale=4.0, progress=False)
    assert torch.equal(first, second) and torch.isfinite(first).all()


def test_pipeline_sampler_checks_its_arguments():
    pipe = dit_pipeline()
    with pytest.raises(InputTypeError, match="pipe must be a diffusers DiTPipeline or PixArtAlphaPipeline"):
        PipelineSampler(object(), STEPS)
    with pytest.raises(InputValueError, match="num_inference_steps must be an int >= 1"):
        PipelineSampler(pipe, 0)
    with pytest.raises(InputValueError, match="prompt_embeds are for a PixArtAlphaPipeline"):
        PipelineSampler(pipe, STEPS, prompt_embeds=torch.zeros(1, 5, 24))
    with pytest.raises(InputValueError, match=r"prompt_embeds must be a \[P, S, D\] tensor"):
        PipelineSampler(pixart_pipeline(), STEPS)
    embeds, mask, negative, _ = prompt_embeddings()
    with pytest.raises(InputValueError, match=r"prompt_attention_mask must be a \[3, 5\] tensor"):
        PipelineSampler(pixart_pipeline(), STEPS, prompt_embeds=embeds, prompt_attention_mask=mask[:1])
    with pytest.raises(InputValueError, match="call_kwargs must not set guidance_scale, latents"):
        PipelineSampler(pipe, STEPS, latents=None, guidance_scale=2.0)
    sampler = PipelineSampler(pipe, STEPS)
    with pytest.raises(InputValueError, match="cfg_scale must be a finite number"):
        sampler.sample(pipe.transformer, sampler.noise_for_seed(0), torch.tensor([1]), cfg_scale="4")
    with pytest.raises(InputTypeError, match="seed must be an int"):
        sampler.noise_for_seed(1.5)
    noise = sampler.noise_for_seed(0)
    with pytest.raises(InputValueError, match="model must be the pipeline's transformer"):
        sampler.sample(tiny_dit(), noise, torch.tensor([1]))
    with pytest.raises(InputValueError, match=r"noise must be \[B, 1, 8, 8\]"):
        sampler.sample(pipe.transformer, noise[:, :, :4], torch.tensor([1]))
    with pytest.raises(InputValueError, match="labels must have one entry per noise row"):
        sampler.sample(pipe.transformer, noise, torch.tensor([1, 2]))
    small = PipelineSampler(dit_pipeline(tiny_dit(num_classes=4)), STEPS)
    with pytest.raises(InputValueError, match="null class.*num_embeds_ada_norm=4"):
        small.sample(small.pipe.transformer, noise, torch.tensor([1]), cfg_scale=2.0)
    pixart = PipelineSampler(pixart_pipeline(), STEPS, prompt_embeds=embeds)
    with pytest.raises(InputValueError, match="cfg_scale > 1 needs negative_prompt_embeds"):
        pixart.sample(pixart.pipe.transformer, noise, torch.tensor([1]), cfg_scale=2.0)
    with pytest.raises(InputValueError, match=r"labels index prompts: they must lie in \[0, 3\)"):
        pixart.sample(pixart.pipe.transformer, noise, torch.tensor([3]), cfg_scale=1.0)
