"""`evit check --config CHECKS --out STAMP`: the local job that Snakemake runs before any cluster job
(workflow/rules/check.smk), for what the torch-free dry run cannot see. From the plan's check file
(`evit.workflow.Workflow.check_config`) it

- checks each dataset's layout on disk as the loaders read it (`evit.data.datasets`; a flat ImageNet val/ is
  named with its one-line fix), once per dataset;
- builds each distinct model once, on the meta device (no memory, no weights): an arch timm does not know, or a
  method's block indices outside the model's depth, fail there;
- builds each trained run's augment as its loader will (timm parses ``train.aa``);
- reads each weights file that no job makes (a mapped checkpoint, an init file) and fits it to its model;
- parses every box file of the masking experiment and measures the share its boxes leave masked.

Every problem is one line naming the experiment (or section), the key and the file; all of them are reported
together, and STAMP is written only when there are none.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
import yaml

from evit.boxes import check_mask, read_boxes
from evit.checkpoint import load_pretrained, read_checkpoint, state_dict_of
from evit.config.schema import resolve_config
from evit.data.catalog import FASHION_CLASSES, IMG_EXTENSIONS
from evit.data.datasets import FashionMNIST, build_dataset, check_folder_split
from evit.data.packed import PackedDataset
from evit.data.samplers import subset_indices
from evit.data.transforms import train_transform
from evit.errors import ConfigError, DatasetError, EvitError
from evit.masking import eval_frame, object_patches
from evit.models.factory import build_model

SHARE_FLOOR = 0.5  # the boxes must leave at least this fraction of mask.share masked, on average


class Checks:
    """The checks of one plan; ``problems`` collects one line per failure, each check done once per distinct
    input (a dataset, a model, a weights file)."""

    def __init__(self):
        self.problems: list[str] = []
        self._classes: dict[tuple, int | None] = {}
        self._models: dict[str, torch.nn.Module | None] = {}
        self._weights: dict[str, dict | None] = {}

    def attempt(self, where: str, check, *args):
        """``check(*args)``, a failure of it noted as ``where: <its message>``; None then."""
        try:
            return check(*args)
        except (EvitError, FileNotFoundError) as e:
            self.problems.append(f"{where}: {e}")
            return None

    def num_classes(self, cfg: dict, splits: tuple[str, ...], where: str) -> int | None:
        """The class count of the run's dataset, its splits checked on disk (once per dataset and splits)."""
        d = cfg["data"]
        key = (d["dataset"], d["root"], d["format"], splits)
        if key not in self._classes:
            self._classes[key] = self.attempt(where, dataset_classes, d["dataset"], d["root"], splits, d["format"])
        found, wanted = self._classes[key], cfg["model"]["num_classes"]
        if found is not None and wanted not in (None, found):
            self.problems.append(f"{where}: model.num_classes: {wanted}, but the {d['dataset']} dataset in "
                                 f"{d['root']} has {found} classes")
            return None
        return found if wanted is None else wanted

    def model(self, cfg: dict, num_classes: int, where: str) -> torch.nn.Module | None:
        """The run's model on the meta device, built once per distinct model section and class count."""
        key = json.dumps([cfg["model"], num_classes], sort_keys=True, default=str)
        if key not in self._models:
            section = {**cfg["model"], "kwargs": {"weight_init": "skip", **cfg["model"]["kwargs"]}}  # no init on meta
            with torch.device("meta"):
                self._models[key] = self.attempt(where, build_model, section, num_classes)
        return self._models[key]

    def weights(self, path: str, where: str) -> dict | None:
        """The state dict in ``path``, read once."""
        if path not in self._weights:
            self._weights[path] = self.attempt(where, lambda: state_dict_of(read_checkpoint(path), path))
        return self._weights[path]


def dataset_classes(dataset: str, root: str | None, splits: tuple[str, ...], fmt: str = "folder") -> int:
    """The class count of a dataset whose ``splits`` are laid out as the loaders read them (``fmt``:
    ``data.format``, a folder or its pack)."""
    if dataset == "fashion_mnist":
        for split in splits:
            FashionMNIST(root, split)
        return len(FASHION_CLASSES)
    if not root:
        raise DatasetError(f"{dataset} dataset needs data.root (a directory with train/ and val/)")
    classes = {}
    if fmt == "packed":  # opening a pack checks its shards against its index
        classes = {split: PackedDataset(root, split, dataset=dataset).classes for split in splits}
    for split in splits if fmt == "folder" else ():
        folder = check_folder_split(Path(root), split, dataset)
        classes[split] = sorted(p.name for p in folder.iterdir() if p.is_dir())
        empty = [name for name in classes[split] if not _has_image(folder / name)]
        if empty:
            raise DatasetError(f"{dataset} dataset: {len(empty)} class folder(s) of {folder} hold no image "
                               f"({', '.join(empty[:5])}); every class needs at least one "
                               f"({', '.join(IMG_EXTENSIONS)})")
    if len({tuple(c) for c in classes.values()}) > 1:
        raise DatasetError(f"{dataset} dataset: the class folders of {root}/val differ from those of {root}/train; "
                           "both splits need the same classes")
    return len(next(iter(classes.values())))


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(Path(e.name).suffix.lower() in IMG_EXTENSIONS for e in entries)


def check_run(checks: Checks, name: str, run: dict) -> None:
    """One experiment: its dataset, its model, its augment (trained runs) and the weights file it is given."""
    where = f"experiment {name!r}"
    cfg = checks.attempt(where, resolve_config, run["config"])
    if cfg is None:
        return
    splits = ("train", "val") if run["trained"] else ("val",)
    num_classes = checks.num_classes(cfg, splits, where)
    if run["trained"] and cfg["data"]["loader"] == "torch":
        checks.attempt(where, train_transform, cfg)
    model = checks.model(cfg, num_classes, where) if num_classes else None
    if model is None or not run["weights"]:
        return
    where = f"{where}: {'checkpoints' if run['mapped'] else 'init'}: {run['weights']}"
    state = checks.weights(run["weights"], where)
    if state is None:
        return
    head = state.get("head.weight")
    if not run["trained"] and head is not None and head.shape[0] != num_classes:
        checks.problems.append(f"{where}: a {head.shape[0]}-class head, but the {cfg['data']['dataset']} dataset "
                               f"has {num_classes} classes")
        return
    with warnings.catch_warnings():  # loading into the meta model copies nothing, as wanted: only shapes count
        warnings.filterwarnings("ignore", message=".*non-meta parameter")
        checks.attempt(where, load_pretrained, model, run["weights"], dict(state))


def check_masking(checks: Checks, raw: dict) -> None:
    """The masking job: every box file parsed, and the share of patches its boxes leave masked."""
    cfg = checks.attempt("masking", resolve_config, raw)
    opts = cfg and checks.attempt("masking", check_mask, raw.get("mask"))
    if not opts or opts["boxes"] is None:
        return
    boxes = checks.attempt("masking", read_boxes, opts["boxes"], opts["boxes_format"])
    d = cfg["data"]
    val = boxes and checks.attempt("masking", build_dataset, d["dataset"], d["root"], "val", True, d["format"])
    if val:
        checks.attempt("masking", masked_share, cfg, opts, boxes, val)


def masked_share(cfg: dict, opts: dict, boxes: dict, val) -> float:
    """The mean share of patches the masking job masks (per image: at most its object's and its background's
    patches, `evit.masking.choose_masks`); raises a `ConfigError` naming the images without a box, or those left
    unmasked when the share is far below ``mask.share``."""
    m = cfg["model"]
    patch = m["patch_size"] or 16
    n = (m["img_size"] // patch) ** 2
    want = round(opts["share"] * n)
    chosen = subset_indices(len(val), cfg["data"]["val_subset"]) or range(len(val))
    stems = [Path(val.samples[i][0]).stem for i in chosen]
    missing = [stem for stem in stems if stem not in boxes]
    if missing:
        raise ConfigError(f"mask.boxes: {opts['boxes']} has no box for {len(missing)} val image(s): "
                          f"{', '.join(missing[:5])}")
    masked, unmasked = [], []
    for i, stem in zip(chosen, stems):
        frame = eval_frame(boxes[stem], *val.image_size(i), m["img_size"], cfg["eval"]["crop_pct"])
        obj = int(object_patches(frame, m["img_size"], patch).sum())
        masked.append(min(want, obj, n - obj))
        if masked[-1] == 0:
            unmasked.append(f"{stem} {boxes[stem][0]}")
    share = sum(masked) / (n * len(masked))
    if share < SHARE_FLOOR * opts["share"]:
        raise ConfigError(
            f"mask.boxes: {opts['boxes']}: its boxes leave {share:.1%} of the patches masked, far below mask.share "
            f"{opts['share']:g}; {len(unmasked)} of {len(chosen)} images get no masked patch (their boxes lie "
            f"outside the image, are inverted, or cover it all): {'; '.join(unmasked[:5])}")
    return share


def run_checks(plan: dict) -> list[str]:
    """Every problem of the plan's check file (`evit.workflow.Workflow.check_config`), one line each."""
    checks = Checks()
    for name, run in plan["runs"].items():
        check_run(checks, name, run)
    if plan.get("masking"):
        check_masking(checks, plan["masking"])
    return checks.problems


def _cmd_check(args) -> int:
    plan = yaml.safe_load(Path(args.config).read_text())
    problems = run_checks(plan)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) found before any job is queued ({args.config}):\n"
                          + "\n".join(f"  {p}" for p in problems))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiments": len(plan["runs"]), "masking": bool(plan.get("masking"))}) + "\n")
    print(f"checked {len(plan['runs'])} experiments: no problem; wrote {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check")
    p.add_argument("--config", required=True, help="the plan's check file (results/checks/config.yaml)")
    p.add_argument("--out", required=True, help="the stamp written when every check passes")
    p.set_defaults(func=_cmd_check)
