"""The reference against the formulas of SPEC.md, written here a second way (explicit powers)."""

import pytest
import torch

from flashkat import reference
from conftest import random_coefficients, rel_l2


def formula(x, a, b, dim):
    """F(x) = sum a_i x^i / (1 + sum |b_j| |x|^(j+1)), per channel, in float64, with plain autograd."""
    x = x.movedim(dim, -1)
    D = x.shape[-1]
    a = a.repeat_interleave(D // a.shape[0], 0)
    b = b.repeat_interleave(D // b.shape[0], 0)
    powers = torch.stack([x**i for i in range(a.shape[1])], -1)
    p = (powers * a).sum(-1)
    q = 1 + sum(b[:, j].abs() * x.abs() ** (j + 1) for j in range(b.shape[1]))
    return (p / q).movedim(-1, dim)


@pytest.mark.parametrize("shape,dim,groups,order", [
    ((4, 7, 16), -1, (1, 8), (5, 4)),
    ((3, 12, 5, 2), 1, (4, 12), (3, 2)),
    ((24,), 0, (24, 2), (7, 6)),
    ((6, 10), -1, (5, 1), (4, 0)),
])  # fmt: skip
def test_forward_and_backward_match_formula(shape, dim, groups, order):
    x = torch.randn(shape, dtype=torch.float64)
    a, b = (t.double() for t in random_coefficients(*groups, order, device="cpu"))
    g = torch.randn(shape, dtype=torch.float64)
    # autograd of the plain formula is right wherever x != 0 and b != 0 (sign(0) is not exercised)
    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
    expected = formula(xr, ar, br, dim)
    expected.backward(g)
    assert rel_l2(reference.forward(x, a, b, dim), expected.detach()) < 1e-14
    dx, da, db = reference.backward(g, x, a, b, dim)
    assert rel_l2(dx, xr.grad) < 1e-12
    assert rel_l2(da, ar.grad) < 1e-12
    if order[1]:
        assert rel_l2(db, br.grad) < 1e-12


def test_sign_of_zero_is_plus_one():
    """With B = 0 (KAT's identity init) the denominator still gets -F/Q * |x|^j: it can train."""
    x = torch.randn(5, 8, dtype=torch.float64)
    x[0, 0] = 0.0
    a = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.zeros(8, 4, dtype=torch.float64)
    g = torch.randn_like(x)
    dx, da, db = reference.backward(g, x, a, b)
    f = x  # identity, Q = 1
    expected = torch.stack([(-g * f * x.abs() ** (j + 1)) for j in range(4)], -1).sum(0)  # per channel
    assert torch.allclose(db, expected, rtol=1e-12, atol=1e-14)
    assert (db != 0).all()
    assert torch.allclose(dx, g)  # d/dx of the identity; sign(0) = +1 at x = 0 is harmless here


def test_gradcheck_float64():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    a, b = (t.double().requires_grad_() for t in random_coefficients(2, 4, (5, 4), device="cpu"))
    assert torch.autograd.gradcheck(lambda *t: reference.group_rational(*t, -1), (x, a, b))


def test_low_precision_inputs_compute_in_float64():
    x = torch.randn(4, 16).to(torch.bfloat16)
    a, b = random_coefficients(1, 8, (5, 4), device="cpu")
    y = reference.forward(x, a, b)
    assert y.dtype == torch.bfloat16
    assert rel_l2(y, formula(x.double(), a.double(), b.double(), -1)) < 4e-3
