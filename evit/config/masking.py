"""The `mask:` section of a masking job's run config (the paper's Figure 1 / Table 1 experiment): its defaults, and
`resolve_mask`, which checks each key. Imports no torch.
"""
from __future__ import annotations

from evit.errors import ConfigError

BOX_FORMATS = ("xml", "csv")  # of ImageNet's validation boxes (evit/boxes.py)
# The `mask:` section of a masking job's run config (`evit launch --command mask`, evit/masking.py).
MASK_DEFAULTS = dict(
    share=0.5,              # the share of an image's patches masked, the same number in each of the three ways
    boxes=None,             # ImageNet's validation boxes (a file or folder); null: the demo canvas's exact square
    boxes_format="xml",     # xml: the ILSVRC2012 bounding-box XML folder; csv: LOC_val_solution.csv
    seed=0,                 # which patches are masked (per image, whatever the batch or the process)
    figure=None,            # output path without extension of the figure (.png, .pdf); null: none
    figure_images=4,        # images in the figure, each masked the three ways
)


def resolve_mask(section: dict | None) -> dict:
    """The masking options with defaults filled in; an unknown key or bad value is named (`ConfigError`)."""
    if not isinstance(section, dict):
        raise ConfigError(f"mask: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - set(MASK_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown mask key(s) {unknown}; known: {sorted(MASK_DEFAULTS)}")
    opts = {**MASK_DEFAULTS, **section}
    if isinstance(opts["share"], bool) or not isinstance(opts["share"], (int, float)) or not 0 < opts["share"] < 1:
        raise ConfigError(f"mask.share must be a number in (0, 1), got {opts['share']!r}")
    for key in ("seed", "figure_images"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 0:
            raise ConfigError(f"mask.{key} must be a non-negative integer, got {opts[key]!r}")
    if opts["boxes_format"] not in BOX_FORMATS:
        raise ConfigError(f"mask.boxes_format: expected one of {list(BOX_FORMATS)}, got {opts['boxes_format']!r}")
    return opts
