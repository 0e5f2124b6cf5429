"""The baseline backward designs ("atomic": KAT's, "blocked": FlashKAT's) against the float64
reference: compiled on a GPU, under the Triton interpreter on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashkat
from flashkat import reference
from flashkat.ops import baselines
from flashkat.ops import group_rational as op
from conftest import DEVICE, check_coefficient_grads, coefficient_gradient_scale, random_coefficients, rel_l2, requires_cuda

IMPLS = {"atomic": baselines.atomic_backward, "blocked": baselines.blocked_backward}
# dx: one rounding in the storage dtype. Coefficient gradients: float32 sums of many terms in
# whatever order (atomics); their rounding error scales with the sum of the terms' magnitudes
# (random grad_output makes the sums themselves cancel), so they are bounded relative to that.
DX_TOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 8e-3, torch.float16: 1e-3}
COEF_TOL = 1e-5
COEF_SCALE_TOL = 1e-6


def check(impl, x, a, b, dim=-1):
    g = torch.randn(x.shape, device=x.device).to(x.dtype)
    dx, da, db = IMPLS[impl](g, x, a, b, dim)
    rdx, rda, rdb = reference.backward(g.double(), x.double(), a.double(), b.double(), dim)
    assert dx.dtype == x.dtype and da.dtype == a.dtype and db.dtype == b.dtype
    assert dx.shape == x.shape and da.shape == a.shape and db.shape == b.shape
    assert rel_l2(dx, rdx) < DX_TOL[x.dtype], rel_l2(dx, rdx)
    tol = 1e-13 if x.dtype == torch.float64 and a.dtype == torch.float64 else COEF_SCALE_TOL
    check_coefficient_grads((da, db), (rda, rdb), coefficient_gradient_scale(g, x, a, b, dim), tol)
    return dx, da, db


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups", [(1, 8), (4, 4), (48, 48), (8, 1), (2, 16), (3, 6)])
def test_group_settings(impl, groups):
    """Shared numerator, equal groups, per-channel, and groups narrower than a tile."""
    x = torch.randn(5, 13, 48, device=DEVICE)
    check(impl, x, *random_coefficients(*groups, (5, 4)))


@pytest.mark.parametrize("impl", IMPLS)
def test_tails_and_strided_input(impl):
    """200 channels in 8 groups of 25 (tiles padded), rows not a tile multiple; a strided slice."""
    x = torch.randn(3, 37, 200, device=DEVICE)
    check(impl, x, *random_coefficients(1, 8, (5, 4)))
    check(impl, x[:, :, :120], *random_coefficients(5, 3, (5, 4)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(impl, dtype):
    x = torch.randn(2, 21, 64, device=DEVICE).to(dtype)
    a, b = random_coefficients(1, 8, (5, 4))
    if dtype == torch.float64:
        a, b = a.double(), b.double()
    check(impl, x, a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", [(3, 2), (4, 0), (7, 6)])
def test_orders(impl, order):
    x = torch.randn(3, 11, 32, device=DEVICE)
    check(impl, x, *random_coefficients(2, 4, order))


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_first(impl):
    """[B, C, H, W] with dim=1: the channel stride is H*W (inner > 1)."""
    x = torch.randn(2, 16, 5, 3, device=DEVICE)
    check(impl, x, *random_coefficients(1, 4, (5, 4)), dim=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_sign_of_zero_denominator_gets_gradient(impl):
    """B = 0 (KAT's identity init) must still receive a gradient: sign(0) = +1."""
    x = torch.randn(4, 9, 16, device=DEVICE)
    a = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    b = torch.zeros(2, 4, device=DEVICE)
    g = torch.ones_like(x)
    _, _, db = IMPLS[impl](g, x, a, b)
    expected = reference.backward(g.double(), x.double(), a.double(), b.double())[2]
    assert (db != 0).all()
    assert rel_l2(db, expected) < COEF_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_calls_do_not_accumulate_and_work_keeps_results(impl):
    """Buffers are zeroed on every call; repeating the math (work > 1) changes no value."""
    x, g = torch.randn(3, 7, 48, device=DEVICE), torch.randn(3, 7, 48, device=DEVICE)
    a, b = random_coefficients(1, 8, (5, 4))
    first = IMPLS[impl](g, x, a, b)
    second = IMPLS[impl](g, x, a, b)
    repeated = IMPLS[impl](g, x, a, b, work=3)
    scales = coefficient_gradient_scale(g, x, a, b)
    for other in (second, repeated):
        torch.testing.assert_close(first[0], other[0], rtol=1e-6, atol=1e-6)  # dx: no atomics
        # atomics add in any order: equal up to rounding, not bitwise; accumulation would double them
        check_coefficient_grads(other[1:], [t.double() for t in first[1:]], scales, 2 * COEF_SCALE_TOL)


def test_registered_and_selectable():
    assert op.BACKWARDS["atomic"] is baselines.atomic_backward
    assert op.BACKWARDS["blocked"] is baselines.blocked_backward
    assert set(baselines.IMPLEMENTATIONS) == {"flashkat", "blocked", "atomic"}
    x = torch.randn(4, 8, 32, device=DEVICE, requires_grad=True)
    a, b = (t.requires_grad_() for t in random_coefficients(1, 8, (5, 4)))
    grads = {}
    for impl in ("flashkat", "blocked", "atomic"):
        flashkat.group_rational(x, a, b, impl=impl).square().sum().backward()
        grads[impl] = [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
    for impl in ("blocked", "atomic"):
        for got, want in zip(grads[impl], grads["flashkat"]):
            assert rel_l2(got, want) < 1e-5


def test_import_has_no_cycle():
    """Importing the baselines first (before flashkat's op module) works and registers them."""
    code = ("import flashkat.ops.baselines as b; from flashkat.ops import group_rational as op; "
            "assert op.BACKWARDS['atomic'] is b.atomic_backward")  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_kat_shape_on_gpu(impl):
    """KAT's layer at a ViT-sized grid, compiled, incl. the bf16 storage of real training."""
    x = torch.randn(16, 197, 768, device="cuda")
    check(impl, x, *random_coefficients(1, 8, (5, 4)))
    check(impl, x.bfloat16(), *random_coefficients(1, 8, (5, 4)))
