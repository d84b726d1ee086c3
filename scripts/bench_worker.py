#!/usr/bin/env python
"""Per-core rate of a DataLoader worker's work for the DeiT recipe: before (normalize and erase in the worker,
float32 out) and after (uint8 out; `evit.data.stage.BatchStage` does the rest on the training device), on real
JPEGs.

One process, one thread, rounds interleaved A B A B: read + decode a JPEG (PIL, as torchvision's ImageFolder),
the training transform, and the collate into a batch (what a worker then hands over through shared memory).
Also: decode alone, PIL's JPEG ``draft`` (decode at 1/2 scale), and how often a RandomResizedCrop of the
recipe would let ``draft`` decode at 1/2 scale without upsampling the crop more than before.

    .venv/bin/python scripts/fashion_jpegs.py /tmp/fashion-jpegs --train 512 --val 64
    .venv/bin/python scripts/bench_worker.py /tmp/fashion-jpegs/train
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from evit.benchmark import quartiles
from evit.data.catalog import IMAGENET_MEAN, IMAGENET_STD
from evit.data.seeding import seed_all
from evit.data.transforms import build_transform


def load(path: Path, draft: bool = False) -> Image.Image:
    img = Image.open(path)
    if draft:
        img.draft("RGB", (img.size[0] // 2, img.size[1] // 2))
    return img.convert("RGB")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, help="a directory of JPEGs (searched recursively)")
    p.add_argument("--n", type=int, default=128, help="images per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    paths = sorted(args.images.rglob("*.JPEG"))[: args.n]
    kw = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.25, interpolation="bicubic")
    before = build_transform("deit", True, args.img_size, IMAGENET_MEAN, IMAGENET_STD, **kw)
    after = build_transform("deit", True, args.img_size, IMAGENET_MEAN, IMAGENET_STD, device_stage=True, **kw)

    def worker(tf):
        def run():
            out = []
            for i, path in enumerate(paths):
                seed_all(i)
                out.append(tf(load(path)))
            return torch.stack(out)
        return run

    cases = {"decode": lambda: [load(q) for q in paths], "decode_draft_half": lambda: [load(q, True) for q in paths],
             "worker_before_float": worker(before), "worker_after_uint8": worker(after)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds + 1):                # round 0 warms up
        for name in (list(cases) if r % 2 else list(cases)[::-1]):
            t0 = time.perf_counter()
            cases[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
    res = {name: quartiles([len(paths) / t for t in ts]) for name, ts in times.items()}
    res["after_over_before"] = statistics.median(b / a for a, b in zip(times["worker_after_uint8"],
                                                                       times["worker_before_float"]))
    res["bytes_per_image"] = {"before": 4 * 3 * args.img_size ** 2, "after": 3 * args.img_size ** 2}
    # how often would a draft decode at 1/2 scale keep the crop at least img_size px on both sides?
    from timm.data.transforms import RandomResizedCropAndInterpolation

    rrc = before.transforms[0]
    assert isinstance(rrc, RandomResizedCropAndInterpolation)
    sizes = [Image.open(q).size for q in paths]
    draws = 2000
    ok = 0
    for k in range(draws):
        seed_all(k)
        img = Image.new("RGB", sizes[k % len(sizes)])
        _, _, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
        ok += min(h, w) >= 2 * args.img_size
    res["draft_half_possible_pct"] = 100 * ok / draws
    print(f"{len(paths)} JPEGs of {sizes[0][0]}x{sizes[0][1]} px, {args.rounds} rounds, 1 thread, img/s per core "
          "(median, IQR):")
    for name in cases:
        q1, med, q3 = res[name]
        print(f"  {name:22s} {med:7.1f}  ({q1:.1f} - {q3:.1f})")
    print(f"  worker after / before: {res['after_over_before']:.2f}x (median of paired rounds); handed over per "
          f"image: {res['bytes_per_image']['before'] // 1000} KB float32 -> {res['bytes_per_image']['after'] // 1000}"
          " KB uint8")
    print(f"  RandomResizedCrop draws whose crop is >= {2 * args.img_size} px on both sides (draft at 1/2 without "
          f"more upsampling): {res['draft_half_possible_pct']:.1f} %")
    return res


if __name__ == "__main__":
    main()
