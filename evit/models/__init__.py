"""EViT models, registered with timm: `timm.create_model("evit_deit_small_patch16_224", keep_rate=0.7)`."""
from .evit import (
    DEFAULT_DROP_LOC, BlockTokens, EViT, EViTAttention, EViTBlock, PassState, num_kept, reorganize_tokens,
)

__all__ = [
    "DEFAULT_DROP_LOC", "BlockTokens", "EViT", "EViTAttention", "EViTBlock", "PassState", "num_kept",
    "reorganize_tokens",
]
