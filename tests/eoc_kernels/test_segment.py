"""cached_segment (torch backend = eoc_kernels.reference) against a naive fp64 loop over entries.

The naive version sums cached_branch-style increments entry by entry from the per-entry source
tensors, before they were stacked into the generation buffer, so the generation lookup, the
strided views and the head broadcast of the op are all checked against plain Python indexing.
"""

import pytest
import torch

from eoc_kernels import cached_block, cached_segment

from .naive import DTYPES, assert_matches_naive, random_segment, run_segment, segment_threshold

SEGMENT_SHAPES = [(1, 49, 123), (2, 7, 1152), (3, 5, 8), (4, 7, 8)]
TERM_CASES = [(), ("delta",), ("trend",), ("delta", "trend")]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """The public ops run the eager reference here ("auto" would pick the C++ kernels on the CPU)."""
    monkeypatch.setenv("EOC_BACKEND", "torch")


def check_segment_case(seed, shape, dtype, tol, segment_options=None, threshold=0.0,
                       **op_kwargs):
    """Fresh random segment inputs; the op against the naive loop. Returns (out, x, segment)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    segment = random_segment(gen, *shape, dtype, **(segment_options or {}))
    if threshold == "split":
        threshold = segment_threshold(segment)
    out = run_segment(x, segment, token_threshold=threshold, **op_kwargs)
    assert torch.isfinite(out).all()  # finite inputs, every element written
    assert_matches_naive(out, x, segment["entries"], float(threshold), tol)
    return out, x, segment


@pytest.mark.parametrize("terms", TERM_CASES, ids=lambda terms: "+".join(terms) or "no-prior")
@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SEGMENT_SHAPES, ids=str)
def test_segment_matches_naive(shape, dtype, generations, terms, tolerance):
    # G == 2 adds the online term beta·(Cc − Cp); random coefficients, some of them zero.
    check_segment_case(10, shape, dtype, tolerance(dtype),
                       dict(generations=generations, terms=terms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_segment_head_broadcast(heads, dtype, tolerance):
    check_segment_case(11, (4, 7, 8), dtype, tolerance(dtype), dict(heads=heads))


@pytest.mark.parametrize("threshold_form", ["float", "tensor[]", "tensor[1]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_threshold_selects_tokens(dtype, threshold_form, tolerance):
    gen = torch.Generator().manual_seed(12)
    shape = (2, 49, 123)
    x = torch.randn(shape, generator=gen).to(dtype)
    segment = random_segment(gen, *shape, dtype, blocks=2, heads=2)
    threshold = segment_threshold(segment)
    as_threshold = {"float": float, "tensor[]": torch.tensor,
                    "tensor[1]": lambda value: torch.tensor([value])}[threshold_form]
    out = run_segment(x, segment, token_threshold=as_threshold(threshold))
    assert_matches_naive(out, x, segment["entries"], threshold, tolerance(dtype))


@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
def test_segment_without_coef_is_plain_reuse(generations):
    """coef=None: out = x + Σ gate ⊙ Cc, and no prior or previous generation is read."""
    gen = torch.Generator().manual_seed(13)
    shape = (2, 5, 8)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, generations=generations, coef=None)
    segment["delta"].fill_(float("nan"))
    segment["trend"].fill_(float("nan"))
    expected = x.clone()
    for s in range(segment["cache"].shape[1]):
        for k in range(2):
            g = int(segment["generation"][s, k]) if generations == 2 else 0
            if generations == 2:
                segment["cache"][1 - g, s, k] = float("nan")  # Cp: must not be read
            expected += segment["gates"][:, s, k, None, :] * segment["cache"][g, s, k]
    for threshold in (0.0, 0.5):
        out = run_segment(x, segment, token_threshold=threshold)
        torch.testing.assert_close(out, expected)


def test_segment_is_sum_of_block_increments(tolerance):
    gen = torch.Generator().manual_seed(14)
    shape = (2, 7, 8)
    x = torch.randn(shape, generator=gen)
    segment = random_segment(gen, *shape, torch.float32, blocks=3, heads=2)
    threshold = torch.tensor(segment_threshold(segment))
    expected = x
    entries = segment["entries"]
    for attn, mlp in zip(entries[0::2], entries[1::2]):
        expected = cached_block(
            expected, attn["gate"], mlp["gate"], attn["cache"], mlp["cache"],
            prev_attn=attn["prev"], prev_mlp=mlp["prev"], delta_attn=attn["delta"],
            delta_mlp=mlp["delta"], trend_attn=attn["trend"], trend_mlp=mlp["trend"],
            coef_attn=attn["coef"], coef_mlp=mlp["coef"], token_threshold=threshold)
    torch.testing.assert_close(run_segment(x, segment, token_threshold=threshold), expected,
                               **tolerance(torch.float32))


@pytest.mark.parametrize("layout", ["int64-contiguous", "int32-one-block", "int64-strided"])
def test_segment_index_dtypes_and_layouts(layout, tolerance):
    options = {"int64-contiguous": dict(index_dtype=torch.int64, total_blocks=3, offset=0),
               "int32-one-block": dict(blocks=1, total_blocks=4, offset=2),
               "int64-strided": dict(index_dtype=torch.int64, total_blocks=7, offset=3)}[layout]
    _, _, segment = check_segment_case(15, (3, 5, 8), torch.float32, tolerance(torch.float32),
                                       dict(options, blocks=options.get("blocks", 3)))
    assert segment["cache"].is_contiguous() == (layout == "int64-contiguous")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_inputs_unchanged_and_output_new(dtype):
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 5, 8, generator=gen).to(dtype)
    segment = random_segment(gen, 2, 5, 8, dtype, heads=2)
    inputs = [x] + [segment[key] for key in ("gates", "cache", "generation", "delta", "trend",
                                             "coef")]
    before = [tensor.clone() for tensor in inputs]
    out = run_segment(x, segment, token_threshold=0.1)
    for tensor, saved in zip(inputs, before):
        assert torch.equal(tensor.nan_to_num(), saved.nan_to_num())
    assert out.data_ptr() not in {tensor.data_ptr() for tensor in inputs}


def test_segment_tensor_parameters_need_no_host_value():
    """On meta tensors any .item()/int() of generation, coef or threshold would raise."""
    meta = torch.device("meta")
    batch, tokens, channels, blocks = 4, 5, 6, 3
    x = torch.empty(batch, tokens, channels, device=meta, dtype=torch.bfloat16)
    out = cached_segment(
        x, torch.empty(batch, blocks, 2, channels, device=meta, dtype=x.dtype),
        torch.empty(2, blocks, 2, batch, tokens, channels, device=meta, dtype=x.dtype),
        torch.empty(blocks, 2, device=meta, dtype=torch.int64),
        delta=torch.empty(blocks, 2, 2, tokens, channels, device=meta, dtype=x.dtype),
        trend=torch.empty(blocks, 2, 1, tokens, channels, device=meta, dtype=x.dtype),
        coef=torch.empty(blocks, 2, 3, device=meta), token_threshold=torch.empty(1, device=meta))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == meta
