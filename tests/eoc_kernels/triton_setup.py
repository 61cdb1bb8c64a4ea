"""Where the "triton" backend runs in this test session, and NaN-poisoned outputs for its kernels.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device: the kernels then run on CPU
tensors under the interpreter. With CUDA and no interpreter they are compiled and run on CUDA
tensors. Tests that can run either way use ``DEVICE``; tests that need the interpreter (Triton on
CPU tensors, interpreter tile sizes) skip with ``NEEDS_INTERPRETER``.
"""

import contextlib

import pytest
import torch

import eoc_kernels

triton_backend = getattr(eoc_kernels, "triton", None)
INTERPRETED = triton_backend is not None and triton_backend.INTERPRETED
if triton_backend is None:
    DEVICE = None
elif INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    DEVICE = None

#: Skips a module or test that runs Triton on CPU tensors when the interpreter is off.
NEEDS_INTERPRETER = pytest.mark.skipif(
    not INTERPRETED, reason="runs Triton on CPU tensors: needs triton and TRITON_INTERPRET=1 "
                            "(the default without CUDA; with CUDA see test_triton_gpu.py)")
#: Skips a module or test that runs the triton backend on DEVICE when it has none.
NEEDS_TRITON_DEVICE = pytest.mark.skipif(
    DEVICE is None, reason="needs triton, with TRITON_INTERPRET=1 (CPU) or a CUDA device")


@contextlib.contextmanager
def poisoned_outputs():
    """Every output buffer the custom ops allocate starts as NaN, so an element a kernel fails to
    write fails the comparison; yields the list of the buffers allocated so far."""
    buffers = []
    common = triton_backend._common
    original = common.new_output

    def poisoned(x):
        out = torch.full_like(x, float("nan"))
        buffers.append(out)
        return out

    common.new_output = poisoned
    try:
        yield buffers
    finally:
        common.new_output = original
