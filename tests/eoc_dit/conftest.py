"""Fixtures of the DiT integration tests."""

import pytest
import torch

from tests.eoc_dit.tiny import make_tiny_dit


@pytest.fixture
def tiny_dit():
    return make_tiny_dit()


@pytest.fixture
def sample_inputs():
    """(noise [3, 1, 8, 8], labels [3]) — an odd batch."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=generator), torch.tensor([0, 3, 1])
