"""The cached step: one model forward at a reuse step, plain reuse vs EOC, eager vs fused (docs/DESIGN.md §3, §6).

A patched model serves a step that reuses every block as one gate matmul plus one ``cached_segment``
— what a FORA cached step is. Timed: a forward at such a step (common.ReuseStep: a 4-step run
computing steps 0-1, then reuse steps 2 and 3 in turn), against the unpatched full step and, for the
fused (Triton) backend, against the same variant on the eager backend — both baselines measured in
the same session.

Model: DiT-XL/2 shapes (N = 256, C = 1152, 28 blocks), bf16, random weights on CUDA; the testbed's
shapes (N = 49, C = 256, 6 blocks), fp32 on CPU. ``batch`` counts the rows the model sees (with
CFG: batch / 2 images).
"""

import pytest

from benchmarks import _common as common
from benchmarks.conftest import DEVICE, MODEL_DTYPE, ON_CUDA, backend_skip_reason
from eoc_dit import apply_eoc

BATCHES = (2, 16, 64) if ON_CUDA else (8,)


@pytest.fixture(scope="module")
def step_prior(dit):
    return common.step_prior(dit[0], DEVICE)


def _record(model, description, batch):
    return dict(suite="step", model=description, shapes=common.describe_shapes(vars(model)), rows=batch,
                dtype=common.dtype_name(MODEL_DTYPE))


@pytest.mark.parametrize("batch", BATCHES)
def test_full_step(batch, dit, measure, baselines, benchmark):
    model, description = dit
    benchmark.group = f"step rows={batch}"
    inputs = common.StepInputs(model, batch, DEVICE, MODEL_DTYPE)
    seconds = measure(inputs.full_step(model), variant="full step (uncached)", backend=None,
                      **_record(model, description, batch))
    baselines.record(("full step", batch), seconds)  # the baseline of the cached steps below
    if seconds is not None:
        benchmark.extra_info.update(full_step_ms=seconds * 1e3, ratio_to_full_step=1.0, speedup_vs_full_step=1.0)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("variant", common.STEP_VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_cached_step(batch, variant, backend, dit, measure, baselines, benchmark, request):
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    model, description = dit
    benchmark.group = f"step rows={batch}"
    config, needs_prior = common.step_config(variant)
    prior = request.getfixturevalue("step_prior") if needs_prior else None
    inputs = common.StepInputs(model, batch, DEVICE, MODEL_DTYPE)
    full = baselines.seconds(("full step", batch), inputs.full_step(model))

    def eager_seconds():
        with common.backend_env("torch"), apply_eoc(model, common.step_schedule(model.depth), prior, config) as handle:
            return baselines.time(common.ReuseStep(handle, inputs).fill())

    eager = baselines.get(("cached step", variant, batch), eager_seconds) if backend != "torch" else None
    with common.backend_env(backend), apply_eoc(model, common.step_schedule(model.depth), prior, config) as handle:
        step = common.ReuseStep(handle, inputs).fill()
        seconds = measure(step, variant=f"cached step, {variant}", backend=backend, full_step_ms=full * 1e3,
                          eager_ms=eager and eager * 1e3, **_record(model, description, batch))
    if backend == "torch":
        baselines.record(("cached step", variant, batch), seconds)
    if seconds is not None:
        benchmark.extra_info.update(ratio_to_full_step=seconds / full, speedup_vs_full_step=full / seconds,
                                    speedup_vs_eager=1.0 if eager is None else eager / seconds)
