"""End-to-end sampling: DDIM uncached vs FORA N = 2 / 3, with and without EOC (extrapolate).

Each cached run records its speedup over the uncached run measured in the same session and the ideal
speedup (steps ÷ steps that compute). Model: common.sampling_model — DiT-XL/2 shapes, bf16, random
weights, DDIM-20, 16 images with CFG (32 rows) on CUDA; on CPU the testbed (its trained checkpoint
once shipped, random weights of its shapes until then), fp32, DDIM-10, 2 images with CFG (4 rows).
"""

import pytest
import torch

from benchmarks import _common as common
from benchmarks.conftest import DEVICE, MODEL_DTYPE, ON_CUDA, backend_skip_reason
from eoc_dit import DDIMSampler, EOCConfig, FORASchedule, apply_eoc

STEPS, IMAGES = (20, 16) if ON_CUDA else (10, 2)
CFG_SCALE = 4.0


@pytest.fixture(scope="module")
def run(dit):
    """run() -> samples: one DDIM run of the module's model on fixed noise and labels."""
    model = dit[0]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(IMAGES, model.in_channels, model.input_size, model.input_size, generator=gen).to(DEVICE)
    labels = common.class_labels(model, IMAGES, DEVICE, cfg=False)
    sampler = DDIMSampler(STEPS)
    return lambda: sampler.sample(model, noise, labels, cfg_scale=CFG_SCALE)


def _record(dit):
    model, description = dit
    return dict(suite="sampling", model=description, shapes=common.describe_shapes(vars(model)), images=IMAGES,
                rows=2 * IMAGES, steps=STEPS, sampler="ddim", cfg_scale=CFG_SCALE,
                dtype=common.dtype_name(MODEL_DTYPE))


def test_sampling_uncached(dit, run, measure, baselines, benchmark):
    benchmark.group = "sampling"
    seconds = measure(run, variant="uncached", backend=None, full_steps=STEPS, ideal_speedup=1.0, **_record(dit))
    baselines.record("uncached sampling", seconds)  # the baseline of the cached runs below
    if seconds is not None:
        benchmark.extra_info.update(uncached_ms=seconds * 1e3, speedup_vs_uncached=1.0, pct_of_ideal=100.0)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("correction", ("plain", "eoc-extrapolate"))
@pytest.mark.parametrize("interval", (2, 3))
def test_sampling_cached(interval, correction, backend, dit, run, measure, baselines, benchmark):
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    model = dit[0]
    benchmark.group = "sampling"
    uncached = baselines.seconds("uncached sampling", run, repeats=3)
    schedule = FORASchedule(interval)
    config = EOCConfig(mode="extrapolate") if correction != "plain" else None
    computing = common.full_steps(schedule, STEPS, model.depth)
    with common.backend_env(backend), apply_eoc(model, schedule, config=config):
        seconds = measure(run, variant=f"FORA N={interval}, {correction}", backend=backend, interval=interval,
                          uncached_ms=uncached * 1e3, full_steps=computing, ideal_speedup=STEPS / computing,
                          **_record(dit))
    if seconds is not None:
        benchmark.extra_info.update(speedup_vs_uncached=uncached / seconds,
                                    pct_of_ideal=100 * uncached / seconds / (STEPS / computing))
