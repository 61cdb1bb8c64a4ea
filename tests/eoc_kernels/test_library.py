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


#: The split-form signatures every backend implements (issue 10, K-history).
SCHEMAS = {
    "cached_branch": "Tensor x, Tensor gate, Tensor cache, Tensor? prev, Tensor? prev2, Tensor? prev3, Tensor? delta, "
                     "Tensor? trend, float[] coef_values, Tensor? coef_tensor, float threshold_value, "
                     "Tensor? threshold_tensor, str kernel",
    "cached_block": "Tensor x, Tensor gate_attn, Tensor gate_mlp, Tensor cache_attn, Tensor cache_mlp, "
                    "Tensor? prev_attn, Tensor? prev_mlp, Tensor? prev2_attn, Tensor? prev2_mlp, Tensor? prev3_attn, "
                    "Tensor? prev3_mlp, Tensor? delta_attn, Tensor? delta_mlp, Tensor? trend_attn, Tensor? trend_mlp, "
                    "float[] coef_values, Tensor? coef_tensor_attn, Tensor? coef_tensor_mlp, float threshold_value, "
                    "Tensor? threshold_tensor, str kernel",
    "cached_segment": "Tensor x, Tensor gates, Tensor cache, Tensor generation, Tensor? delta, Tensor? trend, "
                      "Tensor? coef, float threshold_value, Tensor? threshold_tensor, str kernel",
}


def test_schemas_are_the_split_signatures():
    for op, arguments in SCHEMAS.items():
        assert str(getattr(torch.ops.eoc, op).default._schema) == f"eoc::{op}({arguments}) -> Tensor"


def test_split_coef_pads_to_five_values_per_branch():
    assert _library.split_coef((1, 2.5, -3)) == ([1.0, 2.5, -3.0, 0.0, 0.0], None)
    assert _library.split_coef([0.5, 0.0, 0.25, 0.125]) == ([0.5, 0.0, 0.25, 0.125, 0.0], None)
    assert _library.split_coef((1.0,) * 5) == ([1.0] * 5, None)
    tensor = torch.tensor([0.5, 0.0, 1.0, 2.0])
    values, coef_tensor = _library.split_coef(tensor)
    assert values == [0.0] * 5 and coef_tensor is tensor  # its length is P
    assert _library.coef_of(*_library.split_coef((0.5, 0.25, 0.125))) == (0.5, 0.25, 0.125, 0.0, 0.0)
    assert _library.coef_of(values, coef_tensor) is tensor


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
        torch.ops.eoc.cached_branch(x, x[:, 0], x, None, None, None, None, None, [0.0] * 5, None, 0.0, None, "cuda")


def test_meta_tensors_get_the_fake():
    x = torch.randn(2, 3, 8, device="meta")
    out = torch.ops.eoc.cached_branch(x, x[:, 0], x, None, None, None, None, None, [0.0] * 5, None, 0.0, None, "cpp")
    assert out.device.type == "meta" and out.shape == x.shape


def test_register_kernel_refuses_unknown_ops():
    with pytest.raises(ValueError, match="unknown op 'cached_tile'"):
        _library.register_kernel("cached_tile", "cpu", "cpp", lambda *args: None)
