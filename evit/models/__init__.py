"""Every method's models, registered with timm on import: `timm.create_model("evit_deit_small_patch16_224",
keep_rate=0.7)`, `timm.create_model("tome_deit_small_patch16_224", r=8)`,
`timm.create_model("dynamicvit_deit_small_patch16_224", base_rate=0.7)`; `base` holds what every method's model
shares."""
from .base import BlockTokens, TokenReducer, extra_macs, token_counts
from .dynamicvit import DEFAULT_PRUNING_LOC, DynamicViT, DynamicViTBlock, PredictorLG
from .evit import DEFAULT_DROP_LOC, EViT, EViTAttention, EViTBlock, PassState, num_kept, reorganize_tokens
from .tome import ToMe, ToMeAttention, ToMeBlock, ToMeState, merge_count, merge_tokens

__all__ = [
    "BlockTokens", "TokenReducer", "extra_macs", "token_counts", "DEFAULT_PRUNING_LOC", "DynamicViT",
    "DynamicViTBlock", "PredictorLG", "DEFAULT_DROP_LOC", "EViT", "EViTAttention", "EViTBlock", "PassState",
    "num_kept", "reorganize_tokens", "ToMe", "ToMeAttention", "ToMeBlock", "ToMeState", "merge_count",
    "merge_tokens",
]
