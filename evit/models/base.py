"""What every token-reduction model shares: the `TokenReducer` protocol that generic code (bench, MACs, training,
evaluation) asks (timm's `forward_intermediates` included), `BlockTokens`, token counts and extra MACs of any timm
ViT, the builder and DeiT pretrained config of every method's models, and the check of a method's block indices.

A method's model is a timm `VisionTransformer` subclass that also derives from `TokenReducer`; its torch-free side
(parameters, per-pass override, schedule, labels) is its entry in `evit.methods.METHODS`. A plain timm ViT is the
method none: every block keeps every token, at no extra cost.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn


class BlockTokens(NamedTuple):
    """Tokens through one block in a pass, CLS (and any fused token) included."""

    attn: int  # into attention
    mlp: int  # into the MLP, that is, out of the block
    reorganized: bool
    fused: bool


class TokenReducer:
    """The model side of a method. ``forward(x, **{override: value})`` runs one pass at another value of the method's
    per-pass parameter (`evit.methods.Method.override`, the model's `pass_parameter`); `token_counts`,
    `forward_features` and `forward_intermediates` take the same keyword."""

    pass_parameter: str  # the keyword that overrides the method's parameter for one pass, e.g. "keep_rate"

    def _start_pass(self, value) -> None:
        """Reset the state the blocks share for a pass at `value` (None: the model's own)."""
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor, indices=None, *, output_fmt: str = "NLC", **kwargs):
        """timm's `forward_intermediates`, for a pass at ``kwargs[pass_parameter]`` (None: the model's own); it ends
        at `forward_features`' tokens. NLC by default, not timm's NCHW: tokens pruned, merged or reordered form no
        patch grid, so NCHW is refused for a pass that reorganizes them (timm's reshape would fail, or scramble
        tokens whose count happens to divide)."""
        value = kwargs.pop(self.pass_parameter, None)
        num_patches = math.prod(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        if output_fmt == "NCHW" and any(t.reorganized for t in self.token_counts(num_patches, **{
                self.pass_parameter: value})):
            shown = getattr(self, self.pass_parameter) if value is None else value
            raise ValueError(f"{type(self).__name__}.forward_intermediates: output_fmt='NCHW' needs tokens on their "
                             f"patch grid, and a pass at {self.pass_parameter}={shown} reorganizes them; "
                             "use output_fmt='NLC'")
        self._start_pass(value)
        return super().forward_intermediates(x, indices, output_fmt=output_fmt, **kwargs)

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


def block_indices(name: str, indices: Sequence[int], depth: int, lo: int = 0) -> tuple[int, ...]:
    """`indices` as a tuple if they are increasing block indices in lo..depth-1; else a ValueError naming `name`
    (a repeated block would reorganize once where the run's label counts it twice)."""
    indices = tuple(int(i) for i in indices)
    if list(indices) != sorted(set(indices)) or not all(lo <= i < depth for i in indices):
        raise ValueError(f"{name} must be increasing block indices in {lo}..{depth - 1}, got {list(indices)}")
    return indices


def build_reducer(model_cls: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """A method's model as timm's `_create_vision_transformer` builds a ViT: DeiT/ViT checkpoints through timm's
    filter, and ``features_only=True`` through `forward_intermediates` (feature_cls 'getter', the last 3 blocks
    unless `out_indices`), in NLC: reorganized tokens form no grid."""
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter", output_fmt="NLC")
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **kwargs)


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
