"""The training recipes: the defaults of every recipe-driven train key, one column per recipe, and how the report
names each recipe's training. Imports no torch.
"""
from __future__ import annotations

RECIPE_NAMES = ("none", "scratch", "finetune", "demo")
# One row per train key, one column per recipe (order of RECIPE_NAMES). scratch = DeiT / EViT from scratch
# (EViT's README: 8 GPUs x 256); finetune = EViT's fine-tuning of DeiT-S (8 x 256, lr 2e-5 per 512, 30 epochs,
# shrink 0/0, model in eval mode); demo = small grey images on a CPU (Fashion-MNIST, a few epochs: flips only,
# as random crops slow a ViT's first epochs down a lot; see workflow/config/runs/fashion_vit.yaml; fp32, as
# bf16 autocast is ~1.45x slower per step than fp32 on the CPUs here).
RECIPES: dict[str, tuple] = {
    #  key                 none         scratch                   finetune                  demo
    "epochs":            (100,         300,                      30,                       4),
    "batch_size":        (128,         256,                      256,                      128),
    "blr":               (5e-4,        5e-4,                     2e-5,                     8e-3),
    "min_lr":            (1e-5,        1e-5,                     2e-6,                     1e-5),
    "warmup_lr":         (1e-6,        1e-6,                     1e-6,                     1e-6),
    "warmup_epochs":     (0.0,         5.0,                      0.0,                      0.2),
    "weight_decay":      (0.05,        0.05,                     1e-6,                     0.05),
    "opt":               ("adamw",     "adamw",                  "adamw",                  "adamw"),
    "opt_eps":           (1e-8,        1e-8,                     1e-8,                     1e-8),
    "momentum":          (0.9,         0.9,                      0.9,                      0.9),
    "sched":             ("cosine",    "cosine",                 "cosine",                 "cosine"),
    "clip_grad":         (None,        None,                     None,                     None),
    "hold_eval":         (False,       False,                    True,                     False),
    "mixup":             (0.0,         0.8,                      0.8,                      0.0),
    "cutmix":            (0.0,         1.0,                      1.0,                      0.0),
    "mixup_prob":        (1.0,         1.0,                      1.0,                      1.0),
    "mixup_switch_prob": (0.5,         0.5,                      0.5,                      0.5),
    "smoothing":         (0.0,         0.1,                      0.1,                      0.0),
    "augment":           ("none",      "deit",                   "deit",                   "demo"),
    "aa":                (None,        "rand-m9-mstd0.5-inc1",   "rand-m9-mstd0.5-inc1",   None),
    "reprob":            (0.0,         0.25,                     0.25,                     0.0),
    "color_jitter":      (0.3,         0.3,                      0.3,                      0.3),
    "interpolation":     ("bicubic",   "bicubic",                "bicubic",                "bicubic"),
    "demo_padding":      (2,           2,                        2,                        0),
    "repeated_aug":      (1,           3,                        3,                        1),
    "amp":               ("none",      "bf16",                   "bf16",                   "none"),
}


def recipe_defaults(recipe: str) -> dict:
    col = RECIPE_NAMES.index(recipe)
    return {k: v[col] for k, v in RECIPES.items()}

# How a recipe's weights were trained, in the report's tables.
RECIPE_TRAINING = {"none": "off the shelf", "finetune": "fine-tuned", "scratch": "from scratch", "demo": "from scratch"}
