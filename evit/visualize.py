"""`evit visualize`: the paper's Figure 3 — validation images and the patches kept after each reorganizing block.

Pruned patches are masked out; a patch fused into the extra token is pruned like the others.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from evit.errors import ConfigError
from evit.checkpoint import load_pretrained


def kept_patch_masks(model, images: torch.Tensor, keep_rate: float | None = None) -> list[torch.Tensor]:
    """(B, grid_h, grid_w) boolean masks of the original patches still present after each reorganizing block."""
    with torch.inference_mode():
        _, kept = model.eval()(images, keep_rate=keep_rate, return_kept=True)
    grid_h, grid_w = model.patch_embed.grid_size
    masks = []
    for idx in kept:
        mask = torch.zeros(images.shape[0], 1 + grid_h * grid_w, dtype=torch.bool)
        mask.scatter_(1, idx + 1, True)  # a fused token (-1) lands in slot 0, which is dropped: it is no patch
        masks.append(mask[:, 1:].view(-1, grid_h, grid_w))
    return masks


def pick_images(dataset, num_images: int) -> list[int]:
    """Indices of the first image of each class in turn (then the next ones), for a varied figure."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return list(range(num_images))
    picked, seen = [], set()
    for i, t in enumerate(list(targets)):
        if int(t) not in seen:
            picked.append(i)
            seen.add(int(t))
        if len(picked) == num_images:
            return picked
    return (picked + [i for i in range(len(targets)) if i not in picked])[:num_images]


def plot_kept_tokens(images: torch.Tensor, masks: list[torch.Tensor], mean, std, drop_loc, title: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pics = (images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)).clamp(0, 1)
    n, cols = pics.shape[0], 1 + len(masks)
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.7 * n + 0.6), squeeze=False)
    size = pics.shape[-1]
    for r in range(n):
        img = pics[r].permute(1, 2, 0).numpy()
        axes[r, 0].imshow(img)
        for c, mask in enumerate(masks, start=1):
            up = mask[r].float().repeat_interleave(size // mask.shape[1], 0).repeat_interleave(size // mask.shape[2], 1)
            shown = img * up[..., None].numpy() + 0.85 * (1 - up[..., None].numpy())  # pruned -> light grey
            axes[r, c].imshow(shown)
            if r == 0:
                axes[r, c].set_title(f"after block {drop_loc[c - 1] + 1}\n{int(mask[r].sum())} kept", fontsize=8)
            else:
                axes[r, c].set_title(f"{int(mask[r].sum())} kept", fontsize=7)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".png", ".pdf"):
        fig.savefig(out.with_suffix(ext), dpi=150)
        print(f"wrote {out.with_suffix(ext)}")
    plt.close(fig)


def visualize(config_path: str | Path, checkpoint: str | Path, out: str | Path, num_images: int = 6,
              name: str | None = None) -> Path:
    """Draw the kept patches of ``checkpoint`` under the run config at ``config_path``; ``name`` (the
    experiment's) titles the figure, else the arch."""
    from evit.methods import METHODS, describe_method, method_params
    from evit.config.io import load_config
    from evit.config.schema import resolve_config
    from evit.data.loaders import num_classes_of, raw_dataset
    from evit.data.transforms import eval_transform
    from evit.models.factory import build_model

    cfg = resolve_config(load_config(config_path))
    m, d = cfg["model"], cfg["data"]
    if not METHODS[m["method"]].kept_patches:
        raise ConfigError(f"visualize needs a method whose model names the patches it keeps (`Method.kept_patches`: "
                         f"EViT); {config_path} has method {m['method']!r}")
    tf = eval_transform(cfg)
    val = raw_dataset(cfg, "val", tf)
    images = torch.stack([tf(val[i][0]) for i in pick_images(val, num_images)])
    model = build_model(m, num_classes_of(cfg, val))
    load_pretrained(model, checkpoint)
    masks = kept_patch_masks(model, images)
    title = (f"{name or m['arch']} at {m['img_size']} px, {describe_method(m['method'], method_params(m))}: patches "
             "kept after each reorganizing block")
    out = Path(out)
    plot_kept_tokens(images, masks, d["mean"], d["std"], model.drop_loc, title, out)
    return out


def _cmd_visualize(args) -> int:
    visualize(args.config, args.checkpoint, args.out, args.num_images, args.name)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize")
    p.add_argument("--config", required=True, help="the run's config (model and data sections)")
    p.add_argument("--checkpoint", required=True, help="weights to visualize")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--name", help="the experiment's name, for the title (default: the arch)")
    p.add_argument("--out", required=True, help="output path without extension: writes .png and .pdf")
    p.set_defaults(func=_cmd_visualize)
