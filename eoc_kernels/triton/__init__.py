"""The "triton" backend of the EOC ops (DESIGN §3): fused Triton kernels behind torch.library.

Each op is a custom op ``eoc::cached_branch``, ``eoc::cached_block``, ``eoc::cached_segment`` (one
file each: kernel, launcher, custom op with its fake, backend entry) so that
``torch.compile(fullgraph=True)`` traces through it; ``_common`` holds the shared device function
and the blocking strategy. Importing this package registers the backend with ``dispatch``: it runs
on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (tests), where ``auto``
still prefers the eager reference (the interpreter is never the fastest path). The kernels are
forward-only; each op's backward recomputes the eager reference, so gradients are the "torch"
backend's.
"""

from .. import dispatch
from ._block import cached_block, cached_block_op
from ._branch import cached_branch, cached_branch_op
from ._common import INTERPRETED, MAX_CHANNELS, is_available
from ._segment import cached_segment, cached_segment_op

__all__ = ["INTERPRETED", "MAX_CHANNELS", "cached_block", "cached_block_op", "cached_branch",
           "cached_branch_op", "cached_segment", "cached_segment_op", "is_available"]


def _auto_eligible(device):
    return device.type == "cuda"


for _fn in (cached_branch, cached_block, cached_segment):
    dispatch.register_backend(_fn.__name__, "triton", _fn, is_available,
                              auto_eligible=_auto_eligible)
