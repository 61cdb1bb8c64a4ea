"""Positional arguments of the eoc:: custom ops (eoc_kernels/_library.py) on small inputs, every feature
on: what test_cpp_ops.py and test_triton_ops.py give torch.library.opcheck for their kernel.

The split form (``_library.split_coef``): 5 coef_values per branch (alpha, beta1, gamma, beta2, beta3),
padded with zeros; a coef tensor is float32 [P], P in {3, 4, 5}. ``small_op_inputs`` holds the
three-coefficient cases (P = 3, G <= 2), ``history_op_inputs`` the K-history ones (issue 10: prev2 /
prev3, P = 4 and 5, zeros in the middle, cached_segment with G = 3 and 4).
"""

import torch

from .naive import random_branch, random_segment


def small_op_inputs(gen, kernel):
    """{op name: [argument tuples ending with kernel]} on [2, 5, 6] fp32 inputs, P = 3."""
    shape = (2, 5, 6)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32, heads=2)
    segment = random_segment(gen, *shape, torch.float32, blocks=2)
    threshold = torch.tensor([0.1])
    return {
        "cached_branch": [
            (x, branch["gate"], branch["cache"], branch["prev"], None, None, branch["delta"], branch["trend"],
             [0.5, -0.25, 0.75, 0.0, 0.0], None, 0.1, None, kernel),
            (x, branch["gate"], branch["cache"], None, None, None, branch["delta"], None, [0.0] * 5,
             torch.tensor([0.5, 0.0, 1.0]), 0.0, threshold, kernel)],
        "cached_block": [
            (x, branch["gate"], branch["gate"], branch["cache"], branch["prev"], branch["prev"], None,
             None, None, None, None,
             branch["delta"], branch["delta"], branch["trend"], None,
             [0.5, -0.25, 0.75, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], None,
             torch.tensor([0.1, 0.2, 0.3]), 0.1, threshold, kernel)],
        "cached_segment": [
            (x, segment["gates"], segment["cache"], segment["generation"], segment["delta"], segment["trend"],
             segment["coef"], 0.0, threshold, kernel),
            (x, segment["gates"], segment["cache"][:1], segment["generation"], None, None, None, 0.1, None,
             kernel)],
    }


def history_op_inputs(gen, kernel):
    """{op name: [argument tuples ending with kernel]} on [2, 5, 6] fp32 inputs with K-history terms:
    prev2 / prev3 with 4 and 5 coefficients (Python floats and tensors, beta2 = 0 with beta3 != 0),
    and cached_segment with G = 3 (P = 4) and G = 4 (P = 5, and P = 3 reading only C_1)."""
    shape = (2, 5, 6)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32, heads=2, terms=HISTORY_TERMS)
    ring3 = random_segment(gen, *shape, torch.float32, blocks=2, generations=3, num_coefs=4)
    ring4 = random_segment(gen, *shape, torch.float32, blocks=2, generations=4, num_coefs=5)
    threshold = torch.tensor([0.1])
    history = (branch["prev"], branch["prev2"], branch["prev3"])
    return {
        "cached_branch": [
            (x, branch["gate"], branch["cache"], *history, branch["delta"], branch["trend"],
             [0.5, -0.25, 0.75, 0.4, -0.3], None, 0.1, None, kernel),
            (x, branch["gate"], branch["cache"], *history[:2], None, None, branch["trend"], [0.0] * 5,
             torch.tensor([0.0, 0.5, 1.0, -0.5]), 0.0, threshold, kernel),
            (x, branch["gate"], branch["cache"], *history, branch["delta"], None, [0.0] * 5,
             torch.tensor([0.5, 0.2, 0.0, 0.0, 0.6]), 0.0, None, kernel)],
        "cached_block": [
            (x, branch["gate"], branch["gate"], branch["cache"], branch["prev"], branch["prev"], branch["cache"],
             branch["prev2"], None, branch["prev3"], None,
             branch["delta"], branch["delta"], branch["trend"], None,
             [0.5, -0.25, 0.75, 0.0, 0.3, 0.0, 1.0, 0.0, 0.5, 0.0], None,
             torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.1, threshold, kernel)],
        "cached_segment": [
            (x, ring3["gates"], ring3["cache"], ring3["generation"], ring3["delta"], ring3["trend"],
             ring3["coef"], 0.0, threshold, kernel),
            (x, ring4["gates"], ring4["cache"], ring4["generation"], ring4["delta"], None,
             ring4["coef"], 0.1, None, kernel),
            (x, ring4["gates"], ring4["cache"], ring4["generation"], None, ring4["trend"],
             ring4["coef"][..., :3].contiguous(), 0.0, threshold, kernel)],
    }


HISTORY_TERMS = ("delta", "prev", "prev2", "prev3", "trend")


def requiring_grad(args):
    """args with every float tensor replaced by a leaf copy that requires grad."""
    return tuple(arg.detach().clone().requires_grad_() if isinstance(arg, torch.Tensor) and arg.is_floating_point()
                 else arg for arg in args)
