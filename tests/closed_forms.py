"""Shared by the loss tests: float64 for closed-form comparisons, and random log-probability tensors."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Closed forms are compared in float64; the global default is restored for other modules."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rand_lp(*shape, seed=0, scale=2.0):
    """Log-probabilities (softmax over the last dim) of seeded normal logits times `scale`."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * scale, dim=-1)
