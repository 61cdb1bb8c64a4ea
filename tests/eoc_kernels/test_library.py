"""The eoc:: op library (eoc_kernels/_library.py): one schema per op, kernels registered per device."""

import pytest
import torch

from eoc_kernels import _extension, _library

from .cpp_setup import NEEDS_CPP
from .triton_setup import INTERPRETED


def test_each_op_has_one_schema_naming_its_kernel():
    for op in _library.OP_NAMES:
        schema = getattr(torch.ops.eoc, op).default._schema
        assert schema.arguments[-1].name == "kernel" and str(schema.arguments[-1].type) == "str", op
        assert str(schema.returns[0].type) == "Tensor"


def test_kernels_are_registered_per_device_key():
    for op in _library.OP_NAMES:
        qualified = f"eoc::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU") == (
            bool(_library._KERNELS.get((op, "cpu")))), op
        # the CUDA key gets the Triton kernels whether or not a GPU is present
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), op
        assert "triton" in _library._KERNELS[(op, "cuda")]
        assert ("triton" in _library._KERNELS.get((op, "cpu"), {})) == INTERPRETED


@NEEDS_CPP
def test_the_out_variant_schema_is_shared_by_cpu_and_cuda_kernels():
    for op in _library.OP_NAMES:
        assert _extension.has_kernel(f"{op}_out", "CPU")
        schema = getattr(torch.ops.eoc, f"{op}_out").default._schema
        functional = getattr(torch.ops.eoc, op).default._schema
        # the out op takes the functional op's split arguments (minus the kernel name), then out
        assert [a.name for a in schema.arguments] == [a.name for a in functional.arguments[:-1]] + ["out"]


@NEEDS_CPP
def test_an_unregistered_kernel_name_raises_naming_the_registered_ones():
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match=r"eoc::cached_branch has no 'cuda' kernel for cpu tensors; "
                                           r"registered: cpp"):
        torch.ops.eoc.cached_branch(x, x[:, 0], x, None, None, None, [0.0] * 3, None, 0.0, None, "cuda")


def test_meta_tensors_get_the_fake():
    x = torch.randn(2, 3, 8, device="meta")
    out = torch.ops.eoc.cached_branch(x, x[:, 0], x, None, None, None, [0.0] * 3, None, 0.0, None, "cpp")
    assert out.device.type == "meta" and out.shape == x.shape


def test_register_kernel_refuses_unknown_ops():
    with pytest.raises(ValueError, match="unknown op 'cached_tile'"):
        _library.register_kernel("cached_tile", "cpu", "cpp", lambda *args: None)
