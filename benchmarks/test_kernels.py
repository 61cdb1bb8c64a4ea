"""Kernel microbenchmarks: every op × backend × batch × dtype × correction preset (docs/DESIGN.md §3),
and the CPU cached_segment comparison of issue 12.

``test_kernel`` records bytes moved (the minimum: every input the op must read once, the output written
once), GB/s, its share of the copy bandwidth measured in the same session (floor_ms: bytes ÷ that
bandwidth) and, for the Triton, cpp and torch.compile backends, the speedup over the eager reference
(torch backend) on the same inputs, measured in the same session (the torch backend records 1.0).
Shapes: DiT-XL/2 rows on CUDA (N = 256, C = 1152; cached_segment over all S = 28 blocks); on CPU a
DiT-S row width (N = 256, C = 384) and S = 4, small enough for the shared 2-core CPU.

``test_segment_cpu`` (CPU only) times, in one run and on the same inputs, cached_segment with the cpp
backend, the eager reference (torch backend), torch.compile of the reference function, and a copy of the
same number of bytes (``common.copy_of``: the floor at the op's own size, so in the same caches) at the
testbed shape (N = 49, C = 256, 6 blocks) and the DiT-S/2 shape (N = 256, C = 384, 12 blocks), 8 rows,
fp32 and bf16, for plain reuse, EOC extrapolate (Cp) and every term. Each backend records its ratios to
the baselines timed before it in the same group (backend order: torch, copy, compile, cpp):
``speedup_vs_eager``, ``speedup_vs_compile`` and ``pct_copy_floor`` (copy time ÷ op time).
"""

import pytest
import torch

from benchmarks import _common as common
from benchmarks.conftest import DEVICE, ON_CUDA, backend_skip_reason

TOKENS, CHANNELS, SEGMENT_BLOCKS, BATCHES = (256, 1152, 28, (2, 16, 64)) if ON_CUDA else (256, 384, 4, (2, 8))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torch", "triton", "cpp", "compile")
# torch.compile costs seconds per shape: it is timed on the case docs/DESIGN.md §6 quotes only.
COMPILED = {"op": "cached_block", "dtype": "bf16", "correction": "extrapolate"}
SEGMENT_CPU_BACKENDS = ("torch", "copy", "compile", "cpp")  # baselines first: cpp records ratios to all
SEGMENT_CPU_DTYPES = ("fp32", "bf16")
# In smoke mode (--benchmark-disable) torch.compile runs for this one case only (a compile per case).
SMOKE_COMPILED = ("testbed", "fp32", "extrapolate")


def skip_reason(backend):
    return common.cpp_skip_reason(DEVICE) if backend == "cpp" else backend_skip_reason(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("correction", common.CORRECTIONS)
@pytest.mark.parametrize("op", common.OPS)
def test_kernel(op, correction, batch, dtype, backend, measure, baselines, copy_bandwidth, benchmark):
    reason = skip_reason(backend)
    if reason is None and backend == "compile" and (op, dtype, correction) != tuple(COMPILED.values()):
        reason = "torch.compile is timed for cached_block / bf16 / extrapolate only (each shape compiles for seconds)"
    if reason:
        pytest.skip(reason)
    benchmark.group = f"kernel {op} {correction} {dtype}"
    case = common.make_case(op, batch, TOKENS, CHANNELS, DTYPES[dtype], DEVICE,
                            terms=common.CORRECTIONS[correction], blocks=SEGMENT_BLOCKS)
    key = ("kernel", op, correction, dtype, batch)
    eager = None
    if backend != "torch":  # the eager reference on the same inputs: its benchmark ran just before
        eager = baselines.seconds(key, lambda: case.run("torch"), inner=10)  # 10 calls per synchronize
    if backend == "compile":
        fn = torch.compile(case.run_reference, dynamic=False)
    else:
        fn = lambda: case.run(backend)  # noqa: E731
    seconds = measure(fn, suite="kernels", op=op, backend=backend, correction=correction, dtype=dtype,
                      shapes=case.shapes, bytes_moved=case.bytes_moved, copy_gbps=common.gbps(copy_bandwidth, 1.0),
                      floor_ms=case.bytes_moved / copy_bandwidth * 1e3, eager_ms=eager and eager * 1e3)
    if backend == "torch":
        baselines.record(key, seconds)
    if seconds is not None:
        benchmark.extra_info.update(
            gbps=common.gbps(case.bytes_moved, seconds),
            pct_copy_bw=100 * case.bytes_moved / seconds / copy_bandwidth,
            speedup_vs_eager=1.0 if eager is None else eager / seconds)


@pytest.mark.parametrize("backend", SEGMENT_CPU_BACKENDS)
@pytest.mark.parametrize("correction", common.CORRECTIONS)
@pytest.mark.parametrize("dtype", SEGMENT_CPU_DTYPES)
@pytest.mark.parametrize("shape", common.CPU_SEGMENT_SHAPES)
def test_segment_cpu(shape, dtype, correction, backend, measure, baselines, smoke, benchmark):
    if ON_CUDA:
        pytest.skip("the CPU comparison of cached_segment runs on CPU machines")
    reason = common.cpp_skip_reason(DEVICE) if backend == "cpp" else None
    if backend == "compile" and smoke and (shape, dtype, correction) != SMOKE_COMPILED:
        reason = f"smoke mode compiles torch.compile for {'/'.join(SMOKE_COMPILED)} only (seconds per case)"
    if reason:
        pytest.skip(reason)
    benchmark.group = f"segment-cpu {shape} {dtype} {correction}"
    sizes = common.CPU_SEGMENT_SHAPES[shape]
    case = common.make_case("cached_segment", common.CPU_SEGMENT_BATCH, sizes["tokens"], sizes["channels"],
                            DTYPES[dtype], DEVICE, terms=common.CORRECTIONS[correction], blocks=sizes["blocks"])
    key = ("segment-cpu", shape, dtype, correction)
    copy = common.copy_of(case.bytes_moved, DEVICE)
    compiled = None
    if backend in ("compile", "cpp"):
        # Every case compiles the same code object (OpCase.run_reference) anew: without a reset, dynamo
        # would hit its recompile limit after 8 cases and silently run the rest eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(case.run_reference, dynamic=False)
    fns = {"torch": lambda: case.run("torch"), "copy": copy, "compile": compiled, "cpp": lambda: case.run("cpp")}
    ratios = {}
    if backend != "torch":
        ratios["eager"] = baselines.seconds(key + ("torch",), fns["torch"])
    if backend not in ("torch", "copy"):
        ratios["copy"] = baselines.seconds(key + ("copy",), copy, inner=10)
    if backend == "cpp" and not (smoke and (shape, dtype, correction) != SMOKE_COMPILED):
        ratios["compile"] = baselines.seconds(key + ("compile",), compiled, repeats=5, inner=3)
    seconds = measure(fns[backend], suite="segment-cpu", op="cached_segment", backend=backend, shape_name=shape,
                      correction=correction, dtype=dtype, shapes=case.shapes, bytes_moved=case.bytes_moved,
                      **{f"{name}_ms": value * 1e3 for name, value in ratios.items()})
    baselines.record(key + (backend,), seconds)
    if seconds is not None:
        benchmark.extra_info.update(gbps=common.gbps(case.bytes_moved, seconds))
        if "eager" in ratios:
            benchmark.extra_info["speedup_vs_eager"] = ratios["eager"] / seconds
        if "compile" in ratios:
            benchmark.extra_info["speedup_vs_compile"] = ratios["compile"] / seconds
        if "copy" in ratios:
            benchmark.extra_info["pct_copy_floor"] = 100 * ratios["copy"] / seconds
