"""The device half of training's input: `BatchStage` normalizes, erases and mixes whole batches on the training
device, after loader workers decoded, cropped and augmented each image (`evit.data.transforms.train_transform`).
"""
from __future__ import annotations

from typing import Callable

import torch


class BatchStage:
    """The device half of the training input pipeline (timm's `PrefetchLoader` habit): what runs on a whole batch
    on the training device, so that loader workers only decode, crop and augment, and hand over uint8.

    ``stage(images, targets) -> (images, targets)``, in this order:

    1. moves both to ``device`` (non-blocking: pinned batches overlap the copy);
    2. images (B, C, H, W), uint8 in 0..255 or float in [0, 1], C = 1 or 3, become float32 (B, 3, H, W)
       normalized by ``mean`` / ``std`` (``normalize=False``: already normalized float, left as they are);
    3. timm's `RandomErasing` on the normalized batch: per image with probability ``reprob``, one box of
       per-pixel normal noise (DeiT's ``re_mode='pixel', re_count=1``);
    4. timm's `Mixup` / CutMix when ``mixup`` is given; targets (B,) int64 then become soft (B, classes).

    Random draws (steps 3 and 4) come from python's, numpy's and the device's global generators, which
    `evit.engine.train_one_epoch` seeds per step. Any loader can use it: the torch path with `train_transform`,
    and a loader that decodes and normalizes on the device itself (``normalize=False``) for erasing and Mixup.
    """

    def __init__(self, device: torch.device, mean, std, *, reprob: float = 0.0, mixup: Callable | None = None,
                 normalize: bool = True):
        from timm.data.random_erasing import RandomErasing

        self.device, self.mixup, self.normalize = torch.device(device), mixup, normalize
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.erasing = (RandomErasing(reprob, mode="pixel", max_count=1, device=self.device) if reprob > 0
                        else None)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        x = images.to(self.device, non_blocking=non_blocking)
        targets = targets.to(self.device, non_blocking=non_blocking)
        if self.normalize:
            scale = 255.0 if x.dtype == torch.uint8 else 1.0
            x = x.float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = (x - self.mean * scale) / (self.std * scale)
        if self.erasing is not None:
            x = self.erasing(x)
        if self.mixup is not None:
            x, targets = self.mixup(x, targets)
        return x, targets


def batch_stage(cfg: dict, device: torch.device, num_classes: int) -> BatchStage:
    """The device half of a resolved run config's training input (`train_transform` gives the worker half):
    normalization, random erasing (deit augment) and Mixup / CutMix (when ``train.mixup`` or ``train.cutmix``)."""
    from timm.data import Mixup

    d, t = cfg["data"], cfg["train"]
    mixup = (Mixup(mixup_alpha=t["mixup"], cutmix_alpha=t["cutmix"], prob=t["mixup_prob"],
                   switch_prob=t["mixup_switch_prob"], mode="batch", label_smoothing=t["smoothing"],
                   num_classes=num_classes) if t["mixup"] > 0 or t["cutmix"] > 0 else None)
    reprob = t["reprob"] if t["augment"] == "deit" else 0.0
    return BatchStage(device, d["mean"], d["std"], reprob=reprob, mixup=mixup)
