"""What every token-reduction model shares: the `TokenReducer` protocol that generic code (bench, MACs, training,
evaluation) asks, `BlockTokens`, token counts and extra MACs of any timm ViT, and the DeiT pretrained config.

A method's model is a timm `VisionTransformer` subclass that also derives from `TokenReducer`; its torch-free side
(parameters, per-pass override, schedule, labels) is its entry in `evit.methods.METHODS`. A plain timm ViT is the
method none: every block keeps every token, at no extra cost.
"""
from __future__ import annotations

from typing import NamedTuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


class BlockTokens(NamedTuple):
    """Tokens through one block in a pass, CLS (and any fused token) included."""

    attn: int  # into attention
    mlp: int  # into the MLP, that is, out of the block
    reorganized: bool
    fused: bool


class TokenReducer:
    """The model side of a method. ``forward(x, **{override: value})`` runs one pass at another value of the method's
    per-pass parameter (`evit.methods.Method.override`); `token_counts` takes the same keyword."""

    def token_counts(self, num_patches: int | None = None, **override) -> list[BlockTokens]:
        """Tokens through each block in a pass (at ``override``, else the model's own), by the rule the blocks
        apply; `num_patches` defaults to the model's patch grid."""
        raise NotImplementedError

    def extra_macs(self, tokens: BlockTokens) -> int:
        """MACs one block spends on reducing its tokens (scores, matching, fusion), beyond the ViT block's own."""
        return 0


def token_counts(model: nn.Module, **override) -> list[BlockTokens]:
    """Tokens through each block of a timm ViT or a `TokenReducer` (at ``override``, else its own)."""
    if isinstance(model, TokenReducer):
        return model.token_counts(**override)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    return [BlockTokens(n, n, False, False) for _ in model.blocks]


def extra_macs(model: nn.Module, tokens: BlockTokens) -> int:
    return model.extra_macs(tokens) if isinstance(model, TokenReducer) else 0


def deit_cfg(hf_hub_id: str = "", **kwargs) -> dict:
    """timm's pretrained config of a DeiT-based model (its tag initializes from the DeiT release `hf_hub_id`)."""
    return {
        "url": "",
        "hf_hub_id": hf_hub_id,
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
        **kwargs,
    }
