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


def coefficient_gradient_scale(g, x, a, b, dim=-1):
    """Sum over elements of |each coefficient-gradient term| (float64, from SPEC.md's formulas).

    Rounding errors of a sum scale with the sum of its terms' magnitudes, not with the sum itself
    (which cancels for random grad_output), so coefficient gradients are checked against this.
    """
    x, g = x.double().movedim(dim, -1), g.double().movedim(dim, -1)
    D, groups_a, groups_b = x.shape[-1], a.shape[0], b.shape[0]
    a = a.double().repeat_interleave(D // groups_a, 0)
    b = b.double().repeat_interleave(D // groups_b, 0)
    ax = x.abs()
    p = sum(a[:, i] * x**i for i in range(a.shape[1]))
    q = 1 + sum(b[:, j].abs() * ax ** (j + 1) for j in range(b.shape[1]))
    weight = (g / q).abs().reshape(-1, D)
    f = (p / q).abs().reshape(-1, D)
    xs = ax.reshape(-1, D)
    sa = torch.stack([(weight * xs**i).sum(0) for i in range(a.shape[1])], -1)
    sa = sa.reshape(groups_a, D // groups_a, -1).sum(1)
    if not b.shape[1]:
        return sa, None
    sb = torch.stack([(weight * f * xs ** (j + 1)).sum(0) for j in range(b.shape[1])], -1)
    return sa, sb.reshape(groups_b, D // groups_b, -1).sum(1)


def check_coefficient_grads(grads, expected, scales, tol):
    """|grad - expected| <= tol * (sum of the terms' magnitudes), elementwise, for each pair."""
    for grad, ref, scale in zip(grads, expected, scales):
        if scale is not None:
            excess = (grad.double().cpu() - ref.cpu()).abs() - tol * scale.reshape(ref.shape).cpu()
            assert torch.isfinite(grad).all() and (excess <= 0).all(), excess.max().item()
