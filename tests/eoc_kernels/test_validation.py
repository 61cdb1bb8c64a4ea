"""Input checks of the public ops: the error type, and a message naming the argument.

One table of bad inputs, written with the branch argument base names (gate, cache, prev, delta,
trend, coef), runs against cached_branch and against both branches of cached_block.
"""

import numpy as np
import pytest
import torch

from eoc_kernels import available_backends, cached_block, cached_branch, cached_segment

B, N, C = 4, 3, 8
META = torch.device("meta")  # stands in for "another device" on a CPU-only machine
NAN, INF = float("nan"), float("inf")

OPS = {  # op name -> (function, branch-argument suffixes, positional argument names)
    "cached_branch": (cached_branch, ("",), ("x", "gate", "cache")),
    "cached_block": (cached_block, ("_attn", "_mlp"),
                     ("x", "gate_attn", "gate_mlp", "cache_attn", "cache_mlp")),
}
CASES = [(op, suffix) for op, (_, suffixes, _) in OPS.items() for suffix in suffixes]


def valid_args(op, dtype=torch.float32):
    """Every argument of op, all valid: x, the branch arguments and token_threshold."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    args = {"x": randn(B, N, C), "token_threshold": torch.tensor(0.1)}
    for suffix in OPS[op][1]:
        args |= {f"gate{suffix}": randn(B, C), f"cache{suffix}": randn(B, N, C),
                 f"prev{suffix}": randn(B, N, C), f"delta{suffix}": randn(2, N, C),
                 f"trend{suffix}": randn(B, N, C), f"coef{suffix}": (0.5, 1, -0.25)}
    return args


def call(op, args):
    fn, _, positional = OPS[op]
    args = dict(args)
    return fn(*[args.pop(name) for name in positional], **args)


# (case id, branch argument base name, how to break its valid value, expected error)
BRANCH_CASES = [
    *[(f"{name}-shape", name, lambda t: t[..., :-1], ValueError)
      for name in ("gate", "cache", "prev", "delta", "trend")],
    *[(f"{name}-float64", name, lambda t: t.double(), TypeError)
      for name in ("gate", "cache", "prev", "delta", "trend")],
    *[(f"{name}-other-device", name, lambda t: t.to(META), ValueError)
      for name in ("gate", "cache", "prev", "delta", "trend")],
    ("gate-int", "gate", lambda t: t.to(torch.int32), TypeError),
    ("cache-float16", "cache", lambda t: t.half(), TypeError),
    ("cache-numpy", "cache", lambda t: t.numpy(), TypeError),
    ("gate-missing-batch", "gate", lambda t: t[0], ValueError),
    ("delta-heads-3", "delta", lambda t: torch.zeros(3, N, C), ValueError),
    ("trend-heads-0", "trend", lambda t: torch.zeros(0, N, C), ValueError),
    ("trend-2d", "trend", lambda t: t[0], ValueError),
    ("coef-length-2", "coef", lambda c: c[:2], ValueError),
    ("coef-length-6", "coef", lambda c: [*c, 0.0, 0.0, 0.0], ValueError),
    ("coef-bool", "coef", lambda c: (True, 0.0, 0.0), TypeError),
    ("coef-str", "coef", lambda c: "0.5", TypeError),
    ("coef-tensor-entry", "coef", lambda c: (torch.tensor(0.5), 0.0, 0.0), TypeError),
    ("coef-tensor-float64", "coef", lambda c: torch.tensor(c, dtype=torch.float64), TypeError),
    ("coef-tensor-shape-1x3", "coef", lambda c: torch.tensor([c]), ValueError),
    ("coef-tensor-shape-6", "coef", lambda c: torch.tensor([*c, 0.0, 0.0, 0.0]), ValueError),
    ("coef-tensor-other-device", "coef", lambda c: torch.tensor(c, device=META), ValueError),
    ("coef-nan", "coef", lambda c: (0.5, NAN, 0.0), ValueError),
    ("coef-inf", "coef", lambda c: [INF, 0.0, 0.0], ValueError),
    ("coef-minus-inf", "coef", lambda c: (0.0, 0.0, -INF), ValueError),
    ("coef-tensor-nan", "coef", lambda c: torch.tensor([0.5, 0.0, NAN]), ValueError),
    ("coef-tensor-inf", "coef", lambda c: torch.tensor([-INF, 0.0, 0.0]), ValueError),
]
# (case id, argument name, bad value, expected error)
SHARED_CASES = [
    ("x-float64", "x", torch.zeros(B, N, C, dtype=torch.float64), TypeError),
    ("x-int", "x", torch.zeros(B, N, C, dtype=torch.int64), TypeError),
    ("x-2d", "x", torch.zeros(B * N, C), ValueError),
    ("x-list", "x", [[[0.0] * C] * N] * B, TypeError),
    ("x-numpy", "x", np.zeros((B, N, C), dtype=np.float32), TypeError),
    ("threshold-2-elements", "token_threshold", torch.tensor([0.1, 0.2]), ValueError),
    ("threshold-float64", "token_threshold", torch.tensor(0.1, dtype=torch.float64), TypeError),
    ("threshold-other-device", "token_threshold", torch.tensor(0.1, device=META), ValueError),
    ("threshold-str", "token_threshold", "0.1", TypeError),
    ("threshold-bool", "token_threshold", True, TypeError),
    ("threshold-none", "token_threshold", None, TypeError),
    ("threshold-nan", "token_threshold", NAN, ValueError),
    ("threshold-inf", "token_threshold", INF, ValueError),
    ("threshold-minus-inf", "token_threshold", -INF, ValueError),
    ("threshold-tensor-nan", "token_threshold", torch.tensor(NAN), ValueError),
    ("threshold-tensor-inf", "token_threshold", torch.tensor([INF]), ValueError),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_valid_inputs_pass(op, dtype):
    args = valid_args(op, dtype)
    assert call(op, args).shape == (B, N, C)
    args |= {"token_threshold": 0.2}
    args |= {f"coef{suffix}": torch.tensor([0.5, 1.0, -0.25]) for suffix in OPS[op][1]}
    assert call(op, args).shape == (B, N, C)


@pytest.mark.parametrize("case_id, base, breaks, error", BRANCH_CASES,
                         ids=[case[0] for case in BRANCH_CASES])
@pytest.mark.parametrize("op, suffix", CASES, ids=[f"{op}{suffix}" for op, suffix in CASES])
def test_bad_branch_argument(op, suffix, case_id, base, breaks, error):
    args = valid_args(op)
    name = base + suffix
    args[name] = breaks(args[name])
    with pytest.raises(error, match=rf"^{op}: {name} "):
        call(op, args)


@pytest.mark.parametrize("case_id, name, bad, error", SHARED_CASES,
                         ids=[case[0] for case in SHARED_CASES])
@pytest.mark.parametrize("op", OPS)
def test_bad_shared_argument(op, case_id, name, bad, error):
    args = valid_args(op) | {name: bad}
    with pytest.raises(error, match=rf"^{op}: {name} "):
        call(op, args)


def test_message_states_expected_and_given():
    args = valid_args("cached_block")
    args["gate_attn"] = args["gate_attn"][:, :-1]
    expected = "cached_block: gate_attn must have shape [B, C] = [4, 8], got [4, 7]"
    with pytest.raises(ValueError) as info:
        call("cached_block", args)
    assert str(info.value) == expected


def test_message_explains_head_count():
    args = valid_args("cached_branch") | {"delta": torch.zeros(3, N, C)}
    with pytest.raises(ValueError, match=r"delta must have shape \[H, N, C\] = \[H, 3, 8\] "
                                         r"with H dividing B = 4, got \[3, 3, 8\]"):
        call("cached_branch", args)


def test_mismatched_dtype_names_both():
    args = valid_args("cached_branch") | {"x": torch.zeros(B, N, C, dtype=torch.bfloat16)}
    with pytest.raises(TypeError, match=r"gate must have dtype torch\.bfloat16 .*got torch\.float32"):
        call("cached_branch", args)


# --- cached_segment ----------------------------------------------------------------------------

S = 2


def valid_segment_args(dtype=torch.float32, generations=2):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return {"x": randn(B, N, C), "gates": randn(B, S, 2, C),
            "cache": randn(generations, S, 2, B, N, C),
            "generation": torch.tensor([[0, 1], [1, 0]], dtype=torch.int32) % generations,
            "delta": randn(S, 2, 2, N, C), "trend": randn(S, 2, B, N, C),
            "coef": torch.randn(S, 2, 3, generator=gen), "token_threshold": 0.1}


def call_segment(args):
    args = dict(args)
    return cached_segment(args.pop("x"), args.pop("gates"), args.pop("cache"),
                          args.pop("generation"), **args)


# (case id, argument name, how to break its valid value, expected error)
SEGMENT_CASES = [
    ("x-2d", "x", lambda t: t[0], ValueError),
    ("x-float64", "x", lambda t: t.double(), TypeError),
    ("gates-3d", "gates", lambda t: t[:, 0], ValueError),
    ("gates-one-branch", "gates", lambda t: t[:, :, :1], ValueError),
    ("gates-blocks", "gates", lambda t: t[:, :1], ValueError),
    ("gates-float16", "gates", lambda t: t.half(), TypeError),
    ("gates-other-device", "gates", lambda t: t.to(META), ValueError),
    ("cache-5d", "cache", lambda t: t[0], ValueError),
    ("cache-5-generations", "cache", lambda t: torch.cat([t, t, t[:1]]), ValueError),
    ("cache-one-branch", "cache", lambda t: t[:, :, :1], ValueError),
    ("cache-batch", "cache", lambda t: t[:, :, :, :1], ValueError),
    ("cache-channels", "cache", lambda t: t[..., :-1], ValueError),
    ("cache-bfloat16", "cache", lambda t: t.bfloat16(), TypeError),
    ("cache-other-device", "cache", lambda t: t.to(META), ValueError),
    ("cache-numpy", "cache", lambda t: t.numpy(), TypeError),
    ("generation-float", "generation", lambda t: t.float(), TypeError),
    ("generation-bool", "generation", lambda t: t.bool(), TypeError),
    ("generation-int16", "generation", lambda t: t.short(), TypeError),
    ("generation-list", "generation", lambda t: t.tolist(), TypeError),
    ("generation-shape", "generation", lambda t: t[:1], ValueError),
    ("generation-flat", "generation", lambda t: t.flatten(), ValueError),
    ("generation-other-device", "generation", lambda t: t.to(META), ValueError),
    ("generation-2", "generation", lambda t: torch.tensor([[0, 1], [2, 0]], dtype=t.dtype),
     ValueError),
    ("generation-minus-1", "generation", lambda t: torch.tensor([[0, -1], [1, 0]]), ValueError),
    ("generation-int32-max", "generation", lambda t: torch.full_like(t, 2**31 - 1), ValueError),
    ("delta-per-block-heads", "delta", lambda t: t[0], ValueError),
    ("delta-heads-3", "delta", lambda t: torch.zeros(S, 2, 3, N, C), ValueError),
    ("delta-blocks", "delta", lambda t: t[:1], ValueError),
    ("trend-tokens", "trend", lambda t: t[..., :-1, :], ValueError),
    ("trend-float16", "trend", lambda t: t.half(), TypeError),
    ("trend-other-device", "trend", lambda t: t.to(META), ValueError),
    ("coef-tuple", "coef", lambda c: (0.5, 0.0, 0.0), TypeError),
    ("coef-float64", "coef", lambda c: c.double(), TypeError),
    ("coef-shape-3", "coef", lambda c: c[0, 0], ValueError),
    ("coef-blocks", "coef", lambda c: c[:1], ValueError),
    ("coef-other-device", "coef", lambda c: c.to(META), ValueError),
    ("coef-nan", "coef", lambda c: c.index_put((torch.tensor(1),), torch.tensor(NAN)),
     ValueError),
    ("coef-inf", "coef", lambda c: torch.full_like(c, -INF), ValueError),
    ("threshold-2-elements", "token_threshold", lambda t: torch.tensor([0.1, 0.2]), ValueError),
    ("threshold-str", "token_threshold", lambda t: "0.1", TypeError),
    ("threshold-nan", "token_threshold", lambda t: NAN, ValueError),
    ("threshold-tensor-inf", "token_threshold", lambda t: torch.tensor([INF]), ValueError),
]


@pytest.mark.parametrize("generations", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_segment_valid_inputs_pass(dtype, generations):
    args = valid_segment_args(dtype, generations)
    assert call_segment(args).shape == (B, N, C)
    args |= {"delta": None, "trend": None, "coef": None,
             "generation": args["generation"].long(), "token_threshold": torch.tensor([0.2])}
    assert call_segment(args).shape == (B, N, C)


@pytest.mark.parametrize("case_id, name, breaks, error", SEGMENT_CASES,
                         ids=[case[0] for case in SEGMENT_CASES])
def test_segment_bad_argument(case_id, name, breaks, error):
    args = valid_segment_args()
    args[name] = breaks(args[name])
    with pytest.raises(error, match=rf"^cached_segment: {name} "):
        call_segment(args)


def test_segment_messages_state_expected_and_given():
    args = valid_segment_args() | {"delta": torch.zeros(S, 2, 3, N, C)}
    with pytest.raises(ValueError) as info:
        call_segment(args)
    assert str(info.value) == ("cached_segment: delta must have shape [S, 2, H, N, C] = "
                               "[2, 2, H, 3, 8] with H dividing B = 4, got [2, 2, 3, 3, 8]")
    args = valid_segment_args() | {"generation": torch.zeros(3, 2, dtype=torch.int64)}
    with pytest.raises(ValueError) as info:
        call_segment(args)
    assert str(info.value) == ("cached_segment: generation must have shape [S, 2] = [2, 2], "
                               "got [3, 2]")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("generations, bad", [(2, 2), (2, -1), (1, 1)], ids=str)
def test_segment_generation_values_are_checked_on_cpu(generations, bad, backend):
    """Values outside 0..G-1 would index past the cache buffer (the reference's index_select and
    the Triton kernel both): on CPU they raise before any backend runs, naming the range."""
    if backend not in available_backends("cpu", "cached_segment"):
        pytest.skip("needs the triton backend on CPU (TRITON_INTERPRET=1)")
    args = valid_segment_args(generations=generations)
    args["generation"] = torch.zeros(S, 2, dtype=torch.int64)
    args["generation"][1, 0] = bad
    top = generations - 1
    with pytest.raises(ValueError, match=rf"^cached_segment: generation values must be in "
                                         rf"0\.\.{top} \(G = {generations}\), got {bad}"):
        call_segment(args | {"backend": backend})


def test_segment_generation_is_asserted_on_the_device_when_traced():
    """Where the values cannot be read without a host sync (CUDA, or while torch.compile traces),
    the check is a device-side assert: torch._assert_async, which raises on CPU."""
    args = valid_segment_args() | {"generation": torch.tensor([[0, 1], [1, 5]])}
    compiled = torch.compile(call_segment, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError, match=r"cached_segment: generation values must be in "
                                               r"0\.\.1 \(G = 2\)"):
            compiled(args)
        assert compiled(valid_segment_args()).shape == (B, N, C)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["coef", "token_threshold"])
def test_segment_non_finite_tensor_parameters_pass_when_traced(name):
    """Tensor coefficients and thresholds are checked for NaN/inf only where reading them costs
    no host sync or graph break: not while torch.compile traces (nor on CUDA)."""
    args = valid_segment_args() | {"token_threshold": 0.0}
    args[name] = torch.full_like(torch.as_tensor(args[name], dtype=torch.float32), NAN)
    compiled = torch.compile(call_segment, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        out = compiled(args)
    finally:
        torch._dynamo.reset()
    # A NaN coefficient reaches the output (threshold 0 keeps every correction); a NaN threshold
    # keeps none (NaN fails both `score > threshold` and `threshold <= 0`).
    assert torch.isnan(out).any() == (name == "coef")
