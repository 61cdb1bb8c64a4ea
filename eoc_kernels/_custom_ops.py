"""What the compiled backends' custom ops share (docs/DESIGN.md §3.4): the split argument forms of
their schemas and a backward that recomputes the eager reference.

A custom op's schema cannot take "a float or a tensor", so ``coef`` and ``token_threshold`` travel as
a (values, tensor-or-None) pair: ``split_coef`` / ``split_threshold`` make it, ``coef_of`` /
``threshold_of`` undo it. The kernels are forward-only; ``register_reference_autograd`` gives an op
the gradients of ``eoc_kernels.reference``, so every backend differentiates as the reference does.
"""

import torch


def split_coef(coef):
    """(coef_values: list of 3 floats, coef_tensor or None) for the custom op schema."""
    if isinstance(coef, torch.Tensor):
        return [0.0, 0.0, 0.0], coef
    return [float(value) for value in coef], None


def split_threshold(token_threshold):
    """(threshold_value: float, threshold_tensor or None) for the custom op schema."""
    if isinstance(token_threshold, torch.Tensor):
        return 0.0, token_threshold
    return float(token_threshold), None


def register_reference_autograd(op, reference_fn):
    """Gives custom op a backward that differentiates reference_fn(*the op's inputs).

    reference_fn takes the op's positional inputs and returns the eager reference output; the
    backward recomputes it on the saved inputs under torch.enable_grad() (memory and time of one
    eager forward) and returns torch.autograd.grad of it for the inputs that need a gradient.
    """
    def setup_context(ctx, inputs, output):
        ctx.is_tensor = [isinstance(value, torch.Tensor) for value in inputs]
        ctx.others = [None if is_tensor else value
                      for value, is_tensor in zip(inputs, ctx.is_tensor)]
        ctx.save_for_backward(*[value for value, is_tensor in zip(inputs, ctx.is_tensor)
                                if is_tensor])

    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if is_tensor else other
                  for is_tensor, other in zip(ctx.is_tensor, ctx.others)]
        needs_grad = ctx.needs_input_grad
        with torch.enable_grad():
            inputs = [value.detach().requires_grad_() if needs else value
                      for value, needs in zip(inputs, needs_grad)]
            out = reference_fn(*inputs)
            if not out.requires_grad:  # only the threshold needs a gradient: it has none
                return (None,) * len(inputs)
            wanted = [value for value, needs in zip(inputs, needs_grad) if needs]
            grads = iter(torch.autograd.grad(out, wanted, grad_output, allow_unused=True))
        return tuple(next(grads) if needs else None for needs in needs_grad)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def coef_of(coef_values, coef_tensor):
    """The public op's coef from the custom op's split form (inverse of split_coef)."""
    return coef_tensor if coef_tensor is not None else tuple(coef_values)


def threshold_of(threshold_value, threshold_tensor):
    """The public op's token_threshold from its split form (inverse of split_threshold)."""
    return threshold_tensor if threshold_tensor is not None else threshold_value
