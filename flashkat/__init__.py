"""flashkat: group-rational KAN (GR-KAN) layers that train as fast as the MLPs they replace.

Public API:
    flashkat.group_rational(x, numerator, denominator, dim=-1)   the differentiable function
    flashkat.GroupRational(num_groups=8, mode="gelu", ...)      the nn.Module (KAT_Group drop-in)
    flashkat.reference.group_rational(...)                      the float64 definition
"""

from flashkat import reference
from flashkat.layers import GroupRational
from flashkat.ops.group_rational import group_rational
import flashkat.ops.baselines  # noqa: F401,E402  (registers the "blocked" and "atomic" backwards)
import flashkat.models  # noqa: F401,E402  (registers the KAT models with timm)

__version__ = "0.1.0"
__all__ = ["GroupRational", "group_rational", "reference", "__version__"]
