"""The compiled extension ``eoc_kernels._C`` (csrc/): its loading, and its out-variant ops as kernels.

``_C`` registers the out-variant ops of ``csrc/schema.cpp`` — ``eoc::cached_branch_out``,
``eoc::cached_block_out``, ``eoc::cached_segment_out`` (the ``eoc::`` schema's split arguments, then
the output to write) — with a CPU kernel (``csrc/cpu_ops.cpp``) and, in a build against a CUDA torch,
a CUDA kernel (``csrc/cuda_ops.cu``). ``out_kernel`` turns one into the ``fn(*split arguments)`` a
backend registers with ``eoc_kernels._library``; the "cpp" (CPU) and "cuda" backends are these same
ops on two dispatch keys.

Without the build (no compiler at install time, or built against another torch) this module still
imports: ``AVAILABLE`` is False and ``UNAVAILABLE_REASON`` says why.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

try:  # importing the module registers torch.ops.eoc.*_out (by name: no package cycle)
    _C = importlib.import_module(f"{__package__}._C")
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    UNAVAILABLE_REASON = (f"eoc_kernels._C is not importable ({type(error).__name__}: {error}); build it with "
                          f"`pip install -r requirements.txt` (a C++ compiler on the PATH), or against a torch of "
                          f"your own with `pip install --no-build-isolation -e .`, or use backend='torch'")
else:
    UNAVAILABLE_REASON = None

#: Whether eoc_kernels._C is loaded.
AVAILABLE = _C is not None


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether _C registered a kernel for eoc::<op_name> on dispatch_key ("CPU", "CUDA")."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(f"eoc::{op_name}", dispatch_key)


def out_kernel(op_name: str, new_output: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """fn(*split arguments) -> output: allocates the output with new_output(x) (tests poison it) and runs
    torch.ops.eoc.<op_name>_out on it."""
    out_op = getattr(torch.ops.eoc, f"{op_name}_out").default

    def run_out_kernel(x, *args):
        out = new_output(x)
        out_op(x, *args, out)
        return out

    run_out_kernel.__name__ = f"{op_name}_out_kernel"
    return run_out_kernel
