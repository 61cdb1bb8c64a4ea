"""Gradients through the "triton" backend equal those through the eager reference ("torch").

Backends must not differ silently: the reference is differentiable, so each eoc:: custom op has a
backward (registered with torch.library.register_autograd) that recomputes the reference. Every
differentiable input requires grad here: x, gates, caches, the history (prev, prev2, prev3), deltas,
trends and tensor coefficients (3 to 5 of them); the token threshold splits the tokens, so the keep
mask matters (it is piecewise constant: no gradient flows through the judgment, in either backend).
Runs on CPU under the interpreter, or on CUDA with the compiled kernels.
"""

import pytest
import torch

import eoc_kernels

from .naive import random_branch, random_segment, segment_threshold, splitting_threshold
from .triton_setup import DEVICE, NEEDS_TRITON_DEVICE, poisoned_outputs

pytestmark = NEEDS_TRITON_DEVICE

BRANCH_KEYS = ("gate", "cache", "prev", "delta", "trend", "coef")
HISTORY_KEYS = ("prev2", "prev3")


def leaves(tensors):
    """Fresh leaf tensors on DEVICE that require grad (float ones), same strides as given."""
    out = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            value = value.to(DEVICE).detach()
            if value.is_floating_point():
                value.requires_grad_()
        out[name] = value
    return out


def gradients(op, args, kwargs, weight, backend):
    """(output, {name: d(sum(weight ⊙ output)) / d(name)}) for every input requiring grad."""
    out = getattr(eoc_kernels, op)(*args.values(), **kwargs, backend=backend)
    inputs = {name: value for name, value in (args | kwargs).items()
              if isinstance(value, torch.Tensor) and value.requires_grad}
    grads = torch.autograd.grad(out, list(inputs.values()), weight, allow_unused=True)
    return out, dict(zip(inputs, grads))


def assert_same_gradients(op, args, kwargs, tol):
    """The triton backend's output and gradients against the reference's."""
    gen = torch.Generator().manual_seed(50)
    weight = torch.randn(args["x"].shape, generator=gen).to(args["x"].dtype).to(DEVICE)
    expected_out, expected = gradients(op, args, kwargs, weight, "torch")
    with poisoned_outputs() as buffers:
        out, grads = gradients(op, args, kwargs, weight, "triton")
    assert len(buffers) == 1  # the forward ran the kernel
    assert out.requires_grad
    torch.testing.assert_close(out, expected_out, **tol)
    assert expected.keys() == grads.keys()
    for name, grad in grads.items():
        if expected[name] is None:  # e.g. the threshold: only the piecewise-constant mask
            assert grad is None, name
            continue
        assert grad is not None, name
        assert grad.dtype == expected[name].dtype and grad.shape == expected[name].shape
        torch.testing.assert_close(grad, expected[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def as_coef(form, values):
    return tuple(values) if form == "float" else torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_branch_gradients_match_reference(dtype, coef_form, tolerance):
    gen = torch.Generator().manual_seed(51)
    shape = (2, 5, 37)
    branch = random_branch(gen, *shape, dtype, heads=2, coef=as_coef(coef_form, (0.8, 0.0, -0.5)))
    threshold = splitting_threshold([branch])
    x = torch.randn(shape, generator=gen).to(dtype)
    args = leaves({"x": x, "gate": branch["gate"], "cache": branch["cache"]})
    kwargs = leaves({key: branch[key] for key in BRANCH_KEYS[2:]}
                    | {"token_threshold": torch.tensor(threshold)})
    assert_same_gradients("cached_branch", args, kwargs, tolerance(dtype))


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_gradients_match_reference(dtype, coef_form, tolerance):
    gen = torch.Generator().manual_seed(52)
    shape = (2, 5, 37)
    attn = random_branch(gen, *shape, dtype, heads=1, coef=as_coef(coef_form, (0.8, 0.6, -0.5)))
    mlp = random_branch(gen, *shape, dtype, heads=2, coef=as_coef(coef_form, (0.4, 1.0, 0.9)))
    threshold = splitting_threshold([attn, mlp])
    x = torch.randn(shape, generator=gen).to(dtype)
    args = leaves({"x": x, "gate_attn": attn["gate"], "gate_mlp": mlp["gate"],
                   "cache_attn": attn["cache"], "cache_mlp": mlp["cache"]})
    kwargs = leaves({f"{key}_{name}": branch[key] for name, branch in (("attn", attn),
                                                                      ("mlp", mlp))
                     for key in BRANCH_KEYS[2:]} | {"token_threshold": threshold})
    assert_same_gradients("cached_block", args, kwargs, tolerance(dtype))


@pytest.mark.parametrize("coef", ["tensor", None])
@pytest.mark.parametrize("generations", [1, 2], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segment_gradients_match_reference(dtype, generations, coef, tolerance):
    # Strided cache and gate views (random_segment), random coefficients with some zeros.
    gen = torch.Generator().manual_seed(53)
    shape = (2, 5, 37)
    segment = random_segment(gen, *shape, dtype, blocks=2, generations=generations, heads=2,
                             coef="random" if coef else None)
    threshold = segment_threshold(segment) if coef else 0.3
    x = torch.randn(shape, generator=gen).to(dtype)
    args = leaves({"x": x, "gates": segment["gates"], "cache": segment["cache"],
                   "generation": segment["generation"]})
    kwargs = leaves({key: segment[key] for key in ("delta", "trend", "coef")}
                    | {"token_threshold": threshold})
    assert_same_gradients("cached_segment", args, kwargs, tolerance(dtype))


@pytest.mark.parametrize("coef_form", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_history_gradients_match_reference(dtype, coef_form, tolerance):
    """K-history: cached_branch with C_1..C_3 and 5 coefficients (beta2 = 0: C_2 still gets the gradient of
    beta3's term), cached_block with a 4-coefficient attention branch."""
    gen = torch.Generator().manual_seed(55)
    shape = (2, 5, 37)
    terms = ("delta", "prev", "trend", "prev2", "prev3")
    branch = random_branch(gen, *shape, dtype, heads=2, terms=terms,
                           coef=as_coef(coef_form, (0.8, 0.6, -0.5, 0.0, 0.7)))
    threshold = splitting_threshold([branch])
    x = torch.randn(shape, generator=gen).to(dtype)
    args = leaves({"x": x, "gate": branch["gate"], "cache": branch["cache"]})
    kwargs = leaves({key: branch[key] for key in BRANCH_KEYS[2:] + HISTORY_KEYS}
                    | {"token_threshold": torch.tensor(threshold)})
    assert_same_gradients("cached_branch", args, kwargs, tolerance(dtype))

    mlp = random_branch(gen, *shape, dtype, coef=as_coef(coef_form, (0.4, 1.0, 0.9)))
    args = leaves({"x": x, "gate_attn": branch["gate"], "gate_mlp": mlp["gate"],
                   "cache_attn": branch["cache"], "cache_mlp": mlp["cache"]})
    attn = dict(branch, coef=as_coef(coef_form, (0.8, 0.6, -0.5, 0.5)), prev3=None)
    kwargs = leaves({f"{key}_{name}": source[key] for name, source in (("attn", attn), ("mlp", mlp))
                     for key in BRANCH_KEYS[2:] + HISTORY_KEYS} | {"token_threshold": threshold})
    assert_same_gradients("cached_block", args, kwargs, tolerance(dtype))


@pytest.mark.parametrize("generations, num_coefs", [(3, 4), (4, 5)], ids=["G3-P4", "G4-P5"])
def test_segment_ring_gradients_match_reference(generations, num_coefs, tolerance):
    gen = torch.Generator().manual_seed(56)
    shape = (2, 5, 37)
    segment = random_segment(gen, *shape, torch.float32, blocks=2, generations=generations, heads=2,
                             num_coefs=num_coefs)
    threshold = segment_threshold(segment)
    x = torch.randn(shape, generator=gen)
    args = leaves({"x": x, "gates": segment["gates"], "cache": segment["cache"],
                   "generation": segment["generation"]})
    kwargs = leaves({key: segment[key] for key in ("delta", "trend", "coef")}
                    | {"token_threshold": threshold})
    assert_same_gradients("cached_segment", args, kwargs, tolerance(torch.float32))


def test_gradients_flow_through_strided_and_expanded_inputs(tolerance):
    """A leaf seen through an expanded (stride-0) or sliced view gets its summed gradient."""
    gen = torch.Generator().manual_seed(54)
    batch, tokens, channels = 2, 5, 37
    base = leaves({"delta": torch.randn(1, tokens, channels, generator=gen),
                   "cache": torch.randn(batch, tokens, 2 * channels, generator=gen),
                   "x": torch.randn(tokens, batch, channels, generator=gen)})
    args = {"x": base["x"].transpose(0, 1), "gate": leaves({"g": torch.randn(batch, channels,
                                                                             generator=gen)})["g"],
            "cache": base["cache"][..., ::2]}
    kwargs = {"delta": base["delta"].expand(2, tokens, channels), "coef": (0.5, 0.0, 0.0)}
    weight = torch.randn(batch, tokens, channels, generator=gen).to(DEVICE)
    expected = torch.autograd.grad(eoc_kernels.cached_branch(*args.values(), **kwargs,
                                                             backend="torch"),
                                   list(base.values()), weight)
    grads = torch.autograd.grad(eoc_kernels.cached_branch(*args.values(), **kwargs,
                                                          backend="triton"),
                                list(base.values()), weight)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, **tolerance(torch.float32))
