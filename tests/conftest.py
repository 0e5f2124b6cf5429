"""Shared test set-up: Triton runs compiled on a GPU, and under its interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton (via flashkat)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere gives inf)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def random_coefficients(groups_n: int, groups_d: int, order: tuple[int, int], device=DEVICE, seed=None):
    """Coefficients of moderate size (fresh each call unless seeded)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    m, n = order
    a = torch.randn(groups_n, m + 1, generator=gen) / (1 + torch.arange(m + 1))
    b = torch.randn(groups_d, n, generator=gen) / (1 + torch.arange(n))
    return a.to(device), b.to(device)
