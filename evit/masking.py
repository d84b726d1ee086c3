"""The paper's motivation (its Figure 1 and Table 1): the baseline's top-1 on the validation set with a share of
each image's patches masked in three ways — the background (patches outside the object's box), the object (inside
it), and random patches — the same number of patches in each way (`evit launch --command mask`).

A patch belongs to the object when its centre lies in one of the image's boxes, mapped through the evaluation
transform: ImageNet's validation boxes (`evit.boxes`), or, on the demo canvas, the garment's exact square. Each
image gets ``k = min(round(share * N), object patches, background patches)`` masked patches in every way, chosen at
random within the way's region with a seed of (``mask.seed``, image index), so the three ways differ only in where
the patches are. Two ways to mask, both computed:

- ``drop``: the masked patches' tokens leave the sequence, as EViT's pruning does: no token attends to them (an
  additive -inf on their keys in every block), which for a ViT classifying from its CLS token is exactly
  removing them;
- ``zero``: their pixels are set to 0 after normalization (the dataset's mean colour), the tokens stay.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from evit.boxes import read_boxes
from evit.checkpoint import load_pretrained
from evit.errors import ConfigError
from evit.config.io import config_hash
from evit.config.schema import resolve_config
from evit.config.masking import resolve_mask
from evit.data.loaders import num_classes_of, raw_dataset
from evit.data.samplers import subset_indices
from evit.data.seeding import mix_seed
from evit.data.transforms import central_offset, eval_geometry, eval_transform
from evit.distributed import resolve_device
from evit.models.factory import build_model
from evit.provenance import provenance

WAYS = ("background", "object", "random")
MODES = ("drop", "zero")


def object_patches(boxes, img_size: int, patch: int) -> torch.Tensor:
    """(N,) bool: the patches of an ``img_size`` image whose centre lies in one of ``boxes`` (xmin, ymin, xmax,
    ymax in the image's pixels), row-major."""
    grid = img_size // patch
    centre = (torch.arange(grid) + 0.5) * patch
    inside = torch.zeros(grid, grid, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        inside |= ((centre >= y0) & (centre < y1))[:, None] & ((centre >= x0) & (centre < x1))[None, :]
    return inside.flatten()


def choose_masks(obj: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """(3, N) bool masks (background, object, random) of the same number of patches k (see the module)."""
    n = obj.numel()
    k = min(round(share * n), int(obj.sum()), int((~obj).sum()))
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(WAYS), n, dtype=torch.bool)
    for row, region in zip(masks, (~obj, obj, torch.ones_like(obj))):
        where = region.nonzero().squeeze(1)
        row[where[torch.randperm(len(where), generator=g)[:k]]] = True
    return masks


def eval_frame(boxes, width: int, height: int, img_size: int, crop_pct: float):
    """Boxes of a ``width`` x ``height`` image mapped through timm's evaluation transform (`eval_geometry`: the
    shorter side resized to ``floor(img_size / crop_pct)``, then an ``img_size`` centre crop)."""
    (new_h, new_w), (left, top) = eval_geometry(width, height, img_size, crop_pct)
    sx, sy = new_w / width, new_h / height
    return [(x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top) for x0, y0, x1, y1 in boxes]


class MaskedVal(torch.utils.data.Dataset):
    """The val split (or its ``data.val_subset``) as ``(image, label, (3, N) masks)``."""

    def __init__(self, cfg: dict, opts: dict):
        self.cfg, self.opts = cfg, opts
        self.transform = eval_transform(cfg)
        self.raw = raw_dataset(cfg, "val", self.transform)
        self.indices = subset_indices(len(self.raw), cfg["data"]["val_subset"]) or range(len(self.raw))
        m, d = cfg["model"], cfg["data"]
        self.img_size, self.patch = m["img_size"], m["patch_size"] or 16
        if opts["boxes"] is None:
            if not d["canvas"]:
                raise ConfigError("mask.boxes: needed (ImageNet's validation boxes) unless data.canvas places every "
                                  "image at a known square")
            self.boxes = None
        else:
            if d["dataset"] == "fashion_mnist":
                raise ConfigError("mask.boxes: Fashion-MNIST has no box files; set data.canvas instead")
            self.boxes = read_boxes(opts["boxes"], opts["boxes_format"])

    def __len__(self) -> int:
        return len(self.indices)

    def image_boxes(self, i: int, img) -> list:
        """Image ``i``'s boxes in the evaluation frame."""
        if self.boxes is None:  # the demo canvas: the image's exact square, then the resize to img_size
            canvas, (h, w) = self.cfg["data"]["canvas"], img.shape[-2:]
            top, left = central_offset(canvas, h, w, self.cfg["data"]["canvas_step"])
            s = self.img_size / canvas
            return [(left * s, top * s, (left + w) * s, (top + h) * s)]
        stem = Path(self.raw.samples[i][0]).stem
        if stem not in self.boxes:
            raise ConfigError(f"mask.boxes: {self.opts['boxes']} has no box for {stem}")
        return eval_frame(self.boxes[stem], *img.size, self.img_size, self.cfg["eval"]["crop_pct"])

    def __getitem__(self, j: int):
        i = self.indices[j]
        img, target = self.raw[i]
        obj = object_patches(self.image_boxes(i, img), self.img_size, self.patch)
        return self.transform(img), target, choose_masks(obj, self.opts["share"], mix_seed(self.opts["seed"], i))


def masked_inputs(model, images: torch.Tensor, mask: torch.Tensor, mode: str) -> dict:
    """The model's keyword arguments for ``images`` with the (B, N) ``mask``ed patches dropped or zeroed."""
    if mode == "drop":
        bias = torch.zeros(mask.shape[0], 1, 1, model.num_prefix_tokens + mask.shape[1], device=images.device)
        bias[..., model.num_prefix_tokens:].masked_fill_(mask[:, None, None, :].to(images.device), float("-inf"))
        return {"x": images, "attn_mask": bias}
    return {"x": images.masked_fill(patch_pixels(model, mask, images.shape).to(images.device), 0.0)}


def patch_pixels(model, mask: torch.Tensor, shape) -> torch.Tensor:
    """The (B, N) patch ``mask`` as a (B, 1, H, W) pixel mask of images of ``shape``."""
    grid_h, grid_w = model.patch_embed.grid_size
    return mask.view(-1, 1, grid_h, grid_w).repeat_interleave(shape[-2] // grid_h, 2).repeat_interleave(
        shape[-1] // grid_w, 3)


def mask_experiment(checkpoint: str | Path, config: dict, out: str | Path | None = None) -> dict:
    """Top-1 of ``checkpoint`` (a plain ViT/DeiT) unmasked and masked each way in each mode; writes ``out`` (JSON)
    and, with ``mask.figure``, the figure."""
    cfg, opts = resolve_config(config), resolve_mask(config.get("mask"))
    if cfg["model"]["method"] != "none":
        raise ConfigError(f"mask: masks the baseline's patches; model.method is {cfg['model']['method']!r}, not none")
    device = resolve_device(cfg["train"]["device"], 0)
    val = MaskedVal(cfg, opts)
    model = build_model(cfg["model"], num_classes_of(cfg, val.raw))
    if getattr(model, "global_pool", "token") != "token":
        raise ConfigError("mask: the drop mode needs a model that classifies from its CLS token (global_pool token)")
    load_pretrained(model, checkpoint)
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(val, batch_size=cfg["eval"]["batch_size"],
                                         num_workers=cfg["data"]["num_workers"])
    correct = {"none": 0, **{f"{way}_{mode}": 0 for way in WAYS for mode in MODES}}
    masked = 0
    with torch.inference_mode():
        for images, targets, masks in loader:
            images, targets = images.to(device), targets.to(device)
            correct["none"] += int((model(images).argmax(1) == targets).sum())
            for w, way in enumerate(WAYS):
                for mode in MODES:
                    logits = model(**masked_inputs(model, images, masks[:, w], mode))
                    correct[f"{way}_{mode}"] += int((logits.argmax(1) == targets).sum())
            masked += int(masks[:, 0].sum())
    n, num_patches = len(val), masks.shape[-1]
    result = {
        "checkpoint": str(checkpoint), "num_images": n, "num_patches": num_patches, "share": opts["share"],
        "masked_share": masked / (n * num_patches), "boxes": opts["boxes"] or "data.canvas",
        "top1": {key: 100.0 * c / n for key, c in correct.items()}, "meta": cfg.get("meta"),
        "provenance": provenance(config_hash=config_hash(cfg), device=device, world_size=1),
    }
    if opts["figure"] and opts["figure_images"]:
        plot_masking(val, model, opts, result)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot_masking(val: MaskedVal, model, opts: dict, result: dict) -> None:
    """The paper's Figure 1: a few images, each masked the three ways (masked patches grey, the box outlined)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from evit.visualize import pick_images

    mean, std = (torch.tensor(val.cfg["data"][k]).view(-1, 1, 1) for k in ("mean", "std"))
    targets = getattr(val.raw, "targets", None)
    picked = pick_images(SimpleNamespace(targets=None if targets is None else [targets[i] for i in val.indices]),
                         min(opts["figure_images"], len(val)))
    fig = Figure(figsize=(2.0 * (1 + len(WAYS)), 2.0 * len(picked) + 0.7), layout="constrained")
    axes = fig.subplots(len(picked), 1 + len(WAYS), squeeze=False)
    top1 = result["top1"]
    for r, j in enumerate(picked):
        image, _, masks = val[j]
        pic = (image * std + mean).clamp(0, 1)
        panels = [(pic, "image", top1["none"])]
        for w, way in enumerate(WAYS):
            shown = pic.masked_fill(patch_pixels(model, masks[w][None], pic.shape)[0], 0.85)  # masked: light grey
            panels.append((shown, f"{way} masked", top1[f"{way}_drop"]))
        for ax, (panel, name, acc) in zip(axes[r], panels):
            ax.imshow(panel.permute(1, 2, 0).numpy())
            for x0, y0, x1, y1 in val.image_boxes(val.indices[j], val.raw[val.indices[j]][0]):
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="tab:red", lw=1))
            ax.set(xticks=[], yticks=[])
            if r == 0:
                ax.set_title(f"{name}\ntop-1 {acc:.1f} %", fontsize=9)
    fig.suptitle(f"Masking {result['masked_share']:.0%} of the patches (target share {opts['share']:g}; box in red): "
                 f"top-1 over {result['num_images']} val images, tokens dropped", fontsize=9)
    out = Path(opts["figure"])
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out.with_suffix(f".{ext}"), dpi=150, metadata={"CreationDate": None} if ext == "pdf" else None)
