"""KAT models registered with timm: importing this package makes ``timm.create_model("kat_tiny_patch16_224")`` work."""

from flashkat.models.kat import (
    KAN_INITS,
    MODEL_CONFIGS,
    Kat,
    checkpoint_filter_fn,
    create_kat,
    mimetic_attention_init_,
)

__all__ = ["KAN_INITS", "MODEL_CONFIGS", "Kat", "checkpoint_filter_fn", "create_kat", "mimetic_attention_init_"]
