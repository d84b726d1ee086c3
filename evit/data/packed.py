"""Packed datasets (``data.format: packed``): each split of an ``imagenet`` / ``folder`` dataset as a few large
shard files plus an index, for file systems that serve a million small files poorly (Lustre, GPFS). `evit pack`
writes one (`pack_dataset`); `PackedDataset` reads it as `evit.data.datasets.ImageFolderDataset` reads the folder:
the same classes, samples in the same order with the same labels, the same decoded images.

A pack is laid out like its folder, one directory per split, so ``data.root`` points at the pack::

    PACK/train/pack.json        {"format": "evit-pack", "version": 1, "dataset": ..., "num_samples": N,
                                 "classes": [...], "shards": [{"file": "shard-00000.bin", "bytes": B}, ...]}
    PACK/train/index.npy        one row per sample, in the folder's order (`INDEX_DTYPE`): its shard, offset and
                                length there, its label and the image's width and height
    PACK/train/names.txt        each sample's file, relative to the folder's split directory (one per line)
    PACK/train/shard-00000.bin  the samples' files as they were (encoded bytes), concatenated in index order
    PACK/val/...

Opening a split checks, without reading the shards, that every shard is there with its size in pack.json and
that the index tiles the shards exactly (each sample starts where the one before it in its shard ends; each
shard's samples add up to its size): a truncated or missing shard, or an index of another pack, is one
`DatasetError` naming the file. Samples are read with one ``pread`` each, on descriptors each process opens
on first use (DataLoader workers included). Imports no torch: the workflow's dry run checks a pack.
"""
from __future__ import annotations

import collections
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from evit.errors import ConfigError, DatasetError, ImageError

FORMAT, VERSION = "evit-pack", 1
META, INDEX, NAMES = "pack.json", "index.npy", "names.txt"
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("label", "<i4"),
                        ("width", "<u4"), ("height", "<u4")])
DEFAULT_SHARD_MB = 1024
LAYOUT = "PACK/{train,val}/ with pack.json, index.npy, names.txt and shard-*.bin, as `evit pack` writes them"


class PackedDataset:
    """One split of a pack (``PACK/<split>``); items are ``(PIL RGB image, label)`` as from the folder it was
    packed from. ``encoded(i)`` gives sample ``i``'s file bytes and label, ``image_size(i)`` its (width, height)."""

    def __init__(self, root: str | Path, split: str, dataset: str = "folder"):
        self.root = Path(root) / split
        meta = read_meta(Path(root), split, dataset)
        self.classes: list[str] = meta["classes"]
        self.shards = [self.root / s["file"] for s in meta["shards"]]
        self.index = read_index(self.root, meta)
        self.targets: list[int] = self.index["label"].tolist()
        self._samples: list[tuple[str, int]] | None = None
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        data, label = self.encoded(i)
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), label

    def encoded(self, i: int) -> tuple[bytes, int]:
        """Sample ``i``'s encoded image (its file's bytes) and label."""
        row = self.index[i]
        shard, offset, length = int(row["shard"]), int(row["offset"]), int(row["length"])
        data = os.pread(self._fd(shard), length, offset)
        if len(data) != length:
            raise DatasetError(f"{self.shards[shard]}: truncated since the pack was opened (sample {i} needs "
                               f"{length} bytes at offset {offset}, {len(data)} there); repack it with `evit pack`")
        return data, int(row["label"])

    def image_size(self, i: int) -> tuple[int, int]:
        """Sample ``i``'s (width, height), from the index."""
        return int(self.index["width"][i]), int(self.index["height"][i])

    @property
    def samples(self) -> list[tuple[str, int]]:
        """Each sample's ``(file relative to the folder's split directory, label)``, as the folder lists them."""
        if self._samples is None:
            names = (self.root / NAMES).read_text().splitlines()
            if len(names) != len(self):
                raise DatasetError(f"{self.root / NAMES}: {len(names)} names for the index's {len(self)} samples")
            self._samples = list(zip(names, self.targets))
        return self._samples

    def describe(self, i: int) -> str:
        return f"{self.samples[i][0]} in the pack {self.root} (index {i})"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():        # a forked worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getstate__(self) -> dict:         # a spawned worker opens its own descriptors
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


def read_meta(root: Path, split: str, dataset: str) -> dict:
    """``root/split/pack.json``, checked: a pack of ``dataset``, every shard present at its size."""
    d = root / split
    path = d / META
    if not path.is_file():
        where = (f"the {dataset} dataset root {root} does not exist" if not root.is_dir() else
                 f"no {split}/ directory in {root}" if not d.is_dir() else f"no {META} in {d}")
        raise DatasetError(f"data.format packed: {where}; expected the layout {LAYOUT}")
    try:
        meta = json.loads(path.read_text())
        ok = (meta["format"], meta["version"]) == (FORMAT, VERSION) and {"dataset", "classes", "shards"} <= set(meta)
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise DatasetError(f"{path}: not an {FORMAT} version {VERSION} file; repack the dataset with `evit pack`")
    if meta["dataset"] != dataset:
        raise DatasetError(f"{path}: a pack of the {meta['dataset']} dataset, not of data.dataset {dataset}")
    for shard in meta["shards"]:
        f = d / shard["file"]
        size = f.stat().st_size if f.is_file() else None
        if size != shard["bytes"]:
            state = "is missing" if size is None else "is truncated" if size < shard["bytes"] else "is too long"
            raise DatasetError(f"{f}: the shard {state} ({size or 0} bytes, {META} says {shard['bytes']}); "
                               "repack the dataset with `evit pack`")
    return meta


def read_index(d: Path, meta: dict) -> np.ndarray:
    """``d/index.npy``, checked against ``meta``'s shards: their samples in order, end to end, filling each."""
    path = d / INDEX
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the pack's index ({e}); repack the dataset with `evit pack`") from None
    if index.dtype != INDEX_DTYPE or index.ndim != 1 or len(index) != meta["num_samples"]:
        raise DatasetError(f"{path}: does not match its {META} ({len(index)} rows of {index.dtype}, expected "
                           f"{meta['num_samples']} of {INDEX_DTYPE}); repack the dataset with `evit pack`")
    shard, offset, length = (index[k].astype(np.int64) for k in ("shard", "offset", "length"))
    sizes = np.array([s["bytes"] for s in meta["shards"]], dtype=np.int64)
    ends = np.cumsum(length)
    first = np.searchsorted(shard, shard) if len(index) else shard       # each sample's shard's first sample
    expected = ends - length - (ends - length)[first]
    bad = np.flatnonzero((shard >= len(sizes)) | (np.diff(shard, prepend=0) < 0) | (offset != expected))
    if not bad.size:
        filled = np.bincount(shard, weights=length, minlength=len(sizes)).astype(np.int64)
        bad_shards = np.flatnonzero(filled != sizes)
        if bad_shards.size:
            k = int(bad_shards[0])
            raise DatasetError(f"{path}: does not match its shards: its samples in {meta['shards'][k]['file']} "
                               f"add up to {filled[k]} bytes, the shard has {sizes[k]}; an index of another pack? "
                               "Repack the dataset with `evit pack`")
        return index
    i = int(bad[0])
    raise DatasetError(f"{path}: does not match its shards: sample {i} lies in shard {shard[i]} at offset {offset[i]}, "
                       f"where the samples before it put it at {expected[i]}; an index of another pack? Repack the "
                       "dataset with `evit pack`")


def check_pack(root: str | Path, dataset: str, splits: Sequence[str] = ("train", "val")) -> None:
    """The workflow's dry-run check of a pack: each split's files, sizes and index (no shard is read)."""
    for split in splits:
        read_index(Path(root) / split, read_meta(Path(root), split, dataset))


# --------------------------------------------------------------------------------------------- writing


def pack_dataset(root: str | Path, out: str | Path, dataset: str = "folder", shard_mb: int = DEFAULT_SHARD_MB,
                 splits: Sequence[str] = ("train", "val"), threads: int = 8, every_s: float = 5.0) -> dict:
    """Pack the ``splits`` of the ``dataset`` (imagenet / folder) folder at ``root`` into ``out`` (one directory
    per split, written as ``<split>.partial`` and renamed when whole). Returns each split's figures."""
    from evit.data.datasets import ImageFolderDataset

    out = Path(out)
    if shard_mb < 1:
        raise ConfigError(f"--shard-size-mb: {shard_mb}; give at least 1 (MiB)")
    for split in splits:
        if (out / split).exists():
            raise ConfigError(f"--out: {out / split} already exists; remove it or pack into another directory")
    figures = {}
    for split in splits:
        folder = ImageFolderDataset(root, split, dataset=dataset)
        figures[split] = _write_split(folder, Path(root) / split, out, split, dataset, shard_mb << 20, threads,
                                      every_s)
        PackedDataset(out, split, dataset)        # what was written opens
    return figures


def _write_split(folder, src: Path, out: Path, split: str, dataset: str, shard_bytes: int, threads: int,
                 every_s: float) -> dict:
    tmp = out / f"{split}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        index, shards = _write_shards(folder, tmp, split, shard_bytes, threads, every_s)
        np.save(tmp / INDEX, index)
        (tmp / NAMES).write_text("".join(f"{Path(p).relative_to(src).as_posix()}\n" for p, _ in folder.samples))
        (tmp / META).write_text(json.dumps({"format": FORMAT, "version": VERSION, "dataset": dataset,
                                            "num_samples": len(folder), "classes": list(folder.classes),
                                            "shards": shards}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out / split)
    return {"images": len(folder), "shards": len(shards), "bytes": sum(s["bytes"] for s in shards),
            "seconds": round(time.perf_counter() - t0, 2)}


def _write_shards(folder, tmp: Path, split: str, shard_bytes: int, threads: int,
                  every_s: float) -> tuple[np.ndarray, list[dict]]:
    """The folder's files into ``tmp/shard-*.bin``, in order: the index and the shards' sizes."""
    from evit.progress import log

    index = np.zeros(len(folder), dtype=INDEX_DTYPE)
    shards: list[dict] = []
    shard_file, t0, last = None, time.perf_counter(), time.perf_counter()
    try:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="evit-pack-read") as pool:
            for i, (data, size) in enumerate(_read_ahead(pool, [p for p, _ in folder.samples], 4 * max(1, threads))):
                if not shards or (shards[-1]["bytes"] and shards[-1]["bytes"] + len(data) > shard_bytes):
                    if shard_file:
                        shard_file.close()
                    shards.append({"file": f"shard-{len(shards):05d}.bin", "bytes": 0})
                    shard_file = open(tmp / shards[-1]["file"], "wb")
                index[i] = (len(shards) - 1, shards[-1]["bytes"], len(data), folder.targets[i], *size)
                shard_file.write(data)
                shards[-1]["bytes"] += len(data)
                if time.perf_counter() - last >= every_s:
                    last = time.perf_counter()
                    log(f"pack {split}: {i + 1}/{len(folder)} images, {(i + 1) / (last - t0):.0f} img/s, "
                        f"{sum(s['bytes'] for s in shards) / (last - t0) / 1e6:.1f} MB/s")
    finally:
        if shard_file:
            shard_file.close()
    return index, shards


def _read_ahead(pool: ThreadPoolExecutor, paths: Sequence[str], depth: int):
    """`_read_image` of each path in order, at most ``depth`` read ahead (the rest waits, not in memory)."""
    pending = collections.deque()
    for path in paths:
        pending.append(pool.submit(_read_image, path))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _read_image(path: str) -> tuple[bytes, tuple[int, int]]:
    """A file's bytes and its image's (width, height) from its header (an `ImageError` naming it if not an image)."""
    from PIL import Image

    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            return data, img.size
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is named
        raise ImageError(f"cannot pack {path}: not an image PIL opens ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------- CLI


def _cmd_pack(args) -> int:
    figures = pack_dataset(args.root, args.out, args.dataset, args.shard_size_mb, args.split or ("train", "val"),
                           args.threads)
    for split, f in figures.items():
        print(f"{args.out}/{split}: {f['images']} images in {f['shards']} shard(s), {f['bytes'] / 1e6:.1f} MB, "
              f"{f['seconds']:.1f} s ({f['images'] / max(f['seconds'], 1e-9):.0f} img/s)")
    print(f"train from it with data.root: {args.out} and data.format: packed")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("pack", description="Write an imagenet / folder dataset as a pack (data.format: packed): per "
                                           "split, a few large shard files of the images' bytes plus an index.")
    p.add_argument("--dataset", choices=("imagenet", "folder"), required=True)
    p.add_argument("--root", required=True, help="the dataset's folder (ROOT/{train,val}/<class>/<image>)")
    p.add_argument("--out", required=True, help="the pack's directory (OUT/{train,val}/); point data.root at it")
    p.add_argument("--shard-size-mb", type=int, default=DEFAULT_SHARD_MB, help="largest shard, in MiB")
    p.add_argument("--split", action="append", choices=("train", "val"), help="a split to pack (default: both)")
    p.add_argument("--threads", type=int, default=8, help="threads reading the source files")
    p.set_defaults(func=_cmd_pack)
