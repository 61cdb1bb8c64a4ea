"""The compiled Triton kernels on a GPU against the reference (skips without CUDA).

Run with ``TRITON_INTERPRET=0 pytest -m gpu tests/eoc_kernels`` on a CUDA machine: under the
interpreter (the conftest default) these would only repeat test_triton_ops.py slowly, so they skip.
DiT-XL/2 widths (N = 256, C = 1152) plus an odd narrow shape; a cached step captured in a CUDA graph
checks that no op syncs with the host.
"""

import pytest
import torch

import eoc_kernels
from eoc_kernels import reference

from .naive import DTYPES, random_branch, random_segment, segment_threshold, splitting_threshold

triton_backend = getattr(eoc_kernels, "triton", None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or triton_backend is None
                       or triton_backend.INTERPRETED,
                       reason="needs CUDA, triton, and TRITON_INTERPRET=0"),
]
CUDA = torch.device("cuda")
SHAPES = [(2, 256, 1152), (3, 49, 123)]


def to_cuda(value):
    if isinstance(value, torch.Tensor):
        return value.to(CUDA)
    if isinstance(value, dict):
        return {key: to_cuda(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_cuda(item) for item in value]
    return value


def branch_kwargs(branch, suffix=""):
    return {f"{key}{suffix}": branch[key] for key in ("prev", "delta", "trend", "coef")}


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_branch_and_block_match_reference(shape, dtype, coef_form, tolerance):
    gen = torch.Generator().manual_seed(40)
    as_coef = {"float": tuple, "tensor": lambda c: torch.tensor(c, dtype=torch.float32)}
    attn = random_branch(gen, *shape, dtype, heads=2 if shape[0] % 2 == 0 else 1,
                         coef=as_coef[coef_form]((0.8, 0.6, -0.5)))
    mlp = random_branch(gen, *shape, dtype, coef=as_coef[coef_form]((0.4, 0.0, 0.9)))
    threshold = splitting_threshold([attn, mlp])
    x = torch.randn(shape, generator=gen).to(dtype)
    x, attn, mlp = to_cuda(x), to_cuda(attn), to_cuda(mlp)
    for op, args, kwargs in [
            ("cached_branch", (x, attn["gate"], attn["cache"]), branch_kwargs(attn)),
            ("cached_block", (x, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"]),
             branch_kwargs(attn, "_attn") | branch_kwargs(mlp, "_mlp"))]:
        expected = getattr(reference, op)(*args, **kwargs, token_threshold=threshold)
        out = getattr(eoc_kernels, op)(*args, **kwargs, token_threshold=threshold,
                                       backend="triton")
        assert eoc_kernels.resolve_backend("auto", CUDA, op) == "triton"
        torch.testing.assert_close(out, expected, **tolerance(dtype))


@pytest.mark.parametrize("generations", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_segment_matches_reference(shape, dtype, generations, tolerance):
    gen = torch.Generator().manual_seed(41)
    segment = random_segment(gen, *shape, dtype, blocks=4, generations=generations,
                             heads=shape[0])
    threshold = torch.tensor(segment_threshold(segment))
    x = torch.randn(shape, generator=gen).to(dtype)
    x, segment = to_cuda(x), to_cuda({k: v for k, v in segment.items() if k != "entries"})
    args = (x, segment.pop("gates"), segment.pop("cache"), segment.pop("generation"))
    for coef in (segment["coef"], None):
        kwargs = segment | {"coef": coef, "token_threshold": threshold.to(CUDA)}
        expected = reference.cached_segment(*args, **kwargs)
        out = eoc_kernels.cached_segment(*args, **kwargs, backend="triton")
        torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_cached_step_captures_in_a_cuda_graph(tolerance):
    """Tensor coefficients, threshold and generations change between replays: no host sync,
    no recompilation, and the replay follows the new values."""
    gen = torch.Generator().manual_seed(42)
    shape, dtype = (2, 256, 1152), torch.bfloat16
    segment = to_cuda({k: v for k, v in random_segment(gen, *shape, dtype, blocks=3).items()
                       if k != "entries"})
    x = torch.randn(shape, generator=gen).to(dtype).to(CUDA)
    threshold = torch.tensor([0.0], device=CUDA)

    def step():
        return eoc_kernels.cached_segment(
            x, segment["gates"], segment["cache"], segment["generation"],
            delta=segment["delta"], trend=segment["trend"], coef=segment["coef"],
            token_threshold=threshold, backend="triton")

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for scale, token_threshold in [(1.0, 1e9), (0.0, 0.0), (-0.5, -1.0)]:
        # Thresholds far from every score: no token's decision hangs on rounding.
        segment["coef"].mul_(scale)
        segment["generation"].copy_(1 - segment["generation"])
        threshold.fill_(token_threshold)
        graph.replay()
        torch.testing.assert_close(out, reference.cached_segment(
            x, segment["gates"], segment["cache"], segment["generation"],
            delta=segment["delta"], trend=segment["trend"], coef=segment["coef"],
            token_threshold=threshold), **tolerance(dtype))
