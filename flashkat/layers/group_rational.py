"""``GroupRational``: the GR-KAN activation as an ``nn.Module``, a drop-in for KAT's ``KAT_Group``."""

from __future__ import annotations

import torch
from torch import nn

from flashkat.fitting import initial_coefficients
from flashkat.ops.group_rational import group_rational
from flashkat.ops.layer_norm_group_rational import layer_norm_group_rational


def follow_autocast_io(x: torch.Tensor, follow_autocast: bool) -> tuple[torch.Tensor, torch.dtype | None]:
    """(input, output dtype) of a layer with ``follow_autocast`` (see ``GroupRational``): under
    autocast it stores the autocast dtype, and when compiled also takes its input in it; else
    (x, None), the input's dtype."""
    if not (follow_autocast and torch.is_autocast_enabled(x.device.type)):
        return x, None
    out_dtype = torch.get_autocast_dtype(x.device.type)
    if torch.compiler.is_compiling():  # a fused cast: half the bytes written, read and saved
        x = x.to(out_dtype)
    return x, out_dtype


class GroupRational(nn.Module):
    """Learnable rational activation P(x)/Q(x) with coefficients shared by groups of channels.

    Args:
        num_groups: denominator groups (KAT: 8); the channel count must be divisible by it.
        mode: initial shape, one of ``flashkat.fitting.MODES`` (identity, swish, gelu, ...).
        order: (m, n), the degrees of P and Q.
        numerator_groups: numerator groups (KAT: 1, one numerator shared by every channel).
        dim: the channel dimension of the input (``-1`` for tokens, ``1`` for ``[B, C, H, W]``).
        impl: backward kernel on CUDA, "flashkat" or the baselines "blocked"/"atomic" (for
            measurement; see ``flashkat.group_rational``). A plain attribute: change it any time.
        follow_autocast: under autocast, store the output in the autocast dtype rather than the
            input's (for a layer whose output feeds a matmul, which would cast it anyway: this
            saves that cast's pass over memory, forward and backward). Under ``torch.compile`` the
            layer also takes its input in that dtype: inductor fuses the cast into the kernel that
            produced the input (KAT: the LayerNorm, whose float32 output would otherwise be
            written and read in full), so compiled steps round this layer's input where eager
            steps read it in float32.

    Parameters ``weight_numerator (numerator_groups, m+1)`` and ``weight_denominator
    (num_groups, n)`` carry KAT's names and shapes, so KAT state dicts load unchanged. The
    variance-preserving gain of the initial shape is kept as ``self.gain``.
    """

    def __init__(
        self,
        num_groups: int = 8,
        mode: str = "gelu",
        order: tuple[int, int] = (5, 4),
        numerator_groups: int = 1,
        dim: int = -1,
        impl: str = "flashkat",
        follow_autocast: bool = False,
    ) -> None:
        super().__init__()
        if num_groups < 1 or numerator_groups < 1:
            raise ValueError(f"GroupRational: group counts must be >= 1, got num_groups={num_groups}, "
                             f"numerator_groups={numerator_groups}")  # fmt: skip
        fit = initial_coefficients(mode, tuple(order))
        self.mode, self.order, self.dim, self.gain = mode, (len(fit.numerator) - 1, len(fit.denominator)), dim, fit.gain
        self.impl, self.follow_autocast = impl, follow_autocast
        numerator = torch.tensor(fit.numerator, dtype=torch.float32)
        denominator = torch.tensor(fit.denominator, dtype=torch.float32).reshape(-1)
        self.weight_numerator = nn.Parameter(numerator.repeat(numerator_groups, 1))
        self.weight_denominator = nn.Parameter(denominator.repeat(num_groups, 1))

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """F(x), or F(norm(x)): a LayerNorm ``norm`` over the channels (last dim, with weight and
        bias) runs fused with F, one pass over memory (``flashkat.ops.layer_norm_group_rational``);
        any other ``norm`` is applied first, and so is any norm under ``torch.compile``, where inductor
        fuses the LayerNorm with the residual add before it and the cast this layer reads (a fused
        custom op would cost the add its own pass). The fused LayerNorm reads x in its own dtype."""
        if norm is not None:
            if self._fuses(norm, x):  # eager only, where follow_autocast_io leaves x as it is
                _, out_dtype = follow_autocast_io(x, self.follow_autocast)
                return layer_norm_group_rational(x, norm.weight, norm.bias, self.weight_numerator,
                                                 self.weight_denominator, norm.eps, out_dtype)  # fmt: skip
            x = norm(x)
        x, out_dtype = follow_autocast_io(x, self.follow_autocast)
        return group_rational(x, self.weight_numerator, self.weight_denominator, self.dim, self.impl, out_dtype)

    def _fuses(self, norm: nn.Module, x: torch.Tensor) -> bool:
        return (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
                and tuple(norm.normalized_shape) == (x.shape[-1],) and self.dim in (-1, x.dim() - 1)
                and self.impl == "flashkat" and not torch.compiler.is_compiling())  # fmt: skip

    def extra_repr(self) -> str:
        return (f"num_groups={self.weight_denominator.shape[0]}, numerator_groups={self.weight_numerator.shape[0]}, "
                f"order={self.order}, mode={self.mode!r}, dim={self.dim}")  # fmt: skip
