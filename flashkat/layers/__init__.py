"""Layers built on the group-rational op, reusable outside the KAT models."""

from flashkat.layers.group_rational import GroupRational

__all__ = ["GroupRational"]
