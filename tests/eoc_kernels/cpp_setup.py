"""Whether the "cpp" backend (eoc_kernels._C) runs in this test session, and NaN-poisoned outputs for it.

The extension is built by ``pip install -r requirements.txt`` (``.ci/run``, the README) wherever a
C++ compiler exists, so a missing ``_C`` there is a build failure, not a reason to skip: tests that need it
skip only when no C++ compiler exists (the reference-only install) or when ``EOC_ALLOW_NO_EXT=1`` says the
session knowingly runs without it; ``test_cpp_ops.test_extension_is_built`` fails otherwise.
"""

import contextlib
import os
import shutil

import pytest
import torch

import eoc_kernels
from eoc_kernels import cpp

AVAILABLE = eoc_kernels.cpp_available()
ALLOW_NO_EXT = os.environ.get("EOC_ALLOW_NO_EXT", "") == "1"
COMPILER = shutil.which((os.environ.get("CXX") or "c++").split()[0])

#: Skips a module or test that runs the cpp backend when eoc_kernels._C is not loaded.
NEEDS_CPP = pytest.mark.skipif(not AVAILABLE, reason=f"needs eoc_kernels._C: {cpp.UNAVAILABLE_REASON}")


def missing_extension_is_allowed() -> str | None:
    """Why a session without eoc_kernels._C is acceptable (None: it is a failure)."""
    if ALLOW_NO_EXT:
        return "EOC_ALLOW_NO_EXT=1"
    if COMPILER is None:
        return "no C++ compiler on this machine: the install uses the eager reference"
    return None


@contextlib.contextmanager
def poisoned_outputs():
    """Every output buffer the cpp backend allocates starts as NaN, so an element the kernel fails to
    write fails the comparison; yields the list of the buffers allocated so far."""
    buffers = []
    original = cpp.new_output

    def poisoned(x):
        out = torch.full_like(x, float("nan"))
        buffers.append(out)
        return out

    cpp.new_output = poisoned
    try:
        yield buffers
    finally:
        cpp.new_output = original
