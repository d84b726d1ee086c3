"""The object boxes of the masking experiment: ImageNet's validation boxes, read from the ILSVRC2012 bounding-box
XML folder (``mask.boxes_format: xml``: one ``ILSVRC2012_val_*.xml`` per image, as in
``ILSVRC2012_bbox_val_v3.tgz``) or from Kaggle's ``LOC_val_solution.csv`` (``csv``: ``ImageId,PredictionString``,
the string holding ``wnid xmin ymin xmax ymax`` per box). Torch-free: the workflow checks the file while it builds
the DAG, and a missing or malformed one is one `ConfigError` naming it.
"""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

from evit.config.masking import resolve_mask
from evit.errors import ConfigError
Box = tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in the original image's pixels


def read_boxes(path: str | Path, fmt: str, limit: int | None = None) -> dict[str, list[Box]]:
    """Image id (the file stem, e.g. ``ILSVRC2012_val_00000001``) -> its boxes, for ``fmt`` in
    `evit.config.masking.BOX_FORMATS`; ``limit``: read only that many images (the DAG-time check of an XML folder)."""
    path = Path(path)
    if fmt == "xml":
        files = sorted(path.glob("*.xml")) if path.is_dir() else []
        if not files:
            raise ConfigError(f"mask.boxes: {path} is not a folder of ILSVRC2012 bounding-box XML files "
                              "(boxes_format: xml; e.g. the val/ folder of ILSVRC2012_bbox_val_v3.tgz)")
        return {f.stem: _xml_boxes(f) for f in files[:limit]}
    if not path.is_file():
        raise ConfigError(f"mask.boxes: {path} does not exist (boxes_format: csv, a LOC_val_solution.csv)")
    boxes = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        if next(rows, None) != ["ImageId", "PredictionString"]:
            raise ConfigError(f"mask.boxes: {path} is not a LOC_val_solution.csv (its header is not "
                              "ImageId,PredictionString)")
        for line, row in enumerate(rows, start=2):
            fields = row[1].split() if len(row) == 2 else []
            try:
                if not fields or len(fields) % 5:
                    raise ValueError
                boxes[row[0]] = [tuple(float(v) for v in fields[i + 1:i + 5]) for i in range(0, len(fields), 5)]
            except ValueError:
                raise ConfigError(f"mask.boxes: {path} line {line}: expected ImageId,'wnid xmin ymin xmax ymax "
                                  f"...', got {','.join(row)!r}") from None
            if limit is not None and len(boxes) >= limit:
                break
    if not boxes:
        raise ConfigError(f"mask.boxes: {path} holds no boxes")
    return boxes


def _xml_boxes(path: Path) -> list[Box]:
    try:
        objects = ET.parse(path).getroot().findall("object")
        boxes = [tuple(float(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")) for o in objects]
    except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
        why = e if isinstance(e, ET.ParseError) else "a box lacks a number"
        raise ConfigError(f"mask.boxes: {path} is not an ILSVRC2012 bounding-box file ({why})") from None
    if not boxes:
        raise ConfigError(f"mask.boxes: {path} has no <object><bndbox>")
    return boxes


def check_mask(section: dict | None) -> dict:
    """The masking options resolved, and their box file read far enough to find it missing or malformed (an XML
    folder: its first file; a CSV: every row)."""
    opts = resolve_mask(section)
    if opts["boxes"] is not None:
        read_boxes(opts["boxes"], opts["boxes_format"], limit=1 if opts["boxes_format"] == "xml" else None)
    return opts
