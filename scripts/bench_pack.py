#!/usr/bin/env python
"""Read throughput per core, a folder dataset against its pack (`evit pack`), with a cold page cache: one thread
reads the encoded bytes of the same random samples (``dataset.encoded(i)``, what both loaders read) from each, and
prints images/s, MB/s and CPU us per image, cold and then warm (the same samples again, now cached).

    .venv/bin/python scripts/bench_pack.py --folder /data/imagenet --pack /data/imagenet-pack --images 5000

Cold: ``--cache drop`` empties the whole page cache before each cold pass (``sync; echo 3 >
/proc/sys/vm/drop_caches``: root); ``--cache fadvise`` (the default when drop_caches is not writable) asks the
kernel to drop the pages of the files read (``posix_fadvise(POSIX_FADV_DONTNEED)`` on each), which leaves the
directories' metadata cached.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import time
from pathlib import Path

from evit.data.datasets import build_dataset

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    """Empty the page cache; False when this process may not."""
    subprocess.run(["sync"], check=True)
    try:
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def evict(paths) -> None:
    """Drop the cached pages of ``paths``."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(dataset, indices) -> dict:
    """Read ``indices`` on this thread: images/s, MB/s and CPU us per image."""
    wall, cpu, size = time.perf_counter(), time.process_time(), 0
    for i in indices:
        size += len(dataset.encoded(i)[0])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"img_s": round(len(indices) / wall, 1), "mb_s": round(size / wall / 1e6, 1),
            "cpu_us_per_img": round(cpu / len(indices) * 1e6, 1), "mean_kb": round(size / len(indices) / 1e3, 1)}


def bench(folder: str, pack: str, dataset: str = "folder", split: str = "train", images: int = 2000,
          cache: str | None = None, seed: int = 0) -> dict:
    """Both formats' figures, cold (by ``cache``: drop / fadvise; None: drop if allowed) and warm."""
    sources = {"folder": build_dataset(dataset, folder, split), "pack": build_dataset(dataset, pack, split,
                                                                                      fmt="packed")}
    indices = random.Random(seed).sample(range(len(sources["folder"])), min(images, len(sources["folder"])))
    files = {"folder": [sources["folder"].samples[i][0] for i in indices], "pack": sources["pack"].shards}
    if cache in (None, "drop"):
        dropped = drop_caches()
        if not dropped and cache == "drop":
            raise SystemExit(f"--cache drop: cannot write {DROP_CACHES} (not root?); use --cache fadvise")
        cache = "drop" if dropped else "fadvise"
    out = {"images": len(indices), "cache": cache}
    for name, ds in sources.items():
        if cache == "drop":
            drop_caches()
        else:
            evict(files[name])
        out[name] = {"cold": read_all(ds, indices), "warm": read_all(ds, indices)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="the dataset's folder (ROOT/{train,val}/<class>/<image>)")
    p.add_argument("--pack", required=True, help="its pack (`evit pack --out`)")
    p.add_argument("--dataset", choices=("imagenet", "folder"), default="folder")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--images", type=int, default=2000, help="random samples read from each")
    p.add_argument("--cache", choices=("drop", "fadvise"), help="how to make the cache cold (default: drop if root)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    res = bench(args.folder, args.pack, args.dataset, args.split, args.images, args.cache, args.seed)
    print(f"{res['images']} random {args.split} images, one thread, page cache emptied by {res['cache']}")
    print(f"{'':8} {'cache':5} {'img/s':>9} {'MB/s':>8} {'CPU us/img':>11} {'KB/img':>7}")
    for name in ("folder", "pack"):
        for state in ("cold", "warm"):
            r = res[name][state]
            print(f"{name:8} {state:5} {r['img_s']:9.0f} {r['mb_s']:8.1f} {r['cpu_us_per_img']:11.1f} "
                  f"{r['mean_kb']:7.1f}")
    print(f"pack / folder, cold: {res['pack']['cold']['img_s'] / res['folder']['cold']['img_s']:.2f}x")
    return res


if __name__ == "__main__":
    main()
