"""End-to-end sampling: DDIM uncached vs FORA N = 2 / 3, with and without EOC (extrapolate), and on CPU the
trained testbed with EOC calibrated against plain FORA (issue 12: the correction should cost <= 5%).

Each cached run records its speedup over the uncached run measured in the same session and the ideal
speedup (steps ÷ steps that compute). Model: common.sampling_model — DiT-XL/2 shapes, bf16, random
weights, DDIM-20, 16 images with CFG (32 rows) on CUDA; on CPU the testbed (its trained checkpoint
once shipped, random weights of its shapes until then), fp32, DDIM-10, 2 images with CFG (4 rows).

``test_sampling_testbed_cpu``: the shipped testbed and its DDIM-20 prior (CFG as calibrated), 50 images
(100 rows), fp32, FORA N = 2, 3 and 4, plain vs every EOC mode with the cpp backend (plain and calibrated
also with the torch backend); each EOC run records ``ratio_to_plain``, its time over plain FORA's at the
same N with the same backend, same session.
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


def skip_reason(backend):
    return common.cpp_skip_reason(DEVICE) if backend == "cpp" else backend_skip_reason(backend)


@pytest.mark.parametrize("backend", ("torch", "triton", "cpp"))
@pytest.mark.parametrize("correction", ("plain", "eoc-extrapolate"))
@pytest.mark.parametrize("interval", (2, 3))
def test_sampling_cached(interval, correction, backend, dit, run, measure, baselines, benchmark):
    reason = skip_reason(backend)
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


TESTBED_STEPS, TESTBED_IMAGES = 20, 50


@pytest.fixture(scope="module")
def testbed_run(smoke):
    """(run() -> samples, model, prior, record): DDIM-20 on the shipped testbed, fixed noise and labels, the
    prior's CFG scale (2 images in smoke mode); record: the extra_info fields every testbed run shares."""
    from eoc_dit import testbed
    from eoc_dit.testbed.demo import demo_batch

    images = 2 if smoke else TESTBED_IMAGES
    model = testbed.load_model(DEVICE)
    prior = testbed.load_prior(TESTBED_STEPS)
    noise, labels = demo_batch(model, images)
    sampler = DDIMSampler(TESTBED_STEPS)
    record = dict(suite="sampling", model="testbed (trained)", shapes=common.describe_shapes(vars(model)),
                  images=images, rows=2 * images, steps=TESTBED_STEPS, sampler="ddim",
                  cfg_scale=prior.cfg_scale, dtype="fp32")
    return (lambda: sampler.sample(model, noise, labels, cfg_scale=prior.cfg_scale)), model, prior, record


@pytest.mark.parametrize("backend", ("torch", "cpp"))
# plain first: the EOC runs' baseline
@pytest.mark.parametrize("mode", ("plain", "calibrated", "extrapolate", "delta", "trend"))
@pytest.mark.parametrize("interval", (2, 3, 4))
def test_sampling_testbed_cpu(interval, mode, backend, testbed_run, measure, baselines, benchmark):
    if ON_CUDA:
        pytest.skip("the testbed comparison runs on CPU machines")
    reason = skip_reason(backend)
    if backend == "torch" and mode not in ("plain", "calibrated"):
        reason = "the eager backend is timed for plain and calibrated only (every mode runs with cpp)"
    if reason:
        pytest.skip(reason)
    run, model, prior, record = testbed_run
    benchmark.group = "sampling testbed"
    uncached = baselines.seconds("testbed uncached sampling", run, repeats=3)
    schedule = FORASchedule(interval)
    computing = common.full_steps(schedule, TESTBED_STEPS, model.depth)
    config = EOCConfig(mode=mode, backend=backend) if mode != "plain" else None

    def cached_run():
        with common.backend_env(backend), apply_eoc(model, schedule, prior if config else None, config):
            return run()

    plain_key = ("testbed sampling", interval, "plain", backend)
    plain = baselines.seconds(plain_key, cached_run, repeats=3) if mode != "plain" else None
    seconds = measure(cached_run, variant=f"FORA N={interval}, {mode}", backend=backend, interval=interval,
                      uncached_ms=uncached * 1e3, full_steps=computing, ideal_speedup=TESTBED_STEPS / computing,
                      plain_ms=plain and plain * 1e3, **record)
    if mode == "plain":
        baselines.record(plain_key, seconds)
    if seconds is not None:
        benchmark.extra_info.update(speedup_vs_uncached=uncached / seconds,
                                    pct_of_ideal=100 * uncached / seconds / (TESTBED_STEPS / computing))
        if plain is not None:
            benchmark.extra_info["ratio_to_plain"] = seconds / plain
