"""DynamicViT (Rao et al., NeurIPS 2021), the token-pruning method EViT is compared with, at inference, on timm.

Before each block of ``pruning_loc`` (blocks 3, 6, 9: the 4th, 7th and 10th, as EViT's), a prediction module
scores the image tokens and the block runs on the CLS token and the best-scored ones only: stage ``s`` (0-based)
keeps ``int(num_patches * base_rate ** (s + 1))`` of the original patches (DeiT-S/0.7: 196 -> 137 -> 96 -> 67), a
static k, in descending score order, as the official ``models/dyvit.py`` does when not training. The predictor
(the official ``PredictorLG``) is an MLP over each token's features concatenated with the mean of the kept tokens'
features; its modules carry the official names (``score_predictor.<s>.in_conv`` / ``out_conv``) and the backbone is
timm's ViT, so the official DeiT-S/0.7 checkpoint loads as it is. Training DynamicViT (its Gumbel-softmax
decisions, attention masking and distillation losses) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from .base import BlockTokens, TokenReducer, block_indices, build_reducer, deit_cfg

DEFAULT_PRUNING_LOC = (3, 6, 9)


def predictor_macs(num_tokens: int, dim: int) -> int:
    """MACs of one prediction module scoring `num_tokens` tokens of width `dim` (its linears and the mean)."""
    return num_tokens * (dim * dim + dim * (dim // 2) + (dim // 2) * (dim // 4) + (dim // 4) * 2 + dim // 2)


class PredictorLG(nn.Module):
    """DynamicViT's prediction module: log-probabilities (keep, drop) of each token, from its own features (the
    first half) and the mean of all tokens' (the second half)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        global_x = x[..., half:].sum(dim=1, keepdim=True) / x.shape[1]  # every token present counts (policy 1)
        return self.out_conv(torch.cat([x[..., :half], global_x.expand(-1, x.shape[1], -1)], dim=-1))


@dataclass
class PruningState:
    """What the pruning blocks of one `DynamicViT` share: its prediction modules (registered on the model only, so
    the official names stay) and the patches each stage keeps in the current pass."""

    predictors: nn.ModuleList
    kept: list[int]


class DynamicViTBlock(Block):
    """A timm `Block` that, if it is stage `stage` of its model's pruning, first keeps the CLS token and the image
    tokens its stage's prediction module scores best: the model's `PruningState` holds the module and the count."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage: int | None = None  # a `DynamicViT` sets it for the blocks of `pruning_loc`, and shares its state
        self.pruning: PruningState | None = None

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.stage is not None:
            score = self.pruning.predictors[self.stage](x[:, 1:])[..., 0]
            idx = score.topk(self.pruning.kept[self.stage], dim=1).indices  # sorted, best first, as the official
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
        return super().forward(x, **kwargs)


class DynamicViT(TokenReducer, VisionTransformer):
    """timm `VisionTransformer` with DynamicViT's prediction modules before the blocks of `pruning_loc`.

    Blocks map tensor -> tensor, so timm's feature loop, `forward_intermediates` (NLC: the kept tokens are reordered
    by score) and `features_only=True` run the pruned model. Each stage keeps a share of the `img_size` grid (the
    official's fixed ``init_n``), so `dynamic_img_size` is refused."""

    pass_parameter = "base_rate"

    def __init__(self, *args, base_rate: float = 0.7, pruning_loc: Sequence[int] = DEFAULT_PRUNING_LOC, **kwargs):
        if kwargs.get("dynamic_img_size"):
            raise ValueError("DynamicViT keeps shares of the img_size grid: dynamic_img_size is not supported")
        super().__init__(*args, block_fn=DynamicViTBlock, **kwargs)
        if self.num_prefix_tokens != 1 or self.cls_token is None:
            raise ValueError("DynamicViT needs exactly one prefix token, the CLS token")
        self.pruning_loc = block_indices("pruning_loc", pruning_loc, len(self.blocks), lo=1)
        if not 0 < base_rate <= 1:
            raise ValueError(f"base_rate must be in (0, 1], got {base_rate}")
        self.base_rate = base_rate
        self.score_predictor = nn.ModuleList(PredictorLG(self.embed_dim) for _ in self.pruning_loc)
        self.pruning = PruningState(self.score_predictor, self.kept(self.patch_embed.num_patches))
        for stage, i in enumerate(self.pruning_loc):
            self.blocks[i].stage = stage
        for block in self.blocks:
            block.pruning = self.pruning

    def kept(self, num_patches: int, base_rate: float | None = None) -> list[int]:
        """Patches kept by each stage (from the original `num_patches`, as the official `token_ratio`)."""
        rate = self.base_rate if base_rate is None else base_rate
        return [int(num_patches * rate ** (s + 1)) for s in range(len(self.pruning_loc))]

    def token_counts(self, num_patches: int | None = None, base_rate: float | None = None) -> list[BlockTokens]:
        """Tokens through each block. A block whose output a prediction module scores is `reorganized` (its
        `extra_macs` are the predictor's); the next block runs on the kept tokens."""
        n = (num_patches or self.patch_embed.num_patches) + 1
        kept = dict(zip(self.pruning_loc, self.kept(n - 1, base_rate)))
        counts = []
        for i in range(len(self.blocks)):
            n = kept[i] + 1 if i in kept else n
            counts.append(BlockTokens(n, n, i + 1 in kept, False))
        return counts

    def extra_macs(self, tokens: BlockTokens) -> int:
        """The prediction module scoring a block's output tokens (CLS excluded)."""
        return predictor_macs(tokens.mlp - 1, self.embed_dim) if tokens.reorganized else 0

    def _start_pass(self, base_rate: float | None) -> None:
        self.pruning.kept = self.kept(self.patch_embed.num_patches, base_rate)

    def forward_features(self, x: torch.Tensor, base_rate: float | None = None) -> torch.Tensor:
        self._start_pass(base_rate)
        return super().forward_features(x)

    def forward(self, x: torch.Tensor, base_rate: float | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, base_rate))


# Pretrained tags: the official DynamicViT-DeiT-S/0.7 release is a checkpoint file (Google Drive / Tsinghua
# Cloud), loaded with `evit.checkpoint`; the tags only name the DeiT configs.
default_cfgs = generate_default_cfgs({
    "dynamicvit_deit_tiny_patch16_224.fb_in1k": deit_cfg("timm/deit_tiny_patch16_224.fb_in1k"),
    "dynamicvit_deit_small_patch16_224.fb_in1k": deit_cfg("timm/deit_small_patch16_224.fb_in1k"),
    "dynamicvit_deit_base_patch16_224.fb_in1k": deit_cfg("timm/deit_base_patch16_224.fb_in1k"),
})


def _create_dynamicvit(variant: str, pretrained: bool = False, **kwargs) -> DynamicViT:
    return build_reducer(DynamicViT, variant, pretrained, **kwargs)


@register_model
def dynamicvit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViT:
    """DynamicViT-DeiT-Ti at 224 px; base_rate and pruning_loc as kwargs."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_dynamicvit("dynamicvit_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dynamicvit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViT:
    """DynamicViT-DeiT-S at 224 px (the official DeiT-S/0.7 checkpoint loads into it)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_dynamicvit("dynamicvit_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dynamicvit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViT:
    """DynamicViT-DeiT-B at 224 px."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_dynamicvit("dynamicvit_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
