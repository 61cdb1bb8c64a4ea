"""Kernel microbenchmarks: every op × backend × batch × dtype × correction preset (docs/DESIGN.md §3).

Each records bytes moved (the minimum: every input the op must read once, the output written once),
GB/s, its share of the copy bandwidth measured in the same session (floor_ms: bytes ÷ that bandwidth)
and, for the Triton and torch.compile backends, the speedup over the eager reference (torch backend)
on the same inputs, measured in the same session (the torch backend records 1.0).

Shapes: DiT-XL/2 rows on CUDA (N = 256, C = 1152; cached_segment over all S = 28 blocks); on CPU a
DiT-S row width (N = 256, C = 384) and S = 4, small enough for the shared 2-core CPU.
"""

import pytest
import torch

from benchmarks import _common as common
from benchmarks.conftest import DEVICE, ON_CUDA, backend_skip_reason

TOKENS, CHANNELS, SEGMENT_BLOCKS, BATCHES = (256, 1152, 28, (2, 16, 64)) if ON_CUDA else (256, 384, 4, (2, 8))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("torch", "triton", "compile")
# torch.compile costs seconds per shape: it is timed on the case docs/DESIGN.md §6 quotes only.
COMPILED = {"op": "cached_block", "dtype": "bf16", "correction": "extrapolate"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("correction", common.CORRECTIONS)
@pytest.mark.parametrize("op", common.OPS)
def test_kernel(op, correction, batch, dtype, backend, measure, baselines, copy_bandwidth, benchmark):
    reason = backend_skip_reason(backend)
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
