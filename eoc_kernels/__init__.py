"""eoc_kernels: fused cache-reuse ops for Error-Optimized Cache (EOC) in Diffusion Transformers.

The ops of DESIGN §3 behind one dispatcher; ``reference`` is the eager ground truth.
"""

import importlib.util

from . import cpp, cuda, reference  # register the "cpp" and "cuda" backends (available when _C holds their kernels)
from .dispatch import available_backends, resolve_backend
from .ops import cached_block, cached_branch, cached_segment
from .reference import history_coefficients, history_weights

if importlib.util.find_spec("triton") is not None:  # the package works without triton
    from . import triton as _triton_backend  # noqa: F401  (registers the "triton" backend)

__version__ = "0.1.0"


def cpp_available() -> bool:
    """Whether the C++ CPU kernels (``eoc_kernels._C``, the "cpp" backend) are built and loaded."""
    return cpp.AVAILABLE


def cuda_available() -> bool:
    """Whether the CUDA C++ kernels (the "cuda" backend) are built into ``eoc_kernels._C`` and loaded."""
    return cuda.AVAILABLE


__all__ = ["available_backends", "cached_block", "cached_branch", "cached_segment", "cpp_available", "cuda_available",
           "history_coefficients", "history_weights", "reference", "resolve_backend"]
