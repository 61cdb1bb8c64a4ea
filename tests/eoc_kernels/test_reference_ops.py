"""The public ops (torch backend = eoc_kernels.reference) against a naive fp64 implementation.

The naive version (tests/eoc_kernels/naive.py) walks the tokens one by one with plain indexing, so
it shares no broadcasting or masking code with the reference. Inputs are fresh random tensors on
odd shapes; low-precision cases compare against fp64 math on the same low-precision inputs
(tolerances in tests/conftest.py).
"""

import pytest
import torch

from eoc_kernels import reference

from .naive import (
    ALL_TERMS,
    DTYPES,
    assert_matches_naive,
    check_random_case,
    random_branch,
    run_block,
    run_branch,
    run_op,
    splitting_threshold,
)

SHAPES = [(1, 49, 123), (2, 49, 123), (3, 4, 1152), (4, 7, 8)]
HEAD_CASES = [(shape, heads) for shape in SHAPES for heads in sorted({1, 2, shape[0]})
              if shape[0] % heads == 0]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The public ops run the eager reference here ("auto" would pick the C++ kernels on the CPU)."""
    monkeypatch.setenv("EOC_BACKEND", "torch")


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("terms", [(), ("delta",), ("prev",), ("trend",), ALL_TERMS],
                         ids=lambda terms: "+".join(terms) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_branch_matches_naive(shape, dtype, terms, tolerance):
    check_random_case(0, shape, dtype, tolerance(dtype), dict(terms=terms))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, heads", HEAD_CASES, ids=str)
def test_block_matches_naive(shape, heads, dtype, tolerance):
    # The branches use different head counts H and different coefficients.
    check_random_case(1, shape, dtype, tolerance(dtype), dict(heads=heads),
                      dict(heads=shape[0] // heads, coef=(-0.3, 1.0, 0.7)))


@pytest.mark.parametrize("threshold_form", ["float", "tensor[]", "tensor[1]"])
@pytest.mark.parametrize("coef_form", ["tuple", "list", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["branch", "block"])
def test_token_threshold_selects_tokens(op, dtype, coef_form, threshold_form, tolerance):
    gen = torch.Generator().manual_seed(2)
    shape = (2, 49, 123)
    as_form = {"tuple": tuple, "list": list,
               "tensor": lambda coef: torch.tensor(coef, dtype=torch.float32)}[coef_form]
    x = torch.randn(shape, generator=gen).to(dtype)
    branches = [random_branch(gen, *shape, dtype, heads=2, coef=as_form(coef))
                for coef in [(0.8, 0.6, -0.5), (0.4, 1, 0.9)][: 1 if op == "branch" else 2]]
    threshold = splitting_threshold(branches)
    as_threshold = {"float": float, "tensor[]": torch.tensor,
                    "tensor[1]": lambda value: torch.tensor([value])}[threshold_form]
    out = run_op(x, branches, token_threshold=as_threshold(threshold))
    assert_matches_naive(out, x, branches, threshold, tolerance(dtype))


@pytest.mark.parametrize("threshold", [0.0, -1.0, torch.tensor(0.0), 1e-3], ids=str)
def test_nan_correction_applies_only_when_threshold_nonpositive(threshold, tolerance):
    gen = torch.Generator().manual_seed(3)
    shape = (2, 7, 8)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32)
    branch["prev"][1, 3, 5] = float("nan")  # corr and score of token (1, 3) become NaN
    out = run_branch(x, branch, token_threshold=threshold)
    assert_matches_naive(out, x, [branch], threshold, tolerance(torch.float32), equal_nan=True)
    assert torch.isnan(out[1, 3]).any() == (float(threshold) <= 0)
    out[1, 3] = 0.0
    assert torch.isfinite(out).all()  # the NaN stays in its token


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_block_is_branch_twice_up_to_rounding(shape, tolerance):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen)
    attn = random_branch(gen, *shape, torch.float32)
    mlp = random_branch(gen, *shape, torch.float32, coef=(0.2, -0.7, 0.4))
    threshold = torch.tensor(splitting_threshold([attn, mlp]))
    twice = run_branch(run_branch(x, attn, token_threshold=threshold), mlp,
                       token_threshold=threshold)
    torch.testing.assert_close(run_block(x, attn, mlp, token_threshold=threshold), twice,
                               **tolerance(torch.float32))


@pytest.mark.parametrize("terms", [(), ALL_TERMS], ids=["plain", "all-terms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inputs_unchanged_and_output_new(dtype, terms):
    gen = torch.Generator().manual_seed(5)
    shape = (2, 7, 8)
    x = torch.randn(shape, generator=gen).to(dtype)
    attn = random_branch(gen, *shape, dtype, terms=terms)
    mlp = random_branch(gen, *shape, dtype, terms=terms)
    inputs = [x] + [value for branch in (attn, mlp) for value in branch.values()
                    if isinstance(value, torch.Tensor)]
    before = [tensor.clone() for tensor in inputs]
    outputs = [run_branch(x, attn), run_block(x, attn, mlp),
               reference.corrected_feature(attn["cache"])]
    for tensor, saved in zip(inputs, before):
        assert torch.equal(tensor, saved)
    input_ptrs = {tensor.data_ptr() for tensor in inputs}
    for out in outputs:
        assert out.data_ptr() not in input_ptrs
    assert outputs[2].dtype == torch.float32


@pytest.mark.parametrize("op", ["branch", "block"])
def test_tensor_parameters_need_no_host_value(op):
    """On meta tensors any .item()/float() of a coefficient or threshold would raise."""
    shape = (4, 5, 6)
    meta = torch.device("meta")
    x = torch.empty(shape, device=meta, dtype=torch.bfloat16)
    branch = dict(gate=torch.empty(4, 6, device=meta, dtype=torch.bfloat16),
                  cache=torch.empty_like(x), prev=torch.empty_like(x),
                  delta=torch.empty(2, 5, 6, device=meta, dtype=torch.bfloat16),
                  trend=torch.empty(1, 5, 6, device=meta, dtype=torch.bfloat16),
                  coef=torch.empty(3, device=meta))
    threshold = torch.empty(1, device=meta)
    out = run_op(x, [branch] * (1 if op == "branch" else 2), token_threshold=threshold)
    assert out.shape == shape and out.dtype == x.dtype and out.device == meta
