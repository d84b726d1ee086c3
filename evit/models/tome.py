"""ToMe: DeiT/ViT with token merging by bipartite soft matching (Bolya et al., ICLR 2023), on timm.

Built on timm's `VisionTransformer` as `EViT` is: only the attention (to also return the keys averaged over heads,
and to add proportional attention) and the block (to merge tokens between attention and MLP) are ours. Blocks map
tensor -> tensor, so timm's `forward_intermediates` (NLC once tokens merge) and `features_only=True` work; with r = 0
the model is timm's ViT, weight for weight and logit for logit.

A merging block, after attention and before the MLP, with r = min(r, (N - 1) // 2) (N tokens, CLS included, so
the CLS token and at least half of the other tokens remain):
  1. splits the tokens alternately into A (even positions, CLS first) and B (odd positions);
  2. scores each A token by the cosine similarity of its head-averaged key to its most similar B token's, the CLS
     token scoring -inf so that it is never merged;
  3. merges the r best-scored A tokens into their B matches: a size-weighted average, the sizes summed.
The output is [the unmerged A tokens in their order (CLS first), the B tokens in their order].

Proportional attention: every attention adds log(size) of each key to its logits, an additive float mask given to
`F.scaled_dot_product_attention` (so attention stays fused); before any merge there is no mask at all.

What one forward pass needs besides the tokens (the r of each block, the token sizes) lives in one `ToMeState`,
shared by the model and its blocks and reset at the start of each pass. The sizes change as the blocks run, so
gradient checkpointing (which re-runs blocks during backward) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from timm.layers import Attention
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from .base import BlockTokens, TokenReducer, build_reducer, deit_cfg


def merge_count(num_tokens: int, r: int) -> int:
    """Tokens a block asked to merge `r` merges out of `num_tokens` (CLS included): at most (N - 1) // 2."""
    return max(0, min(r, (num_tokens - 1) // 2))


def matching_macs(num_tokens: int, metric_dim: int) -> int:
    """MACs of the matching's similarity matrix, |A| x |B| x metric_dim (the CLS row included, as computed)."""
    return (num_tokens + 1) // 2 * (num_tokens // 2) * metric_dim


@dataclass
class ToMeState:
    """Side information of one forward pass, shared by reference between a `ToMe` model and its blocks."""

    r: list[int] | None = None  # tokens each block is asked to merge; None: no merging
    size: torch.Tensor | None = None  # (B, N): tokens merged into each current token; None: all 1


MASK_ALIGN = 8  # SDPA's memory-efficient CUDA kernel takes a float mask as is if its strides are multiples of 8


def log_size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention's additive mask: log(size) of each key, (B, N) -> (B, 1, 1, N) in `dtype`.

    It is a view of a buffer whose last dimension is padded to a multiple of `MASK_ALIGN`, which makes every stride
    but the last one a multiple of it: SDPA's memory-efficient CUDA kernel then takes the mask as it is (any other
    it copies into a padded buffer at every call).
    """
    B, N = size.shape
    bias = size.new_empty(B, 1, 1, -(-N // MASK_ALIGN) * MASK_ALIGN, dtype=dtype)[..., :N]  # strides: padded N
    return bias.copy_(size.log()[:, None, None, :])


class ToMeAttention(Attention):
    """timm's fused attention with proportional attention (+ log size of each key) that also returns the keys
    averaged over heads, (B, N, head_dim)."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else log_size_bias(size, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.proj(self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim)))
        return self.proj_drop(out), k.mean(dim=1)


def merge_tokens(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """Bipartite soft matching: merge `r` tokens of `x` (B, N, C; CLS first) by their `metric` (B, N, D).

    `size` (B, N) weights the averages and is summed. Returns the (B, N - r, C) tokens and their (B, N - r) sizes.

    Each A token gets its place in the output (an unmerged one: its rank among the unmerged; a merged one: its
    B match's), and one `scatter_add` of the size-weighted tokens, with their sizes as one more channel, builds
    the output. No argsort or sort: two `topk`s pick the merged tokens and order the rest (on CUDA, inductor turns
    sorts into bitonic-network kernels that are slow to compile, and calls aten's topk).
    """
    B, N, C = x.shape
    n_a = (N + 1) // 2
    with torch.no_grad():  # the matching picks indices; gradients flow through the merged tokens only
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # B, |A|, |B| cosine similarities
        scores[:, 0] = -torch.inf  # the CLS token (first of A) is never merged
        best, match = scores.max(dim=-1)  # each A token's best B token
        merged = best.topk(r, dim=-1, sorted=False).indices  # B, r
        a_idx = torch.arange(n_a, device=x.device).expand(B, -1)
        # the unmerged A tokens in their order (CLS first): the n_a - r smallest indices once merged ones are n_a
        unmerged = a_idx.scatter(1, merged, n_a).topk(n_a - r, dim=-1, largest=False).indices
        place = (match + (n_a - r)).scatter(1, unmerged, a_idx[:, :n_a - r])  # B, |A|: each A token's output row

    weighted = torch.cat([x * size[..., None], size[..., None].to(x.dtype)], dim=-1)  # sizes: channel C
    out = F.pad(weighted[:, 1::2], (0, 0, n_a - r, 0))  # rows for the unmerged A tokens, then the B tokens
    out = out.scatter_add(1, place[..., None].expand(-1, -1, C + 1), weighted[:, ::2])
    return out[..., :C] / out[..., C:], out[..., C]


class ToMeBlock(Block):
    """A timm `Block` that merges the r tokens its pass's `ToMeState` asks of it between attention and MLP."""

    def __init__(self, *args, **kwargs):
        kwargs["attn_layer"] = ToMeAttention
        super().__init__(*args, **kwargs)
        self.index = 0  # position in the model; a `ToMe` sets it and shares its state
        self.tome_state = ToMeState()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.tome_state
        attn_out, metric = self.attn(self.norm1(x), size=state.size)
        x = x + self.drop_path1(self.ls1(attn_out))
        r = merge_count(x.shape[1], state.r[self.index] if state.r else 0)
        if r > 0:
            size = state.size if state.size is not None else x.new_ones(x.shape[:2])
            x, state.size = merge_tokens(x, size, metric, r)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ToMe(TokenReducer, VisionTransformer):
    """timm `VisionTransformer` merging `r` tokens per block: one int for every block, or a list, one per block."""

    pass_parameter = "r"

    def __init__(self, *args, r: int | Sequence[int] = 0, **kwargs):
        super().__init__(*args, block_fn=ToMeBlock, **kwargs)
        if self.num_prefix_tokens != 1 or self.cls_token is None:
            raise ValueError("ToMe needs exactly one prefix token, the CLS token (no register tokens)")
        self.tome_state = ToMeState()
        for i, block in enumerate(self.blocks):
            block.index, block.tome_state = i, self.tome_state
        self.r = r

    @property
    def r(self) -> list[int]:
        """Tokens each block is asked to merge (before the cap (N - 1) // 2)."""
        return self._r

    @r.setter
    def r(self, r: int | Sequence[int]) -> None:
        self._r = self._schedule(r)

    def _schedule(self, r: int | Sequence[int] | None) -> list[int]:
        if r is None:
            return self._r
        r = [r] * len(self.blocks) if isinstance(r, int) else [int(x) for x in r]
        if len(r) != len(self.blocks) or min(r) < 0:
            raise ValueError(f"r must be an int >= 0 or {len(self.blocks)} of them, got {r}")
        return r

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError("ToMe does not support gradient checkpointing: token sizes change as blocks run")
        super().set_grad_checkpointing(False)

    def token_counts(self, num_patches: int | None = None, r: int | Sequence[int] | None = None) -> list[BlockTokens]:
        """Tokens through each block in a pass at `r` (None: the model's), by the rule the blocks apply."""
        n = (num_patches or self.patch_embed.num_patches) + 1
        counts = []
        for r_block in self._schedule(r):
            n_out = n - merge_count(n, r_block)
            counts.append(BlockTokens(n, n_out, n_out < n, False))
            n = n_out
        return counts

    def extra_macs(self, tokens: BlockTokens) -> int:
        """A merging block's matching similarities."""
        return matching_macs(tokens.attn, self.blocks[0].attn.head_dim) if tokens.reorganized else 0

    def _start_pass(self, r: int | Sequence[int] | None) -> None:
        self.tome_state.r = self._schedule(r)
        self.tome_state.size = None

    def forward_features(self, x: torch.Tensor, r: int | Sequence[int] | None = None) -> torch.Tensor:
        self._start_pass(r)
        return super().forward_features(x)

    def forward(self, x: torch.Tensor, r: int | Sequence[int] | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, r))


# Pretrained tags initialize from the DeiT releases (ToMe runs off-the-shelf DeiT weights).
default_cfgs = generate_default_cfgs({
    "tome_deit_tiny_patch16_224.fb_in1k": deit_cfg("timm/deit_tiny_patch16_224.fb_in1k"),
    "tome_deit_small_patch16_224.fb_in1k": deit_cfg("timm/deit_small_patch16_224.fb_in1k"),
    "tome_deit_base_patch16_224.fb_in1k": deit_cfg("timm/deit_base_patch16_224.fb_in1k"),
})


def _create_tome(variant: str, pretrained: bool = False, **kwargs) -> ToMe:
    return build_reducer(ToMe, variant, pretrained, **kwargs)


@register_model
def tome_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ToMe:
    """ToMe-DeiT-Ti at 224 px; r as a kwarg."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_tome("tome_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tome_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> ToMe:
    """ToMe-DeiT-S at 224 px; r as a kwarg."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_tome("tome_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tome_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> ToMe:
    """ToMe-DeiT-B at 224 px; r as a kwarg."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_tome("tome_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
