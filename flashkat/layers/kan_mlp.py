"""``KANMlp``: KAT's group-rational KAN block, a drop-in ``mlp_layer`` for timm's transformer blocks."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flashkat.layers.group_rational import GroupRational


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class KANMlp(nn.Module):
    """The GR-KAN block of the Kolmogorov-Arnold Transformer:

        x -> act1 -> drop1 -> fc1 -> act2 -> drop2 -> (norm) -> fc2

    ``act1`` is a learnable rational on the ``in_features`` channels, initialised as ``act_modes[0]``
    (KAT: the identity), ``act2`` one on the hidden channels initialised as ``act_modes[1]`` (KAT:
    swish). Each has ``num_groups`` denominators and ``numerator_groups`` numerators (KAT: 8 and 1).

    The signature accepts what timm's ``Block`` passes to its ``mlp_layer`` (``act_layer`` is
    ignored: the rationals are the activations). Customise with ``functools.partial``, e.g.
    ``partial(KANMlp, act_modes=("identity", "gelu"))``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable | None = None,
        norm_layer: Callable | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        act_modes: tuple[str, str] = ("identity", "swish"),
        num_groups: int = 8,
        numerator_groups: int = 1,
        order: tuple[int, int] = (5, 4),
        impl: str = "flashkat",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias, drop = _pair(bias), _pair(drop)
        factory = {"device": device, "dtype": dtype}

        def rational(mode: str, follow_autocast: bool = False) -> GroupRational:
            return GroupRational(num_groups, mode, order, numerator_groups, dim=-1, impl=impl,
                                 follow_autocast=follow_autocast).to(**factory)  # fmt: skip

        # act1 feeds fc1: under autocast it stores what fc1 would cast its (float32, from the
        # LayerNorm) output to, which saves that cast's pass over memory, forward and backward
        self.act1 = rational(act_modes[0], follow_autocast=True)
        self.drop1 = nn.Dropout(drop[0])
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias[0], **factory)
        self.act2 = rational(act_modes[1])
        self.drop2 = nn.Dropout(drop[1])
        self.norm = norm_layer(hidden_features, **factory) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1], **factory)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The block on x, or on norm(x) with a LayerNorm ``norm`` fused into ``act1`` (see
        ``GroupRational.forward``): what a transformer block passes to skip the LayerNorm's pass."""
        x = self.drop1(self.act1(x, norm))
        x = self.fc1(x)
        x = self.drop2(self.act2(x))
        return self.fc2(self.norm(x))
