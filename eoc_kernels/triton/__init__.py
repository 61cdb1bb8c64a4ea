"""The "triton" backend of the EOC ops (DESIGN §3): fused Triton kernels behind torch.library.

One file per op (kernel, launcher, the ``<op>_kernel`` entry taking the ``eoc::`` schema's split
arguments); ``_common`` holds the shared device function and the blocking strategy. Importing this
package registers those entries as the "triton" kernels of the ``eoc::`` ops
(``eoc_kernels/_library.py``: one schema, fake and reference backward for every backend, so
``torch.compile(fullgraph=True)`` traces through them) on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (tests), where ``auto`` still prefers the C++ kernels or the eager reference (the
interpreter is never the fastest path).
"""

from .. import _library
from ._block import cached_block_kernel
from ._branch import cached_branch_kernel
from ._common import INTERPRETED, MAX_CHANNELS, is_available
from ._segment import cached_segment_kernel

_KERNELS = {"cached_branch": cached_branch_kernel, "cached_block": cached_block_kernel,
            "cached_segment": cached_segment_kernel}


def _auto_eligible(device):
    return device.type == "cuda"


_functions = _library.register_backend(
    "triton",
    {(op, device_type): fn for op, fn in _KERNELS.items()
     for device_type in (("cuda", "cpu") if INTERPRETED else ("cuda",))},
    is_available, auto_eligible=_auto_eligible)
cached_branch = _functions["cached_branch"]
cached_block = _functions["cached_block"]
cached_segment = _functions["cached_segment"]

__all__ = ["INTERPRETED", "MAX_CHANNELS", "cached_block", "cached_block_kernel", "cached_branch",
           "cached_branch_kernel", "cached_segment", "cached_segment_kernel", "is_available"]
