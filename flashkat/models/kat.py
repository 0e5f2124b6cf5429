"""Kolmogorov-Arnold Transformer (KAT) models for timm, built on timm's own ``VisionTransformer``.

A KAT is a ViT whose MLP blocks are GR-KAN blocks (``flashkat.layers.KANMlp``). The models here are
``timm.models.VisionTransformer`` with ``mlp_layer=KANMlp``; the subclass ``Kat`` only adds KAT's
weight initialisations. Parameter names and shapes equal KAT's, so its checkpoints load with
``strict=True``; FlashKAT checkpoints load through ``checkpoint_filter_fn``.

Weight initialisations (``weight_init=``):

* ``"kan_mimetic"`` (default) reproduces what KAT's published models were trained from. timm's ViT
  init (trunc-normal std 0.02 on every Linear, zero biases, pos_embed trunc-normal 0.02, cls_token
  normal 1e-6, the patch-embedding conv as PyTorch makes it), then mimetic attention (Trockman & Kolter, 2023): per head, W_q_h^T W_k_h is the best
  rank-head_dim approximation of ``0.7 Z + 0.7 I`` and, per block, ``W_v W_proj`` (as KAT stores
  them) equals ``0.4 Z - 0.4 I``, with Z uniform of variance 1/dim and the factors split evenly by
  an SVD. KAT's code also sets a variance-preserving init of fc1/fc2 but overwrites it with the
  trunc-normal, so fc1/fc2 stay trunc-normal here too.
* ``"kan_variance"`` is the same except fc1 and fc2 are normal with std ``gain / sqrt(fan_in)``,
  where ``gain`` is the variance-preserving gain of the rational in front of them (act1, act2).
* Any of timm's ViT modes (``""``, ``"jax"``, ``"moco"``, ``"skip"``, ...) as usual.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, named_apply, register_model
from timm.models.vision_transformer import Block, VisionTransformer, get_init_weights_vit
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn

from flashkat.datasets import DIGITS_MEAN, DIGITS_STD
from flashkat.layers import KANMlp

__all__ = ["Kat", "FusedNormBlock", "MODEL_CONFIGS", "KAN_INITS", "checkpoint_filter_fn", "mimetic_attention_init_", "create_kat"]

KAN_INITS = ("kan_mimetic", "kan_variance")

# Architecture of each registered model. KAT's three: depth 12, patch 16, class token, 224 px.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "kat_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "kat_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "kat_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    # Small images: KAT-T's width on CIFAR-sized 32x32 inputs, and a micro model for sklearn's 8x8
    # digits upsampled to 16x16 (4x4 patches of the smoothed image generalise better than 2x2 patches
    # of the raw one: 97-98% against 94-96% held-out accuracy, same cost), average-pooled.
    "kat_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
    "kat_micro_patch4_16": dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                                num_heads=4, global_pool="avg"),  # fmt: skip
}

_KAT_WEIGHTS = "https://huggingface.co/adamdad/kat_pretained/resolve/main/"


class FusedNormBlock(Block):
    """timm's ``Block`` that hands ``norm2`` to the KAN block, which runs it fused with ``act1`` in
    eager mode (``flashkat.ops.layer_norm_group_rational``): the same modules, parameters and
    state dict."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
        return x + self.drop_path2(self.ls2(self.mlp(x, self.norm2)))


class Kat(VisionTransformer):
    """timm's ``VisionTransformer`` with KAN blocks (``mlp_layer=KANMlp``) and KAT's inits.

    ``fuse_norm=True`` (the default) builds ``FusedNormBlock`` blocks: in eager mode each block's
    second LayerNorm runs in one kernel with the GR-KAN after it (same function, parameters and
    checkpoints); under ``torch.compile`` inductor fuses that LayerNorm itself. A ``block_fn`` of
    your own needs ``fuse_norm=False``.
    """

    def __init__(self, *args, mlp_layer: type[nn.Module] = KANMlp, weight_init: str = "kan_mimetic",
                 fuse_norm: bool = True, **kwargs) -> None:  # fmt: skip
        if fuse_norm:
            if kwargs.get("block_fn", Block) is not Block:
                raise ValueError("Kat: fuse_norm=True builds its own blocks; "
                                 "pass fuse_norm=False with a block_fn of your own")
            kwargs["block_fn"] = FusedNormBlock
        super().__init__(*args, mlp_layer=mlp_layer, weight_init=weight_init, **kwargs)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        mode = mode or self.weight_init_mode
        if mode not in KAN_INITS:
            return super().init_weights(mode, needs_reset=needs_reset)
        # timm's default ViT init first (its init_weights would reject our mode name)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        named_apply(get_init_weights_vit("", needs_reset=needs_reset), self)
        for block in self.blocks:
            mimetic_attention_init_(block.attn)
            if mode == "kan_variance":
                _variance_preserving_init_(block.mlp)
        if self.fix_init:
            self.fix_init_weight()


def _noisy_identity(dim: int, alpha: float, beta: float, generator: torch.Generator | None) -> torch.Tensor:
    """alpha * Z + beta * I, Z uniform with variance 1/dim (float32 on the CPU: its SVD is 10x faster)."""
    bound = math.sqrt(3.0 / dim)
    noise = torch.empty(dim, dim).uniform_(-bound, bound, generator=generator)
    return alpha * noise + beta * torch.eye(dim)


def _balanced_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L @ R == matrix and the singular values split evenly (U sqrt(S), sqrt(S) V^T)."""
    u, s, vh = torch.linalg.svd(matrix)
    root = s.sqrt()
    return u * root, root[:, None] * vh


@torch.no_grad()
def mimetic_attention_init_(
    attn: nn.Module,
    query_key: tuple[float, float] = (0.7, 0.7),
    value_proj: tuple[float, float] = (0.4, 0.4),
    generator: torch.Generator | None = None,
) -> None:
    """KAT's mimetic init of a timm ``Attention`` (fused ``qkv`` Linear and ``proj``), in place.

    Each head's W_q_h^T W_k_h becomes the rank-head_dim truncation of ``a Z + b I`` (a, b =
    ``query_key``), so a token attends to similar tokens from the start; W_v and W_proj become the
    two even SVD factors of ``a Z - b I`` (``value_proj``) as KAT sets them. Biases are untouched.
    """
    dim, head_dim = attn.qkv.in_features, attn.head_dim
    weight = torch.empty(attn.qkv.weight.shape)
    query, key, value = weight.chunk(3)  # views into weight
    for head in range(attn.num_heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        left, right = _balanced_factors(_noisy_identity(dim, *query_key, generator))
        query[rows] = left[:, :head_dim].T
        key[rows] = right[:head_dim]
    left, right = _balanced_factors(_noisy_identity(dim, value_proj[0], -value_proj[1], generator))
    value.copy_(left)
    attn.qkv.weight.copy_(weight)
    attn.proj.weight.copy_(right)


@torch.no_grad()
def _variance_preserving_init_(mlp: KANMlp) -> None:
    """fc1, fc2 ~ N(0, gain^2 / fan_in) with the gain of the rational that feeds each of them."""
    for act, fc in ((mlp.act1, mlp.fc1), (mlp.act2, mlp.fc2)):
        nn.init.normal_(fc.weight, std=act.gain / math.sqrt(fc.in_features))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VisionTransformer, **kwargs) -> dict[str, torch.Tensor]:
    """Adapt a KAT, FlashKAT or flashkat training checkpoint to ``model``.

    Unwraps ``model``/``state_dict`` containers, drops DDP / ``torch.compile`` prefixes, renames
    FlashKAT's rational parameters (``numerator_v``, ``denominator_v``) to KAT's (``weight_numerator``,
    ``weight_denominator``), then applies timm's ViT filter (position-embedding and patch resampling).
    """
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    renamed = {}
    for name, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        if name.endswith(".numerator_v"):
            name = name.removesuffix("numerator_v") + "weight_numerator"
        elif name.endswith(".denominator_v"):
            name = name.removesuffix("denominator_v") + "weight_denominator"
        renamed[name] = value
    return vit_checkpoint_filter_fn(renamed, model, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "kat_tiny_patch16_224.in1k": _cfg(
        _KAT_WEIGHTS + "kat_tiny_patch16_224_1f3ad3b2e69821f3d412f2924cf159a0e266f142d739cb68f68f796f5a0fe289.pth"),
    "kat_small_patch16_224.in1k": _cfg(
        _KAT_WEIGHTS + "kat_small_patch16_224_32487885cf13d2c14e461c9016fac8ad43f7c769171f132530941e930aeb5fe2.pth"),
    "kat_base_patch16_224.in1k": _cfg(
        _KAT_WEIGHTS + "kat_base_patch16_224_abff874d925d756d15cde97303f772a3460ddbd44b9c53fb9ce5cf15be230fb6.pth"),
    "kat_tiny_patch4_32": _cfg(input_size=(3, 32, 32), num_classes=10, crop_pct=1.0),
    "kat_micro_patch4_16": _cfg(input_size=(1, 16, 16), num_classes=10, crop_pct=1.0, mean=(DIGITS_MEAN,),
                                std=(DIGITS_STD,)),
})  # fmt: skip


def create_kat(variant: str, pretrained: bool = False, **kwargs) -> Kat:
    """Build the registered ``variant`` through timm (weights, filter, features and all)."""
    out_indices = kwargs.pop("out_indices", 3)
    model_args = {**MODEL_CONFIGS[variant], **kwargs}
    return build_model_with_cfg(
        Kat,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **model_args,
    )


@register_model
def kat_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Kat:
    """KAT-T: ViT-Ti/16 with GR-KAN blocks (5.7M parameters, ImageNet top-1 74.6)."""
    return create_kat("kat_tiny_patch16_224", pretrained, **kwargs)


@register_model
def kat_small_patch16_224(pretrained: bool = False, **kwargs) -> Kat:
    """KAT-S: ViT-S/16 with GR-KAN blocks (22.1M parameters, ImageNet top-1 81.2)."""
    return create_kat("kat_small_patch16_224", pretrained, **kwargs)


@register_model
def kat_base_patch16_224(pretrained: bool = False, **kwargs) -> Kat:
    """KAT-B: ViT-B/16 with GR-KAN blocks (86.6M parameters, ImageNet top-1 82.3)."""
    return create_kat("kat_base_patch16_224", pretrained, **kwargs)


@register_model
def kat_tiny_patch4_32(pretrained: bool = False, **kwargs) -> Kat:
    """KAT-T's width and depth on 32x32 images (CIFAR-sized), patch 4: 64 tokens."""
    return create_kat("kat_tiny_patch4_32", pretrained, **kwargs)


@register_model
def kat_micro_patch4_16(pretrained: bool = False, **kwargs) -> Kat:
    """A 4-block, 64-wide KAT for 16x16 single-channel images (sklearn's 8x8 digits, upsampled): 16 tokens."""
    return create_kat("kat_micro_patch4_16", pretrained, **kwargs)
