"""Positional arguments of the eoc:: custom ops (eoc_kernels/_library.py) on small inputs, every feature
on: what test_cpp_ops.py and test_triton_ops.py give torch.library.opcheck for their kernel."""

import torch

from .naive import random_branch, random_segment


def small_op_inputs(gen, kernel):
    """{op name: [argument tuples ending with kernel]} on [2, 5, 6] fp32 inputs."""
    shape = (2, 5, 6)
    x = torch.randn(shape, generator=gen)
    branch = random_branch(gen, *shape, torch.float32, heads=2)
    segment = random_segment(gen, *shape, torch.float32, blocks=2)
    threshold = torch.tensor([0.1])
    return {
        "cached_branch": [
            (x, branch["gate"], branch["cache"], branch["prev"], branch["delta"], branch["trend"],
             [0.5, -0.25, 0.75], None, 0.1, None, kernel),
            (x, branch["gate"], branch["cache"], None, branch["delta"], None, [0.0] * 3,
             torch.tensor([0.5, 0.0, 1.0]), 0.0, threshold, kernel)],
        "cached_block": [
            (x, branch["gate"], branch["gate"], branch["cache"], branch["prev"], branch["prev"], None,
             branch["delta"], branch["delta"], branch["trend"], None, [0.5, -0.25, 0.75, 0.0, 1.0, 0.0], None,
             torch.tensor([0.1, 0.2, 0.3]), 0.1, threshold, kernel)],
        "cached_segment": [
            (x, segment["gates"], segment["cache"], segment["generation"], segment["delta"], segment["trend"],
             segment["coef"], 0.0, threshold, kernel),
            (x, segment["gates"], segment["cache"][:1], segment["generation"], None, None, None, 0.1, None,
             kernel)],
    }


def requiring_grad(args):
    """args with every float tensor replaced by a leaf copy that requires grad."""
    return tuple(arg.detach().clone().requires_grad_() if isinstance(arg, torch.Tensor) and arg.is_floating_point()
                 else arg for arg in args)
