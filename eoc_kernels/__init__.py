"""eoc_kernels: fused cache-reuse ops for Error-Optimized Cache (EOC) in Diffusion Transformers.

The ops of DESIGN §3 behind one dispatcher; ``reference`` is the eager ground truth.
"""

from . import reference
from .dispatch import available_backends, resolve_backend
from .ops import cached_block, cached_branch

__version__ = "0.1.0"

__all__ = ["available_backends", "cached_block", "cached_branch", "reference", "resolve_backend"]
