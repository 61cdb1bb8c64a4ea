"""The "cuda" backend of the EOC ops (docs/DESIGN.md §3): CUDA C++ kernels from ``eoc_kernels._C``.

Eager equivalent: ``eoc_kernels.reference``. The kernels (``csrc/cuda_ops.cu``) are the CUDA kernels of
the out-variant ops ``eoc::cached_*_out`` (``csrc/schema.cpp``), the same ops whose CPU kernels the
"cpp" backend runs; they exist in a build of ``_C`` against a CUDA torch with nvcc (``setup.py``). This
module registers them, wrapped to allocate the output with ``new_output`` (tests replace it to poison the
buffer), as the "cuda" kernel of the ``eoc::`` functional ops on CUDA tensors, and the backend's
functions with ``dispatch``. Without them (a CPU build, or no GPU) it still imports, ``AVAILABLE`` is
False and an explicit ``backend="cuda"`` raises a ``ValueError`` saying why.

"auto" on CUDA prefers "triton" (dispatch.BACKENDS order) until a GPU run measures otherwise
(``benchmarks/gpu/run_gpu_checks.py`` times both).
"""

from __future__ import annotations

import torch

from . import _extension, _library

#: Whether _C holds the CUDA kernels (a build against a CUDA torch).
AVAILABLE = _extension.AVAILABLE and _extension.has_kernel("cached_segment_out", "CUDA")
UNAVAILABLE_REASON = _extension.UNAVAILABLE_REASON or (
    None if AVAILABLE else "eoc_kernels._C was built without its CUDA kernels (csrc/cuda_ops.cu needs a CUDA "
                           "torch and nvcc at build time: `pip install --no-build-isolation -e .` there)")


def is_available(device) -> bool:
    """The cuda backend runs on CUDA tensors when _C holds the CUDA kernels."""
    return AVAILABLE and torch.device(device).type == "cuda"


def unavailable_reason(device) -> str | None:
    """Why the cuda backend cannot run on device (None when it can)."""
    if not AVAILABLE:
        return UNAVAILABLE_REASON
    if torch.device(device).type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got {torch.device(device)}"
    return None


def new_output(x: torch.Tensor) -> torch.Tensor:
    """The op's output buffer (tests replace this to poison it)."""
    return torch.empty_like(x)


def _new_output(x):
    return new_output(x)  # looked up per call, so that a test's replacement takes effect


_functions = _library.register_backend(
    "cuda",
    {(op, "cuda"): _extension.out_kernel(op, _new_output) for op in _library.OP_NAMES} if AVAILABLE else {},
    is_available, unavailable_reason=unavailable_reason)
cached_branch = _functions["cached_branch"]
cached_block = _functions["cached_block"]
cached_segment = _functions["cached_segment"]
