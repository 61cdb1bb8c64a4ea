"""A tiny DiT whose weights are all random, for the DiT integration tests.

The DiT init zeroes every adaLN layer, which makes each block the identity; caching tests need
blocks that do something, so every weight is re-drawn (small enough that sampling stays finite).
"""

import torch

from eoc_dit import DiT


def make_tiny_dit(depth: int = 3, learn_sigma: bool = False, seed: int = 0, hidden_size: int = 32) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=hidden_size, depth=depth, num_heads=2,
                num_classes=4, learn_sigma=learn_sigma)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() >= 2:
                p.normal_(0.0, 0.15 if "adaLN" in name else 0.3 / p.shape[-1] ** 0.5 * 2)
            elif p.requires_grad:
                p.normal_(0.0, 0.05)
    return model.eval()
