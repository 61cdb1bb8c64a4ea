"""Test setup shared by tests/eoc_kernels and tests/eoc_dit.

TRITON_INTERPRET must be set before anything imports triton: Triton reads it when ``@triton.jit``
decorates a kernel (at import of the kernel module). On a machine without a CUDA device the Triton
kernels are tested on CPU under the interpreter (docs/DESIGN.md §3), so it is set to 1 there; with CUDA it
is left off, so a plain ``pytest`` runs the compiled kernels (tests that run Triton on CPU tensors
then skip). An explicit TRITON_INTERPRET in the environment always wins.
"""

import os

import torch  # before triton: torch.cuda.is_available() does not import it

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

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
