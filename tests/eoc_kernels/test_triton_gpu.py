"""The compiled Triton kernels on a GPU against the reference (skips without CUDA).

Run with plain ``pytest -m gpu tests/eoc_kernels`` on a CUDA machine: tests/conftest.py leaves
TRITON_INTERPRET off there (under the interpreter these would only repeat test_triton_ops.py slowly,
so they skip). DiT-XL/2 widths (N = 256, C = 1152), the widest DiT rows (C = 4096) and an odd
narrow shape, each with a splitting token threshold (whole rows in registers) and with threshold 0
(rows walked in chunks); a cached step captured in a CUDA graph checks that no op syncs with the host; a cache
buffer of more than 2**31 elements checks the int64 offsets. Every op output is poisoned with NaN
before the kernel writes it (``poisoned_outputs``).
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import eoc_kernels
from eoc_kernels import reference

from .naive import DTYPES, random_branch, random_segment, segment_threshold, splitting_threshold
from .triton_setup import DEVICE, poisoned_outputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None or DEVICE.type != "cuda",
                       reason="needs CUDA and triton, with TRITON_INTERPRET off (the default "
                              "with CUDA)"),
]
CUDA = torch.device("cuda")
SHAPES = [(2, 256, 1152), (2, 33, 4096), (3, 49, 123)]


@pytest.fixture(autouse=True)
def poisoned():
    """Every output buffer the custom ops allocate starts as NaN; yields the list of them."""
    with poisoned_outputs() as buffers:
        yield buffers


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


@pytest.mark.parametrize("threshold_form", ["split", "zero"])  # whole rows (judgment) / chunked rows
@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_branch_and_block_match_reference(shape, dtype, coef_form, threshold_form, tolerance, poisoned):
    gen = torch.Generator().manual_seed(40)
    as_coef = {"float": tuple, "tensor": lambda c: torch.tensor(c, dtype=torch.float32)}
    attn = random_branch(gen, *shape, dtype, heads=2 if shape[0] % 2 == 0 else 1,
                         coef=as_coef[coef_form]((0.8, 0.6, -0.5)))
    mlp = random_branch(gen, *shape, dtype, coef=as_coef[coef_form]((0.4, 0.0, 0.9)))
    threshold = splitting_threshold([attn, mlp]) if threshold_form == "split" else 0.0
    x = torch.randn(shape, generator=gen).to(dtype)
    x, attn, mlp = to_cuda(x), to_cuda(attn), to_cuda(mlp)
    for op, args, kwargs in [
            ("cached_branch", (x, attn["gate"], attn["cache"]), branch_kwargs(attn)),
            ("cached_block", (x, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"]),
             branch_kwargs(attn, "_attn") | branch_kwargs(mlp, "_mlp"))]:
        expected = getattr(reference, op)(*args, **kwargs, token_threshold=threshold)
        written = len(poisoned)
        out = getattr(eoc_kernels, op)(*args, **kwargs, token_threshold=threshold,
                                       backend="triton")
        assert len(poisoned) == written + 1 and out.data_ptr() == poisoned[-1].data_ptr()
        assert eoc_kernels.resolve_backend("auto", CUDA, op) == "triton"
        torch.testing.assert_close(out, expected, **tolerance(dtype))


@pytest.mark.parametrize("threshold_form", ["split", "zero"])  # whole rows (judgment) / chunked rows
@pytest.mark.parametrize("generations", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_segment_matches_reference(shape, dtype, generations, threshold_form, tolerance, poisoned):
    gen = torch.Generator().manual_seed(41)
    segment = random_segment(gen, *shape, dtype, blocks=4, generations=generations,
                             heads=shape[0])
    # A tensor threshold splitting the tokens, or a float 0: no judgment, rows walked in chunks.
    threshold = torch.tensor(segment_threshold(segment)).to(CUDA) if threshold_form == "split" else 0.0
    x = torch.randn(shape, generator=gen).to(dtype)
    x, segment = to_cuda(x), to_cuda({k: v for k, v in segment.items() if k != "entries"})
    args = (x, segment.pop("gates"), segment.pop("cache"), segment.pop("generation"))
    for coef in (segment["coef"], None):
        kwargs = segment | {"coef": coef, "token_threshold": threshold}
        expected = reference.cached_segment(*args, **kwargs)
        written = len(poisoned)
        out = eoc_kernels.cached_segment(*args, **kwargs, backend="triton")
        assert len(poisoned) == written + 1 and out.data_ptr() == poisoned[-1].data_ptr()
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


@pytest.mark.slow  # allocates and zeroes a 4.3 GB cache buffer
def test_segment_indexes_past_2_31_elements(tolerance, poisoned):
    """A stacked cache [2, S, 2, B, N, C] of more than 2**31 bf16 elements (about 4.3 GB): the
    entries of its last block in generation 1 start past element 2**31, where an int32 offset
    would wrap. Only the first and the last block hold data (the others are zeros with zero
    coefficients, adding exactly 0), so the reference runs on those two blocks alone."""
    batch, tokens, channels, dtype = 2, 256, 1152, torch.bfloat16
    entry = batch * tokens * channels  # elements of one [B, N, C] cache entry
    blocks = 2**31 // (2 * 2 * entry) + 2  # 912 blocks: 2 * 912 * 2 * entry > 2**31 + 2 entries
    cache = torch.zeros(2, blocks, 2, batch, tokens, channels, dtype=dtype, device=CUDA)
    last = blocks - 1
    assert cache.numel() > 2**31
    assert (cache[1, last, 0].data_ptr() - cache.data_ptr()) // cache.element_size() > 2**31
    gen = torch.Generator().manual_seed(43)
    selected = torch.tensor([0, last], device=CUDA)
    for s in (0, last):
        cache[:, s] = torch.randn(2, 2, batch, tokens, channels, generator=gen).to(dtype).to(CUDA)
    gates = torch.randn(batch, blocks, 2, channels, generator=gen).to(dtype).to(CUDA)
    x = torch.randn(batch, tokens, channels, generator=gen).to(dtype).to(CUDA)
    # The last block: Cc of the attention entry in generation 0 (its Cp in generation 1, past
    # 2**31), Cc of the MLP entry in generation 1 (past 2**31).
    generation = torch.zeros(blocks, 2, dtype=torch.int32, device=CUDA)
    generation[last] = torch.tensor([0, 1], dtype=torch.int32)
    generation[0] = torch.tensor([1, 0], dtype=torch.int32)
    coef = torch.zeros(blocks, 2, 3, device=CUDA)
    coef[selected] = torch.tensor([0.0, 0.7, 0.0], device=CUDA)  # beta: reads Cp
    for coef_arg in (coef, None):
        out = eoc_kernels.cached_segment(x, gates, cache, generation, coef=coef_arg,
                                         backend="triton")
        assert out.data_ptr() == poisoned[-1].data_ptr()
        expected = reference.cached_segment(
            x, gates[:, selected], cache[:, selected], generation[selected],
            coef=None if coef_arg is None else coef[selected])
        torch.testing.assert_close(out, expected, **tolerance(dtype))
    del cache
    torch.cuda.empty_cache()


def test_bad_generation_trips_a_device_side_assert():
    """On CUDA a generation outside 0..G-1 is not checked on the host (that would sync): a
    device-side assert aborts the CUDA context, so this runs in a child process."""
    script = """if True:
        import torch, eoc_kernels
        x = torch.randn(2, 3, 8, device="cuda")
        out = eoc_kernels.cached_segment(
            x, torch.randn(2, 1, 2, 8, device="cuda"), torch.randn(2, 1, 2, 2, 3, 8, device="cuda"),
            torch.tensor([[0, 2]], device="cuda"), backend="triton")
        torch.cuda.synchronize()
        print("no assert")
    """
    root = pathlib.Path(eoc_kernels.__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                                    os.environ.get("PYTHONPATH")])),
                        "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0, result.stdout
    assert "no assert" not in result.stdout
    assert "device-side assert" in result.stderr, result.stderr[-2000:]
