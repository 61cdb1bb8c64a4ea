"""How a patched model serves a cached step (docs/DESIGN.md §3): one gate matmul and one segment pass per run
of reused blocks, branch outputs written straight into the cache buffer, backends interchangeable."""

import dataclasses

import pytest
import torch

import eoc_kernels
from eoc_dit import DDIMSampler, DiTAdapter, DiTBlockAdapter, EOCConfig, FORASchedule, MaskSchedule, apply_eoc
from eoc_dit.schedules import TaylorSeerSchedule
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 7


@pytest.fixture(scope="module")
def model():
    return make_tiny_dit(depth=4)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([1, 2])


def sample(model, inputs, schedule, config=None, adapter=None, **kwargs):
    with apply_eoc(model, schedule, config=config, adapter=adapter, **kwargs):
        return DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def test_fora_cached_step_is_one_segment_and_one_gate_matmul(model, inputs, monkeypatch):
    segment = Counter(eoc_kernels.cached_segment)
    linear = Counter(torch.nn.functional.linear)
    monkeypatch.setattr(eoc_kernels, "cached_segment", segment)
    branch = Counter(eoc_kernels.cached_branch)
    monkeypatch.setattr(eoc_kernels, "cached_branch", branch)
    with apply_eoc(model, FORASchedule(3), config=EOCConfig(mode="extrapolate")) as handle:
        sampler = DDIMSampler(STEPS)
        sampler.sample(model, *inputs, cfg_scale=2.0)
        reuse_steps = [t for t in range(STEPS) if t % 3]
        assert len(segment.calls) == len(reuse_steps) and not branch.calls
        for args, _kwargs in segment.calls:
            x, gates, cache, generation = args
            assert gates.shape == (4, 4, 2, 32) and cache.shape == (2, 4, 2, 4, 16, 32)  # S = L = 4, G = 2
            assert cache.data_ptr() == handle.cache.buffer.data_ptr()  # a view of the buffer, not a copy
        # One gate matmul per cached step: count linear calls with the stacked [L·2C, C] weight.
        monkeypatch.setattr(torch.nn.functional, "linear", linear)
        sampler.sample(model, *inputs, cfg_scale=2.0)
    stacked = [a for a, _ in linear.calls if a[1].shape == (4 * 2 * 32, 32)]
    assert len(stacked) == len(reuse_steps)


def test_mask_schedule_splits_segments_at_computed_blocks(model, inputs, monkeypatch):
    mask = torch.ones(STEPS, 4, 2, dtype=torch.bool)
    mask[1:, 0] = False  # block 0 reused at every later step
    mask[1:, 2:] = False  # blocks 2-3 too; block 1 always computes
    mask[3, 1, 1] = False  # block 1 reuses only its MLP at step 3
    segment = Counter(eoc_kernels.cached_segment)
    branch = Counter(eoc_kernels.cached_branch)
    monkeypatch.setattr(eoc_kernels, "cached_segment", segment)
    monkeypatch.setattr(eoc_kernels, "cached_branch", branch)
    sample(model, inputs, MaskSchedule(mask))
    assert [a[1].shape[1] for a, _ in segment.calls] == [1, 2] * (STEPS - 1)  # runs [0, 1) and [2, 4)
    assert len(branch.calls) == 1


def test_computed_features_are_written_into_the_buffer(model, inputs):
    pointers = []

    def observer(step, block, branch, feature):
        pointers.append(feature.data_ptr())

    for config, generations in ((None, 1), (EOCConfig(mode="extrapolate"), 2)):
        pointers.clear()
        with apply_eoc(model, FORASchedule(2), config=config, observer=observer) as handle:
            DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
            buffer = handle.cache.buffer
            assert buffer.shape[0] == generations
            start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
            assert pointers and all(start <= p < end for p in pointers)
            # Each (block, branch) alternates between its generations: no copy ever moves Cc to Cp.
            assert len(set(pointers)) == 4 * 2 * generations


class BlockwiseAdapter(DiTAdapter):
    """The DiT layout without the fusions: no stacked gate rows, no multi-block segments."""

    sequential_blocks = False

    class _Blocks(DiTBlockAdapter):
        def gate_rows(self, block):
            return None

    block_adapter = _Blocks()


def test_unfused_adapter_gives_the_same_samples(model, inputs):
    config = EOCConfig(mode="extrapolate")
    fused = sample(model, inputs, FORASchedule(3), config)
    unfused = sample(model, inputs, FORASchedule(3), config, adapter=BlockwiseAdapter())
    torch.testing.assert_close(unfused, fused, atol=1e-5 * fused.abs().max(), rtol=1e-5)


@pytest.mark.parametrize("config", [EOCConfig(mode="extrapolate", theta=0.0),
                                    EOCConfig(mode="extrapolate", token_threshold=0.05),
                                    EOCConfig(mode="taylorseer", order=3),
                                    EOCConfig(mode="hicache", order=2, token_threshold=0.05)])
def test_triton_backend_matches_the_reference_backend(model, inputs, config):
    # On CPU the Triton kernels run under TRITON_INTERPRET=1, which tests/conftest.py sets where there
    # is no CUDA device; with CUDA the kernels are compiled and the GPU tests cover them.
    if "triton" not in eoc_kernels.available_backends("cpu"):
        assert torch.cuda.is_available(), "no CUDA device, so tests/conftest.py must have set TRITON_INTERPRET=1"
        pytest.skip("the Triton interpreter is off (a CUDA device is present)")
    # The forecasters under TaylorSeer's schedule (full steps 0, 1, 3, 5): order 3 reads C_0..C_3 at step 6.
    schedule = FORASchedule(3) if config.mode == "extrapolate" else TaylorSeerSchedule(2)
    reference = sample(model, inputs, schedule, dataclasses.replace(config, backend="torch"))
    fused = sample(model, inputs, schedule, dataclasses.replace(config, backend="triton"))
    torch.testing.assert_close(fused, reference, atol=1e-4 * reference.abs().max(), rtol=1e-4)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_forecaster_step_is_one_segment_over_the_ring(model, inputs, monkeypatch, order):
    # TaylorSeer of order O under its default schedule (full steps 0, 1, 3, 5): every cached step is still
    # ONE segment pass, over a ring of O + 1 generations, with coef [S, 2, P] as wide as the step's longest
    # coefficient tuple (P = 2 + the history differences the step's entries read so far).
    segment = Counter(eoc_kernels.cached_segment)
    monkeypatch.setattr(eoc_kernels, "cached_segment", segment)
    with apply_eoc(model, TaylorSeerSchedule(2), config=EOCConfig(mode="taylorseer", order=order)) as handle:
        DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
        plan, buffer = handle.plan, handle.cache.buffer
        assert plan.num_generations == order + 1 and buffer.shape[0] == order + 1
    reuse_steps = [t for t in range(STEPS) if not plan.computes(t, 0, 0)]
    assert len(segment.calls) == len(reuse_steps) == 3  # steps 2, 4, 6
    for t, (args, kwargs) in zip(reuse_steps, segment.calls):
        x, gates, cache, generation = args
        assert cache.shape[0] == order + 1 and cache.data_ptr() == buffer.data_ptr()
        computed = len(plan.entry(t, 0, 0).history)
        assert kwargs["coef"].shape == (4, 2, 2 + min(order, computed - 1))
        assert generation.tolist() == [[(computed - 1) % (order + 1)] * 2] * 4
