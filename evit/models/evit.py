"""EViT: DeiT/ViT with attentive-token keeping and inattentive-token fusion (Liang et al., ICLR 2022).

Built on timm's `VisionTransformer`: only the attention (to also expose the CLS attention row) and the block
(to reorganize tokens between attention and MLP) are ours. Blocks map tensor -> tensor like every timm block,
so timm's own feature loop runs them, with gradient checkpointing, and `forward_intermediates` (NLC for a pass
that prunes) and `features_only=True` work. With every keep rate at 1 the model is timm's ViT, weight for weight
and logit for logit.

A reorganizing block, after attention and before the MLP:
  1. scores each non-CLS token by the CLS query's post-softmax attention to it, averaged over heads;
  2. keeps the k = ceil(keep_rate * (N - 1)) best-scored tokens;
  3. with `fuse_token`, appends ONE token: the rest, summed with their (not renormalized) scores as weights.

What one forward pass needs besides the tokens (a keep-rate override; where asked for, the kept indices) lives
in one `PassState`, shared by the model and its blocks and reset at the start of each pass, as ToMe does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Attention
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from .base import BlockTokens, TokenReducer, block_indices, build_reducer, deit_cfg

DEFAULT_DROP_LOC = (3, 6, 9)


def num_kept(num_tokens: int, keep_rate: float) -> int:
    """Number of non-CLS tokens a block with `keep_rate` keeps out of `num_tokens`."""
    return math.ceil(keep_rate * num_tokens)


@dataclass
class PassState:
    """Side information of one forward pass, shared by reference between an `EViT` and its blocks.

    The model resets it at the start of each pass and leaves it in place after: gradient checkpointing runs
    the blocks again during backward, and they must see the same keep rate. So a backward pass must come
    before the next forward pass at another keep rate (as in any training step).
    """

    keep_rate: float | None = None  # overrides the rate of the reorganizing blocks; None: their own rates
    kept: dict[nn.Module, torch.Tensor] | None = None  # if recording: block -> its kept indices, (B, k)


class EViTAttention(Attention):
    """timm's fused attention that can also return the CLS attention row, averaged over heads.

    The row is computed on its own (one query per head), so the N x N matrix is never materialized.
    """

    def forward(self, x: torch.Tensor, return_cls_attn: bool = False):
        if not return_cls_attn:
            return super().forward(x), None
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        cls_attn = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B, H, 1, N
        cls_attn = cls_attn.mean(dim=1)[:, 0, 1:]  # B, N-1: head-averaged, over non-CLS keys
        out = self.proj(self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim)))
        return self.proj_drop(out), cls_attn


class EViTBlock(Block):
    """A timm `Block` that may reorganize its tokens between attention and MLP; maps tokens to tokens.

    `keep_rate` < 1 makes it a reorganizing block. The pass's `PassState` (the model's, shared) may override
    the rate for one pass (the training schedule), but a block whose own rate is 1 never prunes.
    """

    def __init__(self, *args, keep_rate: float = 1.0, fuse_token: bool = False, **kwargs):
        kwargs["attn_layer"] = EViTAttention
        super().__init__(*args, **kwargs)
        self.keep_rate = keep_rate
        self.fuse_token = fuse_token
        self.pass_state = PassState()  # an `EViT` replaces it with the one it shares with all its blocks

    def kept_count(self, num_tokens: int, keep_rate: float | None = None) -> int | None:
        """How many of `num_tokens` non-CLS tokens this block keeps in a pass at `keep_rate` (None: its own
        rate), or None if it keeps them all and does not reorganize. The one place of the per-block rule."""
        rate = self.keep_rate if (keep_rate is None or self.keep_rate >= 1) else keep_rate
        k = num_kept(num_tokens, rate)
        return k if k < num_tokens else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kept_count(x.shape[1] - 1, self.pass_state.keep_rate)
        attn_out, cls_attn = self.attn(self.norm1(x), return_cls_attn=k is not None)
        x = x + self.drop_path1(self.ls1(attn_out))
        if k is not None:
            x, kept_idx = reorganize_tokens(x, cls_attn, k, self.fuse_token)
            if self.pass_state.kept is not None:
                self.pass_state.kept[self] = kept_idx  # set, not appended: a checkpointed re-run overwrites it
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def reorganize_tokens(x: torch.Tensor, cls_attn: torch.Tensor, k: int, fuse_token: bool):
    """Keep the CLS token and the `k` most attended tokens of `x`; optionally fuse the rest into one.

    x: (B, N, C) with CLS first; cls_attn: (B, N-1) head-averaged CLS attention to the non-CLS tokens.
    Returns the (B, 1 + k [+ 1], C) tokens and the (B, k) kept indices, best first.
    """
    others = x[:, 1:]
    kept_idx = cls_attn.topk(k, dim=1, largest=True, sorted=True).indices
    kept = others.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    parts = [x[:, :1], kept]
    if fuse_token:
        weights = cls_attn.scatter(1, kept_idx, 0.0).unsqueeze(1)  # zero the kept tokens' weights
        parts.append(weights @ others)  # (B, 1, C): one batched matrix-vector product (autocast casts both)
    return torch.cat(parts, dim=1), kept_idx


class EViT(TokenReducer, VisionTransformer):
    """timm `VisionTransformer` with EViT token reorganization in the blocks listed in `drop_loc`."""

    pass_parameter = "keep_rate"

    def __init__(
        self,
        *args,
        keep_rate: float = 1.0,
        fuse_token: bool = False,
        drop_loc: Sequence[int] = DEFAULT_DROP_LOC,
        **kwargs,
    ):
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        super().__init__(*args, block_fn=EViTBlock, **kwargs)
        self.drop_loc = block_indices("drop_loc", drop_loc, len(self.blocks))
        if self.num_prefix_tokens != 1 or self.cls_token is None:
            raise ValueError("EViT needs exactly one prefix token, the CLS token (no register tokens)")
        self.fuse_token = fuse_token
        self.pass_state = PassState()
        for i, block in enumerate(self.blocks):
            block.keep_rate = keep_rate if i in self.drop_loc else 1.0
            block.fuse_token = fuse_token
            block.pass_state = self.pass_state
        self._keep_rate = keep_rate

    @property
    def keep_rate(self) -> float:
        """The target keep rate of the reorganizing blocks."""
        return self._keep_rate

    def token_counts(self, num_patches: int | None = None, keep_rate: float | None = None) -> list[BlockTokens]:
        """Tokens through each block in a pass at `keep_rate` (None: the blocks' own rates), by the rule the
        blocks apply in `forward`; `num_patches` defaults to the model's patch grid."""
        n = (num_patches or self.patch_embed.num_patches) + 1
        counts = []
        for block in self.blocks:
            k = block.kept_count(n - 1, keep_rate)
            n_out = n if k is None else 1 + k + int(block.fuse_token)  # [CLS, kept..., (fused)]
            counts.append(BlockTokens(n, n_out, k is not None, k is not None and block.fuse_token))
            n = n_out
        return counts

    def extra_macs(self, tokens: BlockTokens) -> int:
        """A reorganizing block's CLS attention row, and the weighted sum of its fused token."""
        dim = self.embed_dim
        return tokens.reorganized * tokens.attn * dim + tokens.fused * (tokens.attn - 1) * dim

    def _start_pass(self, keep_rate: float | None, record_kept: bool = False) -> None:
        self.pass_state.keep_rate = keep_rate
        self.pass_state.kept = {} if record_kept else None

    def forward_features(self, x: torch.Tensor, keep_rate: float | None = None, return_kept: bool = False):
        """Tokens after the final norm; with `return_kept`, also the kept patches per reorganizing block.

        timm's feature loop runs the blocks (and checkpoints them if `set_grad_checkpointing`); this only
        sets the pass's state. The kept patches are (B, k) indices into the original patch grid
        (row-major), -1 for a fused token kept from an earlier block.
        """
        self._start_pass(keep_rate, record_kept=return_kept)
        x = super().forward_features(x)
        return (x, self._kept_patches()) if return_kept else x

    def _kept_patches(self) -> list[torch.Tensor]:
        """The kept indices the blocks recorded in this pass, mapped back to original patch positions."""
        positions = None
        kept = []
        for block in self.blocks:
            kept_idx = self.pass_state.kept.get(block)
            if kept_idx is None:
                continue
            if positions is None:
                positions = torch.arange(self.patch_embed.num_patches, device=kept_idx.device)
                positions = positions.expand(kept_idx.shape[0], -1)
            positions = positions.gather(1, kept_idx)
            kept.append(positions)
            if block.fuse_token:
                positions = torch.cat([positions, positions.new_full((positions.shape[0], 1), -1)], dim=1)
        return kept

    def forward(self, x: torch.Tensor, keep_rate: float | None = None, return_kept: bool = False):
        if return_kept:
            x, kept = self.forward_features(x, keep_rate, return_kept=True)
            return self.forward_head(x), kept
        return self.forward_head(self.forward_features(x, keep_rate))


# Pretrained tags initialize from the DeiT releases (EViT fine-tunes from DeiT); official EViT
# checkpoints are plain files, loaded with `evit.checkpoint.load_pretrained`.
default_cfgs = generate_default_cfgs({
    "evit_deit_tiny_patch16_224.fb_in1k": deit_cfg("timm/deit_tiny_patch16_224.fb_in1k"),
    "evit_deit_small_patch16_224.fb_in1k": deit_cfg("timm/deit_small_patch16_224.fb_in1k"),
    "evit_deit_base_patch16_224.fb_in1k": deit_cfg("timm/deit_base_patch16_224.fb_in1k"),
    "evit_deit_small_patch16_256.fb_in1k": deit_cfg(
        "timm/deit_small_patch16_224.fb_in1k", input_size=(3, 256, 256), crop_pct=1.0
    ),
    "evit_deit_small_patch16_272.fb_in1k": deit_cfg(
        "timm/deit_small_patch16_224.fb_in1k", input_size=(3, 272, 272), crop_pct=1.0
    ),
    "evit_deit_small_patch16_288.fb_in1k": deit_cfg(
        "timm/deit_small_patch16_224.fb_in1k", input_size=(3, 288, 288), crop_pct=1.0
    ),
    "evit_deit_small_patch16_304.fb_in1k": deit_cfg(
        "timm/deit_small_patch16_224.fb_in1k", input_size=(3, 304, 304), crop_pct=1.0
    ),
})


def _create_evit(variant: str, pretrained: bool = False, **kwargs) -> EViT:
    return build_reducer(EViT, variant, pretrained, **kwargs)


@register_model
def evit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> EViT:
    """EViT-DeiT-Ti at 224 px; keep_rate / fuse_token / drop_loc as kwargs."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_evit("evit_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> EViT:
    """EViT-DeiT-S at 224 px; keep_rate / fuse_token / drop_loc as kwargs."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("evit_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> EViT:
    """EViT-DeiT-B at 224 px; keep_rate / fuse_token / drop_loc as kwargs."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_evit("evit_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_small_patch16_256(pretrained: bool = False, **kwargs) -> EViT:
    """EViT-DeiT-S at 256 px; keep_rate / fuse_token / drop_loc as kwargs."""
    model_args = dict(img_size=256, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("evit_deit_small_patch16_256", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_small_patch16_272(pretrained: bool = False, **kwargs) -> EViT:
    """EViT-DeiT-S at 272 px; keep_rate / fuse_token / drop_loc as kwargs."""
    model_args = dict(img_size=272, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("evit_deit_small_patch16_272", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_small_patch16_288(pretrained: bool = False, **kwargs) -> EViT:
    """EViT-DeiT-S at 288 px; keep_rate / fuse_token / drop_loc as kwargs."""
    model_args = dict(img_size=288, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("evit_deit_small_patch16_288", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_small_patch16_304(pretrained: bool = False, **kwargs) -> EViT:
    """EViT-DeiT-S at 304 px; keep_rate / fuse_token / drop_loc as kwargs."""
    model_args = dict(img_size=304, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("evit_deit_small_patch16_304", pretrained=pretrained, **dict(model_args, **kwargs))
