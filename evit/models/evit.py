"""EViT: DeiT/ViT with attentive-token keeping and inattentive-token fusion (Liang et al., ICLR 2022).

Built on timm's `VisionTransformer`: only the attention (to also expose the CLS attention row), the block
(to reorganize tokens between attention and MLP) and the feature loop (to thread the keep rate through)
are ours. With every keep rate at 1 the model is timm's ViT, weight for weight and logit for logit.

A reorganizing block, after attention and before the MLP:
  1. scores each non-CLS token by the CLS query's post-softmax attention to it, averaged over heads;
  2. keeps the k = ceil(keep_rate * (N - 1)) best-scored tokens;
  3. with `fuse_token`, appends ONE token: the rest, summed with their (not renormalized) scores as weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

DEFAULT_DROP_LOC = (3, 6, 9)


def num_kept(num_tokens: int, keep_rate: float) -> int:
    """Number of non-CLS tokens a block with `keep_rate` keeps out of `num_tokens`."""
    return math.ceil(keep_rate * num_tokens)


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
    """A timm `Block` that may reorganize its tokens between attention and MLP.

    `keep_rate` < 1 makes it a reorganizing block; the rate used in a forward pass can be overridden
    (the training schedule), but a block whose own rate is 1 never prunes.
    """

    def __init__(self, *args, keep_rate: float = 1.0, fuse_token: bool = False, **kwargs):
        kwargs["attn_layer"] = EViTAttention
        super().__init__(*args, **kwargs)
        self.keep_rate = keep_rate
        self.fuse_token = fuse_token

    def forward(self, x: torch.Tensor, keep_rate: float | None = None):
        """Returns the new tokens and, if it reorganized, the kept indices into the incoming non-CLS tokens."""
        rate = self.keep_rate if (keep_rate is None or self.keep_rate >= 1) else keep_rate
        k = num_kept(x.shape[1] - 1, rate)
        reorganize = k < x.shape[1] - 1
        attn_out, cls_attn = self.attn(self.norm1(x), return_cls_attn=reorganize)
        x = x + self.drop_path1(self.ls1(attn_out))
        kept_idx = None
        if reorganize:
            x, kept_idx = reorganize_tokens(x, cls_attn, k, self.fuse_token)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, kept_idx


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
        parts.append(weights.to(others.dtype) @ others)  # (B, 1, C): one batched matrix-vector product
    return torch.cat(parts, dim=1), kept_idx


class EViT(VisionTransformer):
    """timm `VisionTransformer` with EViT token reorganization in the blocks listed in `drop_loc`."""

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
        depth = len(self.blocks)
        bad = [i for i in drop_loc if not 0 <= i < depth]
        if bad:
            raise ValueError(f"drop_loc {list(drop_loc)} has blocks {bad} outside 0..{depth - 1}")
        if self.num_prefix_tokens != 1 or self.cls_token is None:
            raise ValueError("EViT needs exactly one prefix token, the CLS token (no register tokens)")
        self.drop_loc = tuple(sorted(drop_loc))
        self.fuse_token = fuse_token
        for i, block in enumerate(self.blocks):
            block.keep_rate = keep_rate if i in self.drop_loc else 1.0
            block.fuse_token = fuse_token
        self._keep_rate = keep_rate

    @property
    def keep_rate(self) -> float:
        """The target keep rate of the reorganizing blocks."""
        return self._keep_rate

    def forward_features(self, x: torch.Tensor, keep_rate: float | None = None, return_kept: bool = False):
        """Tokens after the final norm; with `return_kept`, also the kept patches per reorganizing block.

        The kept patches are (B, k) indices into the original patch grid (row-major), -1 for a fused
        token kept from an earlier block.
        """
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        positions = None
        kept = []
        for block in self.blocks:
            x, kept_idx = block(x, keep_rate)
            if kept_idx is not None and return_kept:
                if positions is None:
                    positions = torch.arange(self.patch_embed.num_patches, device=x.device).expand(x.shape[0], -1)
                positions = positions.gather(1, kept_idx)
                kept.append(positions)
                if block.fuse_token:
                    positions = torch.cat([positions, positions.new_full((x.shape[0], 1), -1)], dim=1)
        x = self.norm(x)
        return (x, kept) if return_kept else x

    def forward(self, x: torch.Tensor, keep_rate: float | None = None, return_kept: bool = False):
        if return_kept:
            x, kept = self.forward_features(x, keep_rate, return_kept=True)
            return self.forward_head(x), kept
        return self.forward_head(self.forward_features(x, keep_rate))


def _cfg(hf_hub_id: str = "", **kwargs):
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


# Pretrained tags initialize from the DeiT releases (EViT fine-tunes from DeiT); official EViT
# checkpoints are plain files, loaded with `evit.checkpoint.load_pretrained`.
default_cfgs = generate_default_cfgs({
    "evit_deit_tiny_patch16_224.fb_in1k": _cfg("timm/deit_tiny_patch16_224.fb_in1k"),
    "evit_deit_small_patch16_224.fb_in1k": _cfg("timm/deit_small_patch16_224.fb_in1k"),
    "evit_deit_base_patch16_224.fb_in1k": _cfg("timm/deit_base_patch16_224.fb_in1k"),
    **{
        f"evit_deit_small_patch16_{size}.fb_in1k": _cfg(
            "timm/deit_small_patch16_224.fb_in1k", input_size=(3, size, size), crop_pct=1.0
        )
        for size in (256, 272, 288, 304)
    },
})

ARCH_ARGS = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def _create_evit(variant: str, pretrained: bool = False, **kwargs) -> EViT:
    return build_model_with_cfg(
        EViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


def _register(size: str, img_size: int):
    name = f"evit_deit_{size}_patch16_{img_size}"

    def create(pretrained: bool = False, **kwargs) -> EViT:
        args = dict(ARCH_ARGS[size], img_size=img_size)
        return _create_evit(name, pretrained=pretrained, **dict(args, **kwargs))

    create.__name__ = name
    create.__qualname__ = name
    create.__doc__ = f"EViT-DeiT-{size[0].upper()} at {img_size} px; keep_rate/fuse_token/drop_loc as kwargs."
    create.__module__ = __name__
    globals()[name] = register_model(create)


for _size in ("tiny", "small", "base"):
    _register(_size, 224)
for _img in (256, 272, 288, 304):
    _register("small", _img)
