"""EViT and ToMe models, registered with timm: `timm.create_model("evit_deit_small_patch16_224", keep_rate=0.7)`,
`timm.create_model("tome_deit_small_patch16_224", r=8)`."""
from .evit import (
    DEFAULT_DROP_LOC, BlockTokens, EViT, EViTAttention, EViTBlock, PassState, num_kept, reorganize_tokens,
)
from .tome import ToMe, ToMeAttention, ToMeBlock, ToMeState, merge_count, merge_tokens

__all__ = [
    "DEFAULT_DROP_LOC", "BlockTokens", "EViT", "EViTAttention", "EViTBlock", "PassState", "num_kept",
    "reorganize_tokens", "ToMe", "ToMeAttention", "ToMeBlock", "ToMeState", "merge_count", "merge_tokens",
]
