"""The group-rational function written directly from its definition, in plain PyTorch.

For an element ``x`` in channel ``c`` of a tensor whose channel dimension ``dim`` has size ``D``:

    gn = c // (D // Gn),  gd = c // (D // Gd)
    P(x) = sum_{i=0..m} A[gn, i] x^i
    Q(x) = 1 + sum_{j=1..n} |B[gd, j-1]| |x|^j
    F(x) = P(x) / Q(x)

and the gradients

    dF/dx      = (P'(x) - F(x) Q'(x)) / Q(x)
    dF/dA[i]   = x^i / Q(x)
    dF/dB[j-1] = -F(x) / Q(x) * sign(B[j-1]) |x|^j         with sign(0) = +1 (also for x in Q')

Every quantity is computed in float64 whatever the storage dtype, so this is both the yardstick
the fast kernels are tested against and the implementation used on the CPU (and on any device
without Triton). It is not tuned for speed.
"""

from __future__ import annotations

import torch

__all__ = ["check_args", "forward", "backward", "group_rational"]


def check_args(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, dim: int) -> int:
    """Validate the arguments of the group-rational function and return ``dim`` as a non-negative index.

    Raises ``TypeError`` for non-tensors and non-floating dtypes and ``ValueError`` for shapes or
    devices that disagree, naming what was passed.
    """
    for name, t in (("x", x), ("numerator", numerator), ("denominator", denominator)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"group_rational: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"group_rational: {name} must have a floating-point dtype, got {t.dtype}")
    if not (x.device == numerator.device == denominator.device):
        raise ValueError(
            "group_rational: all tensors must be on one device, got "
            f"x on {x.device}, numerator on {numerator.device}, denominator on {denominator.device}"
        )
    if numerator.dim() != 2 or numerator.shape[0] < 1 or numerator.shape[1] < 1:
        raise ValueError(
            f"group_rational: numerator must have shape (groups, m+1) with groups >= 1 and m >= 0, "
            f"got {tuple(numerator.shape)}"
        )
    if denominator.dim() != 2 or denominator.shape[0] < 1:
        raise ValueError(
            f"group_rational: denominator must have shape (groups, n) with groups >= 1, got {tuple(denominator.shape)}"
        )
    if x.dim() == 0:
        raise ValueError("group_rational: x must have at least one dimension (the channels), got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"group_rational: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    dim = dim % x.dim()
    channels = x.shape[dim]
    for name, groups in (("numerator", numerator.shape[0]), ("denominator", denominator.shape[0])):
        if channels % groups:
            raise ValueError(
                f"group_rational: the {channels} channels of x (shape {tuple(x.shape)}, dim={dim}) "
                f"do not divide into the {groups} groups of the {name} (shape "
                f"{tuple(numerator.shape if name == 'numerator' else denominator.shape)})"
            )
    return dim


def _per_channel(coefficients: torch.Tensor, channels: int) -> torch.Tensor:
    """(groups, k) -> (channels, k) in float64: row c holds the coefficients of channel c's group."""
    groups = coefficients.shape[0]
    return coefficients.double().repeat_interleave(channels // groups, dim=0)


def _sign(t: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1 (also for -0.0)."""
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def _like(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in a new tensor with ``t``'s dtype and memory layout (as ``torch.empty_like``)."""
    return torch.empty_like(t).copy_(value)


def _evaluate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """P, Q of float64 ``x`` (channels last) with per-channel coefficients ``a`` (D, m+1), ``b`` (D, n)."""
    m, n = a.shape[1] - 1, b.shape[1]
    p = a[:, m].expand_as(x)
    for i in range(m - 1, -1, -1):
        p = p * x + a[:, i]
    ax, bb = x.abs(), b.abs()
    q = torch.zeros_like(x)
    for j in range(n - 1, -1, -1):
        q = (q + bb[:, j]) * ax
    return p, q + 1.0


def forward(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """F(x), computed in float64 and returned in ``x``'s dtype."""
    dim = check_args(x, numerator, denominator, dim)
    xd = x.double().movedim(dim, -1)
    channels = xd.shape[-1]
    p, q = _evaluate(xd, _per_channel(numerator, channels), _per_channel(denominator, channels))
    return _like(x, (p / q).movedim(-1, dim))


def backward(
    grad_output: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d numerator, d denominator) of ``sum(grad_output * F(x))``, each in its input's dtype."""
    dim = check_args(x, numerator, denominator, dim)
    xd = x.double().movedim(dim, -1)
    g = grad_output.double().movedim(dim, -1)
    channels = xd.shape[-1]
    a, b = _per_channel(numerator, channels), _per_channel(denominator, channels)
    m, n = a.shape[1] - 1, b.shape[1]
    p, q = _evaluate(xd, a, b)
    f = p / q
    ax = xd.abs()

    dp = torch.zeros_like(xd)  # P'(x)
    for i in range(m, 0, -1):
        dp = dp * xd + i * a[:, i]
    dq = torch.zeros_like(xd)  # Q'(x) / sign(x)
    for j in range(n, 0, -1):
        dq = dq * ax + j * b[:, j - 1].abs()
    dx = g * (dp - f * _sign(xd) * dq) / q

    # Per-element coefficient gradients, summed over every position of each channel, then over
    # the channels of each group.
    xs, axs = xd.reshape(-1, channels), ax.reshape(-1, channels)
    g_over_q = (g / q).reshape(-1, channels)
    minus_gf_over_q = -g_over_q * f.reshape(-1, channels)
    da = torch.stack([(g_over_q * xs**i).sum(0) for i in range(m + 1)], dim=-1)
    db = xs.new_zeros(channels, n)
    for j in range(n):
        db[:, j] = (minus_gf_over_q * axs ** (j + 1)).sum(0)
    db = db * _sign(b)

    gn, gd = numerator.shape[0], denominator.shape[0]
    da = da.reshape(gn, channels // gn, m + 1).sum(1)
    db = db.reshape(gd, channels // gd, n).sum(1)
    return _like(x, dx.movedim(-1, dim)), da.to(numerator.dtype), db.to(denominator.dtype)


class _GroupRational(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, numerator, denominator, dim):
        ctx.save_for_backward(x, numerator, denominator)
        ctx.dim = dim
        return forward(x, numerator, denominator, dim)

    @staticmethod
    def backward(ctx, grad_output):
        x, numerator, denominator = ctx.saved_tensors
        dx, da, db = backward(grad_output, x, numerator, denominator, ctx.dim)
        return dx, da, db, None


def group_rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The reference group-rational function, differentiable in all three tensors (first order)."""
    check_args(x, numerator, denominator, dim)
    return _GroupRational.apply(x, numerator, denominator, dim)
