"""Layers built on the group-rational op, reusable outside the KAT models."""

from flashkat.layers.group_rational import GroupRational
from flashkat.layers.kan_mlp import KANMlp

__all__ = ["GroupRational", "KANMlp"]
