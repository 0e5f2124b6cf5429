"""The fused LayerNorm + group-rational op: Triton kernels (compiled on a GPU, interpreted on the
CPU) and its torch.library operators, against a float64 reference on fresh random inputs."""

import pytest
import torch

from flashkat import reference
from flashkat.ops import group_rational as gr
from flashkat.ops import layer_norm_group_rational as op
from conftest import DEVICE, check_coefficient_grads, coefficient_gradient_scale, random_coefficients, rel_l2, requires_cuda

# Outputs stored in each dtype: one rounding plus float32 arithmetic. Gradients that are sums over
# rows must be within SUM_TOL of the sum of their terms' magnitudes. For the LayerNorm's weight and
# bias the terms are du (times xhat), and du = g (P'Q - P Q')/Q^2 cancels where F is flat: its
# float32 rounding scales with |g| (|P'| + |F Q'|) / Q, not with |du| (seen: with |du| as the
# scale, 1 seed in ~300 failed by 8x; with this one the worst of 400 seeds is 0.3 of SUM_TOL).
OUT_TOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 8e-3, torch.float16: 1e-3}
SUM_TOL = 1e-6


def reference_value(x, weight, bias, a, b, eps):
    """F(LayerNorm(x)) in float64, the LayerNorm written out (biased variance, as torch's)."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    xhat = (x - mean) / ((x - mean).square().mean(-1, keepdim=True) + eps).sqrt()
    u = xhat * weight.double() + bias.double()
    return reference.group_rational(u, a.double(), b.double()), u, xhat


def reference_grads(g, x, weight, bias, a, b, eps):
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias, a, b)]
    y, u, xhat = reference_value(*inputs, eps)
    grads = torch.autograd.grad(y, inputs, g.double())
    return grads, u.detach(), xhat.detach()


def du_magnitudes(g, u, a, b):
    """|g| (|P'(u)| + |F(u) Q'(u)|) / Q(u) per element, float64: the scale of du's rounding."""
    D = u.shape[-1]
    a, b = a.double().repeat_interleave(D // a.shape[0], 0), b.double().repeat_interleave(D // b.shape[0], 0)
    au = u.abs()
    p = sum(a[:, i] * u**i for i in range(a.shape[1]))
    dp = sum(i * a[:, i] * u ** (i - 1) for i in range(1, a.shape[1]))
    q = 1 + sum(b[:, j].abs() * au ** (j + 1) for j in range(b.shape[1]))
    dq = sum((j + 1) * b[:, j].abs() * au**j for j in range(b.shape[1]))
    return g.double().abs() * (dp.abs() + (p / q).abs() * dq) / q


def affine_params(D, device=DEVICE, scale=0.5):
    return (1 + scale * torch.randn(D)).to(device), (0.1 * torch.randn(D)).to(device)


def check_kernels(x, weight, bias, a, b, eps=1e-6, out_dtype=None):
    """Run the Triton forward and backward and compare every output with the reference."""
    out_dtype = out_dtype or x.dtype
    g = torch.randn(x.shape, device=x.device).to(out_dtype)
    y, mean, rstd = op.triton_forward(x, weight, bias, a, b, eps, out_dtype)
    grads = op.triton_backward(g, x, weight, bias, a, b, mean, rstd, eps)
    ry, _, _ = reference_value(x, weight, bias, a, b, eps)
    (rdx, rdw, rdb, rda, rdbb), u, xhat = reference_grads(g, x, weight, bias, a, b, eps)
    dx, dw, dbias, da, db = grads
    assert y.dtype == out_dtype and y.shape == x.shape and dx.dtype == x.dtype and dx.shape == x.shape
    for grad, t in zip(grads[1:], (weight, bias, a, b)):
        assert grad.dtype == t.dtype and grad.shape == t.shape
    assert rel_l2(y, ry) < OUT_TOL[out_dtype], rel_l2(y, ry)
    assert rel_l2(dx, rdx) < 4 * OUT_TOL[x.dtype], rel_l2(dx, rdx)
    D = x.shape[-1]
    magnitudes = du_magnitudes(g, u, a, b).reshape(-1, D)
    scales = ((magnitudes * xhat.reshape(-1, D).abs()).sum(0), magnitudes.sum(0))
    check_coefficient_grads((dw, dbias), (rdw, rdb), scales, SUM_TOL)
    check_coefficient_grads((da, db), (rda, rdbb), coefficient_gradient_scale(g, u, a, b), SUM_TOL)
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    x = (2 * torch.randn(3, 37, 96, device=DEVICE) + 0.5).to(dtype)
    check_kernels(x, *affine_params(96), *random_coefficients(1, 8, (5, 4)))


@pytest.mark.parametrize("D, groups", [(24, (1, 8)), (48, (4, 4)), (100, (1, 4)), (192, (2, 16)), (40, (8, 8))])
def test_widths_and_groups(D, groups):
    """Rows narrower than their power-of-two tile, shared and per-group numerators."""
    x = torch.randn(29, D, device=DEVICE)
    check_kernels(x, *affine_params(D), *random_coefficients(*groups, (5, 4)))


@pytest.mark.parametrize("order", [(3, 2), (4, 0), (7, 6)])
def test_orders(order):
    check_kernels(torch.randn(4, 11, 32, device=DEVICE), *affine_params(32), *random_coefficients(1, 4, order))


def test_out_dtype_and_float32_stats():
    x = torch.randn(5, 7, 64, device=DEVICE)
    check_kernels(x, *affine_params(64), *random_coefficients(1, 8, (5, 4)), out_dtype=torch.bfloat16)
    _, mean, rstd = op.triton_forward(x, *affine_params(64), *random_coefficients(1, 8, (5, 4)), 1e-5)
    var, want_mean = torch.var_mean(x.double().reshape(-1, 64), dim=-1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (35,)
    assert rel_l2(mean, want_mean) < 1e-6 and rel_l2(rstd, (var + 1e-5).rsqrt()) < 1e-6


def test_backward_is_bitwise_deterministic():
    x = torch.randn(8, 50, 96, device=DEVICE)
    g = torch.randn_like(x)
    args = (x, *affine_params(96), *random_coefficients(1, 8, (5, 4)))
    _, mean, rstd = op.triton_forward(*args)
    first = op.triton_backward(g, *args, mean, rstd)
    for t0, t1 in zip(first, op.triton_backward(g, *args, mean, rstd)):
        assert torch.equal(t0, t1)


def test_empty_tensors():
    weight, bias = affine_params(32)
    a, b = random_coefficients(1, 8, (5, 4))
    x = torch.randn(0, 32, device=DEVICE)
    y, mean, rstd = op.triton_forward(x, weight, bias, a, b)
    assert y.shape == x.shape and mean.shape == (0,)
    dx, dw, dbias, da, db = op.triton_backward(x, x, weight, bias, a, b, mean, rstd)
    assert dx.shape == x.shape and not dw.any() and not dbias.any() and not da.any() and not db.any()


def test_huge_weights_take_the_float64_path():
    """LayerNorm weights of 1e7 push |u| past the float32 rational's safe limit: the programs that
    meet them redo their rows in float64, and the results stay finite and accurate."""
    D = 64
    x = torch.randn(40, D, device=DEVICE)
    weight, bias = affine_params(D)
    weight[5] = 1e7
    a, b = random_coefficients(1, 8, (5, 4))
    assert weight.abs().max() > gr._safe_limit(5, 4)
    check_kernels(x, weight, bias, a, b)


def test_64_bit_indexing_path(monkeypatch):
    monkeypatch.setattr(gr, "_INDEX_64_FROM", 0)
    op._config.cache_clear()
    try:
        check_kernels(torch.randn(3, 5, 48, device=DEVICE), *affine_params(48), *random_coefficients(1, 8, (5, 4)))
    finally:
        op._config.cache_clear()


# ---------------------------------------------------------------------------------------------
# The operators and the public function
# ---------------------------------------------------------------------------------------------


def test_public_function_matches_reference_and_differentiates():
    x = torch.randn(4, 9, 32, device=DEVICE, requires_grad=True)
    params = [t.requires_grad_() for t in (*affine_params(32), *random_coefficients(1, 8, (5, 4)))]
    y = op.layer_norm_group_rational(x, *params, eps=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ry, _, _ = reference_value(x.detach(), *[p.detach() for p in params], 1e-5)
    want, _, _ = reference_grads(g, x, *params, 1e-5)
    assert rel_l2(y.detach(), ry) < 2e-6
    for got, ref in zip((x.grad, *[p.grad for p in params]), want):
        assert rel_l2(got, ref) < 2e-6


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck(device):
    x = torch.randn(3, 5, 16, device=device)
    weight, bias = affine_params(16, device)
    a, b = (t.to(device) for t in random_coefficients(1, 8, (5, 4)))
    forward = torch.ops.flashkat.layer_norm_group_rational.default
    torch.library.opcheck(forward, (x, weight, bias, a, b, 1e-6, None))
    torch.library.opcheck(forward, (x, weight, bias, a, b, 1e-6, torch.bfloat16))
    _, mean, rstd = forward(x, weight, bias, a, b, 1e-6, None)
    args = (torch.randn_like(x), x, weight, bias, a, b, mean, rstd, 1e-6)
    torch.library.opcheck(torch.ops.flashkat.layer_norm_group_rational_backward.default, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_gradcheck_float64(device):
    x = torch.randn(2, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    params = [t.double().to(device).requires_grad_() for t in (*affine_params(8, "cpu"),
                                                               *random_coefficients(2, 4, (5, 4), device="cpu"))]
    assert torch.autograd.gradcheck(lambda *t: op.layer_norm_group_rational(*t), (x, *params))


def test_compile_fullgraph_matches_eager():
    params = [t.requires_grad_() for t in (*affine_params(32), *random_coefficients(1, 8, (5, 4)))]

    def fn(x):
        return op.layer_norm_group_rational(x, *params).square().sum()

    x = torch.randn(6, 7, 32, device=DEVICE)
    eager = fn(x)
    eager.backward()
    eager_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    compiled = torch.compile(fn, fullgraph=True)(x)
    compiled.backward()
    assert rel_l2(compiled.detach(), eager.detach()) < 1e-6
    for p, g in zip(params, eager_grads):
        assert rel_l2(p.grad, g) < 1e-6


def test_bad_inputs_name_what_was_passed():
    x = torch.randn(4, 32)
    weight, bias = affine_params(32, "cpu")
    a, b = random_coefficients(1, 8, (5, 4), device="cpu")
    with pytest.raises(ValueError, match=r"weight must have shape \(32,\).*\(16,\)"):
        op.layer_norm_group_rational(x, weight[:16], bias, a, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\).*NoneType"):
        op.layer_norm_group_rational(x, weight, None, a, b)
    with pytest.raises(ValueError, match="eps must be a positive number, got 0"):
        op.layer_norm_group_rational(x, weight, bias, a, b, eps=0)
    with pytest.raises(ValueError, match=r"30 channels.*8 groups"):
        op.layer_norm_group_rational(torch.randn(4, 30), weight[:30], bias[:30], a, b)
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
        op.layer_norm_group_rational(x, weight, bias, a, b, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="grad_output shape"):
        op.triton_backward(torch.randn(4, 16), x, weight, bias, a, b, x[:, 0], x[:, 0])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [192, 384, 768])
def test_kat_shapes_on_gpu(dtype, D):
    x = torch.randn(16, 197, D, device="cuda").to(dtype)
    check_kernels(x, *affine_params(D), *random_coefficients(1, 8, (5, 4)), out_dtype=torch.bfloat16)
