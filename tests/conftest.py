"""Test setup shared by tests/eoc_kernels and tests/eoc_dit.

TRITON_INTERPRET must be set before anything imports triton: Triton reads it when ``@triton.jit``
decorates a kernel (at import of the kernel module), and on machines without a GPU the Triton
kernels are tested on CPU under the interpreter (DESIGN §3). setdefault keeps an explicit
TRITON_INTERPRET=0 for GPU runs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Allowed |actual - expected| <= atol + rtol * |expected| of an op's output against an fp64
# reference computed from the same (low-precision) inputs. fp32: accumulated fp32 rounding.
# fp16/bf16: about two output ulps (2^-10 and 2^-7 relative) -- the single final rounding costs
# half an ulp, the fp32 arithmetic before it can tip it over a rounding boundary.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture
def tolerance():
    """tolerance(dtype) -> dict(atol=..., rtol=...) for torch.testing.assert_close."""
    return TOLERANCES.__getitem__


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """Test tensors are tiny: intra-op threads only cost, and they spin badly on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
