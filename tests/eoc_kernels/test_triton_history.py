"""The K-history correction (issue 10) in the Triton kernels, against the naive fp64 loop and the reference.

Every kernel on odd shapes and every dtype, coef of length P = 3, 4 and 5 as Python floats and as
tensors, with zeros in the middle (beta2 = 0 with beta3 != 0, beta1 = 0 with beta2 != 0, ...), and
cached_segment over rings of G = 1..4 generations; every tensor or cache slot a kernel must not read
holds NaN, and every output buffer starts as NaN. Under the interpreter (CPU) P = 3 equals the
hand-written three-term loop bit for bit, as the reference does (test_history.py). Kept small for the
interpreter: this file runs in about a minute on two cores.
"""

import pytest
import torch

from eoc_kernels import reference

from .naive import (
    COEFS,
    DTYPES,
    assert_matches_naive,
    random_branch,
    random_segment,
    run_op,
    run_segment,
    segment_threshold,
    splitting_threshold,
)
from .op_inputs import history_op_inputs, requiring_grad
from .test_history import (
    COEF_CASES,
    COEF_IDS,
    as_form,
    history_branch,
    old_formula,
    poison_segment,
    poisoned,
    unread,
)
from .triton_setup import NEEDS_INTERPRETER, triton_backend
from .triton_setup import poisoned_outputs as poisoned_output_buffers

pytestmark = NEEDS_INTERPRETER

TRITON = dict(backend="triton")
NAN = float("nan")


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every output buffer the custom ops allocate starts as NaN; yields the list of them."""
    with poisoned_output_buffers() as buffers:
        yield buffers


@pytest.fixture(params=["interpreter-tile", "one-row", "narrow-chunks"])
def blocking(request, monkeypatch):
    """The interpreter's large tiles; one row per program; or chunks of 16 columns (C = 123 in eight
    chunks, the last one masked; whole rows keep one chunk per row)."""
    common = triton_backend._common
    if request.param == "one-row":
        monkeypatch.setattr(common, "INTERPRETER_TILE", 1)
    elif request.param == "narrow-chunks":
        monkeypatch.setattr(common, "MIN_CHUNK", 16)
        monkeypatch.setattr(common, "INTERPRETER_TILE", 16)
    return request.param


# --- against the naive fp64 loop ---------------------------------------------------------------------

@pytest.mark.parametrize("threshold", ["zero", "split"])
@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label, coef", COEF_CASES, ids=COEF_IDS)
def test_branch_history_matches_naive(label, coef, dtype, coef_form, threshold, tolerance, poisoned_outputs):
    gen = torch.Generator().manual_seed(80)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    branch = history_branch(gen, shape, dtype, as_form(coef, coef_form), heads=2)
    value = splitting_threshold([branch]) if threshold == "split" else 0.0
    out = run_op(x, [poisoned(branch, unread(coef, branch))], token_threshold=value, **TRITON)
    assert len(poisoned_outputs) == 1  # the kernel ran and wrote every element
    assert_matches_naive(out, x, [branch], value, tolerance(dtype))


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("label, coef", [COEF_CASES[3], COEF_CASES[4]], ids=["P5", "P5-beta2-zero"])
def test_branch_history_blocking(label, coef, coef_form, blocking, tolerance):
    """Whole rows (a splitting threshold) and chunked rows (threshold 0) in each blocking, C = 1152."""
    gen = torch.Generator().manual_seed(81)
    shape = (1, 3, 1152) if blocking != "one-row" else (3, 2, 123)
    x = torch.randn(shape, generator=gen)
    branch = history_branch(gen, shape, torch.float32, as_form(coef, coef_form))
    for value in (0.0, splitting_threshold([branch])):
        out = run_op(x, [poisoned(branch, unread(coef, branch))], token_threshold=value, **TRITON)
        assert_matches_naive(out, x, [branch], value, tolerance(torch.float32))


@pytest.mark.parametrize("coef_form", ["float", "tensor", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("attn_case, mlp_case", [(COEF_CASES[3], COEF_CASES[2]), (COEF_CASES[4], COEF_CASES[0]),
                                                 (COEF_CASES[1], COEF_CASES[5])],
                         ids=lambda case: case[0])
def test_block_history_matches_naive(attn_case, mlp_case, dtype, coef_form, tolerance, poisoned_outputs):
    """Each branch its own length and zeros; the MLP branch has C_1 and C_2 only (no prev3)."""
    gen = torch.Generator().manual_seed(82)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    forms = {"float": ("float", "float"), "tensor": ("tensor", "tensor"), "mixed": ("tensor", "float")}[coef_form]
    attn = history_branch(gen, shape, dtype, as_form(attn_case[1], forms[0]), heads=2)
    mlp = random_branch(gen, *shape, dtype, terms=("delta", "prev", "prev2", "trend"),
                        coef=as_form(mlp_case[1], forms[1]))
    value = splitting_threshold([attn, mlp])
    branches = [poisoned(attn, unread(attn_case[1], attn)), poisoned(mlp, unread(mlp_case[1], mlp))]
    out = run_op(x, branches, token_threshold=value, **TRITON)
    assert len(poisoned_outputs) == 1
    assert_matches_naive(out, x, [attn, mlp], value, tolerance(dtype))


@pytest.mark.parametrize("threshold", ["zero", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_coefs", [3, 4, 5], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("generations", [1, 2, 3, 4], ids=lambda g: f"G{g}")
def test_segment_ring_matches_naive(generations, num_coefs, dtype, threshold, tolerance, poisoned_outputs):
    """Mixed generations in a ring, random coefficients (some zero), strided cache and gate views;
    every slot past K = min(G − 1, P − 2) or with zero coefficients holds NaN."""
    gen = torch.Generator().manual_seed(83)
    shape = (2, 5, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    segment = random_segment(gen, *shape, dtype, blocks=2, heads=2, generations=generations, num_coefs=num_coefs)
    value = segment_threshold(segment) if threshold == "split" else 0.0
    out = run_segment(x, poison_segment(segment), token_threshold=value, **TRITON)
    assert len(poisoned_outputs) == 1
    assert_matches_naive(out, x, segment["entries"], value, tolerance(dtype))


@pytest.mark.parametrize("generations", [3, 4], ids=lambda g: f"G{g}")
def test_segment_ring_blocking(generations, blocking, tolerance):
    gen = torch.Generator().manual_seed(84)
    shape = (3, 2, 123)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, generations=generations, num_coefs=5)
    for value in (0.0, segment_threshold(segment)):
        out = run_segment(x, poison_segment(segment), token_threshold=value, **TRITON)
        assert_matches_naive(out, x, segment["entries"], value, tolerance(torch.float32))


def test_segment_plain_reuse_reads_only_the_current_generation():
    """coef=None in a ring of 4: every other generation, and the prior, hold NaN."""
    gen = torch.Generator().manual_seed(85)
    shape = (2, 5, 37)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=3, generations=4, coef=None)
    out = run_segment(x, poison_segment(segment), **TRITON)
    assert_matches_naive(out, x, segment["entries"], 0.0, dict(atol=1e-5, rtol=1e-5))


# --- P = 3 is the old formula, bit for bit (interpreter) ---------------------------------------------

@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["branch", "block"])
def test_three_coefficients_are_the_old_formula_bit_for_bit(op, dtype, coef_form):
    """The interpreter evaluates the kernels' fp32 operations one by one, as the hand loop does: P = 3
    equals it exactly. (bf16 is left out of that comparison: the interpreter's fp32 -> bf16 store
    conversion is not torch's round-to-nearest-even, one bf16 ulp apart at some elements.) P = 5 with
    beta2 = beta3 = 0 and NaN history tensors given equals P = 3 exactly at every dtype."""
    gen = torch.Generator().manual_seed(86)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    coefs = [(0.8, 0.6, -0.5), (0.4, 1.0, 0.9)][: 1 if op == "branch" else 2]
    branches = [random_branch(gen, *shape, dtype, heads=2, coef=as_form(coef, coef_form)) for coef in coefs]
    threshold = splitting_threshold(branches)
    three = run_op(x, branches, token_threshold=threshold, **TRITON)
    if dtype != torch.bfloat16:
        assert torch.equal(three, old_formula(x, branches, threshold))
    padded = [dict(branch, coef=as_form((*coef, 0.0, 0.0), coef_form), prev2=torch.full_like(branch["prev"], NAN),
                   prev3=torch.full_like(branch["prev"], NAN)) for branch, coef in zip(branches, coefs)]
    assert torch.equal(run_op(x, padded, token_threshold=threshold, **TRITON), three)


@pytest.mark.parametrize("generations", [2, 3, 4], ids=lambda g: f"G{g}")
def test_segment_three_coefficients_are_the_old_formula_bit_for_bit(generations):
    gen = torch.Generator().manual_seed(87)
    shape = (2, 5, 37)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, heads=2, generations=generations)
    entries = segment["entries"]
    threshold = segment_threshold(segment)
    expected = x
    for s in range(2):
        expected = old_formula(expected, entries[2 * s: 2 * s + 2], threshold)
    assert torch.equal(run_segment(x, poison_segment(segment), token_threshold=threshold, **TRITON), expected)


def test_trailing_zero_coefficients_equal_the_short_form():
    """(α, β₁, γ, β₂) and (α, β₁, γ, β₂, 0) give the same output exactly, floats or tensors."""
    gen = torch.Generator().manual_seed(88)
    shape = (2, 7, 123)
    x = torch.randn(shape, generator=gen)
    branch = history_branch(gen, shape, torch.float32, COEFS[4])
    threshold = splitting_threshold([branch])
    short = run_op(x, [branch], token_threshold=threshold, **TRITON)
    for coef in ((*COEFS[4], 0.0), torch.tensor(COEFS[4]), torch.tensor((*COEFS[4], 0.0))):
        out = run_op(x, [poisoned(dict(branch, coef=coef), ["prev3"])], token_threshold=threshold, **TRITON)
        assert torch.equal(out, short), coef


# --- the custom ops directly: clamping, opcheck ------------------------------------------------------

@pytest.mark.parametrize("generations", [3, 4], ids=lambda g: f"G{g}")
def test_segment_kernel_never_reads_past_the_ring(generations):
    """Out-of-range generations (a device-side assert on CUDA) are clamped into 0..G−1 in the kernel:
    the cache here is the middle G generations of a buffer whose outer ones hold NaN."""
    gen = torch.Generator().manual_seed(89)
    shape = (2, 5, 6)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, generations=generations, num_coefs=5)
    cache = segment["cache"].nan_to_num()
    buffer = torch.full((generations + 2, *cache.shape[1:]), NAN)
    buffer[1:-1] = cache
    bad = torch.tensor([[-1, generations], [9, -7]], dtype=torch.int32)
    for coef in (segment["coef"], segment["coef"][..., :4], None):
        out = torch.ops.eoc.cached_segment(x, segment["gates"], buffer[1:-1], bad, None, None, coef, 0.0, None,
                                           "triton")
        expected = reference.cached_segment(x, segment["gates"], cache, bad.clamp(0, generations - 1), coef=coef)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("op_name", ["cached_branch", "cached_block", "cached_segment"])
def test_opcheck_history_inputs(op_name, grad):
    """torch.library.opcheck (schema, fake, autograd registration, aot dispatch) on the K-history cases."""
    gen = torch.Generator().manual_seed(90)
    op = getattr(torch.ops.eoc, op_name).default
    for args in history_op_inputs(gen, "triton")[op_name]:
        torch.library.opcheck(op, requiring_grad(args) if grad else args)
