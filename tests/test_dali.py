"""The DALI input pipeline (evit/data/dali.py, evit/data/dali_augment.py) in DALI's CPU mode, against timm's PIL
transforms on real JPEGs: Fashion-MNIST garments tinted on a gradient (64-96 px), and the colour photo matplotlib
ships."""
from __future__ import annotations

import io
import math
import random
import sys
import threading
import weakref
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from evit.config.schema import resolve_config
from evit.errors import ConfigError, ImageError
import evit.trainer as T
from evit.data import dali as DL, dali_augment as DA, dali_sources as DS
from evit.data.datasets import FashionMNIST, build_dataset
from evit.data.loaders import build_eval_loader, close_loader
from evit.data.samplers import TrainSampler
from evit.data.seeding import SeededDataset
from evit.data.transforms import eval_transform

pytestmark = pytest.mark.usefixtures("one_thread")

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def photo() -> Image.Image:
    import matplotlib.cbook as cbook

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def garment_jpeg(img: np.ndarray, k: int, path: Path) -> None:
    """A 28 px grey garment as a tinted RGB JPEG of 64-96 px on a colour gradient."""
    w, h = 64 + 8 * (k % 5), 96 - 8 * (k % 4)
    g = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC), dtype=np.float32)[..., None] / 255
    yy, xx = np.mgrid[0:h, 0:w]
    background = np.stack([xx * 200 / w + 30, yy * 180 / h + 40, np.full_like(xx, 90 + 10 * (k % 7))], -1)
    tint = np.array([255 - 20 * (k % 9), 60 + 19 * (k % 10), 40 + 23 * (k % 8)], dtype=np.float32)
    rgb = background * (1 - g) + tint * g
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    """A `folder` dataset: 48 training and 20 validation garments of the 10 classes, plus the photo in val."""
    root = tmp_path_factory.mktemp("jpegs")
    for split, fm_split, n in (("train", "train", 48), ("val", "val", 20)):
        ds = FashionMNIST(None, fm_split)
        for k in range(n):
            garment_jpeg(ds.images[k].numpy(), k, root / split / f"c{int(ds.targets[k])}" / f"{k:03d}.jpg")
    for c in range(10):
        if not (root / "val" / f"c{c}").exists():
            garment_jpeg(ds.images[c].numpy(), c, root / "val" / f"c{c}" / "extra.jpg")
    photo().save(root / "val" / "c0" / "photo.jpg", format="JPEG", quality=90)
    return root


def dali_config(root: Path, **train) -> dict:
    return {"model": {"arch": "deit_tiny_patch16_224", "method": "evit", "img_size": 32, "patch_size": 8,
                      "keep_rate": 0.7, "drop_loc": [1], "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
            "data": {"dataset": "folder", "root": str(root), "num_workers": 1, "loader": "dali"},
            "train": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0.5, "shrink_start": 0, "shrink_epochs": 1,
                      "amp": "none", "repeated_aug": 1, "log_every": 100, **train},
            "eval": {"batch_size": 16}}


class Batches:
    """A training pipeline source of one batch with given draws: whole-image crops, no flip, one op each."""

    def __init__(self, encoded: np.ndarray, size: int, draws: list[tuple[int, int, int]]):
        self.encoded, self.size, self.draws = encoded, size, draws

    def __iter__(self):
        self.done = False
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        self.done = True
        n = len(self.draws)
        draws = np.array([[0, 0, self.size, self.size, 0, *d] for d in self.draws], dtype=np.int32)
        return [[self.encoded] * n, np.zeros(n, dtype=np.int64), draws]


# --------------------------------------------------------------------------------------------- config


def test_dali_config_errors_are_named_at_resolution(jpeg_root, monkeypatch):
    cfg = resolve_config(dali_config(jpeg_root))
    assert cfg["data"]["loader"] == "dali"
    assert resolve_config({"data": {"dataset": "fashion_mnist"}})["data"]["loader"] == "torch"
    for section, values, msg in [
        ("data", {"dataset": "fashion_mnist", "root": None}, "data.loader: dali reads the imagenet and folder"),
        ("train", {"recipe": "demo"}, "data.loader: dali implements the deit augment, not train.augment 'demo'"),
        ("train", {"augment": "demo"}, "data.loader: dali implements the deit augment, not train.augment 'demo'"),
        ("train", {"aa": "rand-m9-mstd0.5"}, "train.aa: data.loader dali implements timm's RandAugment with the "
                                             "increasing op set"),
        ("train", {"aa": None}, "train.aa"),
        ("train", {"interpolation": "random"}, "train.interpolation: random"),
    ]:
        raw = dali_config(jpeg_root)
        raw[section].update(values)
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("'", "'")):
            resolve_config(raw)
    evaluation_only = dali_config(jpeg_root, recipe="none")     # augment none: DALI evaluates, does not train
    with pytest.raises(ConfigError, match="train.augment: data.loader dali trains with the deit augment"):
        train_loader(evaluation_only, seed=0)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)      # as when DALI is not installed
    with pytest.raises(ConfigError, match=r"needs NVIDIA DALI, which is not installed: `pip install \.\[dali\]`"):
        resolve_config(dali_config(jpeg_root))


# --------------------------------------------------------------------------------------------- RandAugment


@pytest.mark.slow
def test_each_rand_augment_op_matches_timm(monkeypatch):
    """Every op of rand-m9-mstd0.5-inc1 at magnitudes 9 and 10 (both signs where timm negates) against timm's
    PIL op with the recipe's bicubic resampling and mean fill, on the photo resized to 96 px.

    Exact (0 levels): AutoContrast, Invert, Posterize, Solarize, SolarizeAdd, Color, Contrast, Brightness,
    Sharpness. Equalize uses OpenCV's lookup table (PIL's differs): mean 4.2, at most 13 levels here. The
    geometric ops resample bilinearly (DALI's warp has no bicubic): against timm's bicubic, mean 0.8-3.6
    levels; against PIL's bilinear, within 1 level on 98 % of the pixels (the rest on the edge of the fill)."""
    import timm.data.auto_augment as AA

    S, fill = 96, (124, 116, 104)
    buf = io.BytesIO()
    photo().resize((S, S), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    names = DA.RandAugmentSpec("rand-m9-mstd0.5-inc1").names
    assert names == list(DA.OP_TABLE) and len(names) == 15
    cases = [(k, name, m, sign) for k, name in enumerate(names) for m in (9.0, 10.0)
             for sign in ((0, 1) if DA.OP_TABLE[name][1] else (0,))]
    pipe = DL.train_pipeline(
        source=Batches(np.frombuffer(buf.getvalue(), dtype=np.uint8), S,
                       [(k, round(m / DA.MAGNITUDE_STEP), sign) for k, _, m, sign in cases]),
        img_size=S, interpolation="bicubic", names=names, fill=fill, num_layers=1, gpu=False,
        batch_size=len(cases), num_threads=1, device_id=None)
    pipe.build()
    outputs = pipe.run()[0]
    hparams = {"translate_const": int(S * 0.45), "img_mean": fill}
    for (k, name, m, sign), out in zip(cases, outputs):
        out = np.asarray(out).transpose(1, 2, 0).astype(int)
        with mock.patch.object(AA.random, "random", return_value=1.0 if sign else 0.0):   # timm's negation draw
            args = AA.LEVEL_TO_ARG[name](m, hparams) if AA.LEVEL_TO_ARG[name] else ()
        what = f"{name} at magnitude {m}, args {args}"
        if name == "PosterizeIncreasing" and args[0] <= 0:
            assert (out == 0).all(), what     # 0 bits: black, as Pillow < 13 (and evit's torch path) give
            continue
        bicubic = np.asarray(AA.NAME_TO_OP[name](image, *args, fillcolor=fill, resample=Image.BICUBIC)).astype(int)
        diff = np.abs(out - bicubic)
        if name == "Equalize":
            assert 1 < diff.mean() < 6 and diff.max() <= 16, what
        elif name in GEOMETRIC:
            assert diff.mean() < 4.0, what
            bilinear = np.asarray(AA.NAME_TO_OP[name](image, *args, fillcolor=fill, resample=Image.BILINEAR))
            close = np.abs(out - bilinear.astype(int)) <= 1
            assert close.mean() > 0.98, f"{what}: {close.mean():.4f} of the pixels within 1 level of PIL bilinear"
        else:
            assert diff.max() == 0, f"{what}: differs from timm by up to {diff.max()} levels"


def test_rand_augment_draws_follow_timm():
    """The host draws: 2 ops with replacement, each applied with probability 0.5, magnitude 9 + N(0, 0.5)
    clipped to [0, 10] (in 0.01 bins), a random sign only for the ops timm negates."""
    spec = DA.RandAugmentSpec("rand-m9-mstd0.5-inc1")
    assert (spec.num_layers, spec.prob, spec.magnitude, spec.magnitude_std) == (2, 0.5, 9, 0.5)
    rng = random.Random(0)
    draws = [spec.draw(rng) for _ in range(4000)]
    ops = np.array([d[0] for d in draws]).ravel()
    mags = np.array([d[1] for d in draws]).ravel()[ops != spec.skip] * DA.MAGNITUDE_STEP
    signs = np.array([d[2] for d in draws]).ravel()[ops != spec.skip]
    applied_ops = ops[ops != spec.skip]
    assert abs((ops == spec.skip).mean() - 0.5) < 0.02
    assert set(np.unique(applied_ops)) == set(range(15))
    assert abs(mags.mean() - 8.96) < 0.05 and mags.max() <= 10.0 and mags.min() >= 7.0
    assert abs((mags == 10.0).mean() - 0.0228) < 0.008            # P(N(9, 0.5) >= 10), clipped to 10
    negating = np.array([DA.OP_TABLE[spec.names[o]][1] for o in applied_ops])
    assert signs[~negating].sum() == 0 and abs(signs[negating].mean() - 0.5) < 0.03


# --------------------------------------------------------------------------------------------- crop


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_crop_window_follows_timms_random_resized_crop():
    """Area fraction and log aspect ratio of 10,000 windows against timm's get_params: KS at the 0.1 % level."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    n, ours, theirs = 10_000, [], []
    for width, height in ((500, 375), (96, 64)):
        img = Image.new("RGB", (width, height))
        rng = random.Random(1)
        random.seed(2)
        for _ in range(n // 2):
            x, y, w, h = DA.crop_window(rng, width, height)
            assert 0 <= x <= width - w and 0 <= y <= height - h
            ours.append((w * h / (width * height), math.log(w / h)))
            i, j, th, tw = RandomResizedCropAndInterpolation.get_params(img, DA.RRC_SCALE, DA.RRC_RATIO)
            theirs.append((tw * th / (width * height), math.log(tw / th)))
    ours, theirs = np.array(ours), np.array(theirs)
    critical = 1.95 * math.sqrt(2 / n)                               # alpha = 0.001
    for col, what in ((0, "area"), (1, "aspect ratio")):
        assert ks_statistic(ours[:, col], theirs[:, col]) < critical, what
    assert ks_statistic(ours[:, 0], ours[:, 0] ** 0.5) > critical    # the test can tell distributions apart


@pytest.mark.filterwarnings("ignore:The external source node")       # RandAugment's draws, unused here
def test_the_pipeline_decodes_the_window_and_resizes_it_like_timm():
    """A drawn window, decoded by DALI (ROI decode) and resized to 64 px, against PIL's crop + bicubic resize
    (timm's RandomResizedCrop): mostly within 1 level; see `test_eval_transform_matches_timm` for why not all."""
    buf = io.BytesIO()
    photo().save(buf, format="JPEG", quality=90)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    rng = random.Random(5)
    windows = [DA.crop_window(rng, *image.size) for _ in range(6)]

    class Windows(Batches):
        def __next__(self):
            cols = super().__next__()
            cols[2][:, :4] = windows
            return cols

    S = 64
    spec = DA.RandAugmentSpec("rand-m9-mstd0.5-inc1")
    pipe = DL.train_pipeline(source=Windows(np.frombuffer(buf.getvalue(), dtype=np.uint8), S,
                                            [(spec.skip, 0, 0)] * len(windows)),
                             img_size=S, interpolation="bicubic", names=[], fill=(0, 0, 0), num_layers=0,
                             gpu=False, batch_size=len(windows), num_threads=1, device_id=None)
    pipe.build()
    for (x, y, w, h), out in zip(windows, pipe.run()[0]):
        ref = np.asarray(image.crop((x, y, x + w, y + h)).resize((S, S), Image.BICUBIC)).astype(int)
        diff = np.abs(np.asarray(out).transpose(1, 2, 0).astype(int) - ref)
        assert (diff <= 1).mean() > 0.97 and diff.mean() < 0.5, (x, y, w, h)


@pytest.mark.parametrize("gpu", [True, False], ids=["mixed", "cpu"])
def test_both_decoders_upsample_chroma_as_pil(gpu):
    """Both decoders take jpeg_fancy_upsampling (DALI's default is off), which makes the GPU's ("mixed")
    chroma upsampling libjpeg-turbo's and PIL's: in the graphs DALI builds for device 0 (a graph needs no GPU;
    CI has none) and for its CPU mode."""
    device = dict(device_id=0 if gpu else None, gpu=gpu, batch_size=2, num_threads=1)
    pipes = [DL.train_pipeline(source=iter([]), img_size=32, interpolation="bicubic", names=[], fill=(0, 0, 0),
                               num_layers=0, **device),
             DL.eval_pipeline(source=iter([]), img_size=32, interpolation="bicubic", mean=(0.5,) * 3,
                              std=(0.5,) * 3, **device)]
    decoders = []
    for pipe in pipes:
        pipe._build_graph()                # the operators and their arguments, without a device
        decoders += [str(op.spec) for op in pipe._ops if str(op.spec).startswith("OpSpec for decoders__")]
    assert [spec.split(":")[0] for spec in decoders] == ["OpSpec for decoders__ImageSlice",
                                                         "OpSpec for decoders__Image"]
    for spec in decoders:
        args = dict(line.strip().split(": ", 1) for line in spec.split("Arguments:")[1].splitlines() if ": " in line)
        assert args["device"] == ("mixed" if gpu else "cpu"), spec
        assert args["jpeg_fancy_upsampling"] == "True", spec


# --------------------------------------------------------------------------------------------- eval


def test_eval_transform_matches_timm(jpeg_root):
    """DaliEvalLoader against timm's eval transform (resize to 32 / 0.875, centre crop, normalize).

    Measured on these 21 images: 99.98 % of the values within 1/255 (mean 0.14/255), none more than 4/255 off
    (at 224 px: 99.998 %, 6/255): DALI's antialiased cubic filter does not round and clip between its two
    passes as PIL does, which shows at high-contrast edges, and treats the image's edge differently."""
    cfg = resolve_config(dali_config(jpeg_root))
    loader, n, raw = build_eval_loader(cfg, 0, 1, torch.device("cpu"))
    assert isinstance(loader, DL.DaliEvalLoader) and n == len(raw) > 16
    for path, _ in raw.samples:          # the JPEG header walk reads the sizes PIL reads
        assert DS.image_size(Path(path).read_bytes()) == Image.open(path).size
    png = io.BytesIO()
    Image.new("RGB", (37, 21)).save(png, format="PNG")
    assert DS.image_size(png.getvalue()) == (37, 21)
    tf = eval_transform(cfg)
    got = [(x, y) for x, y in loader]
    assert [len(y) for _, y in got] == [16, n - 16]
    images, labels = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    ref = torch.stack([tf(raw[i][0]) for i in range(n)])
    assert labels.tolist() == [raw[i][1] for i in range(n)]
    std = torch.tensor(cfg["data"]["std"]).view(1, 3, 1, 1)
    levels = ((images - ref) * std * 255).abs()                     # in 1/255 of the pixel range
    assert images.shape == ref.shape == (n, 3, 32, 32)
    assert (levels <= 1.01).float().mean() > 0.999 and levels.mean() < 0.2 and levels.max() < 8
    # sharded over 3 ranks: every image once, rank r the r-th of every 3
    shards = [torch.cat([y for _, y in DL.DaliEvalLoader(cfg, loader.dataset, r, 3, torch.device("cpu"))])
              for r in range(3)]
    assert [s.tolist() for s in shards] == [labels[r::3].tolist() for r in range(3)]


# --------------------------------------------------------------------------------------------- training


def train_loader(cfg: dict, seed: int, world_size: int = 1, rank: int = 0):
    cfg = resolve_config(cfg)
    ds = SeededDataset(build_dataset("folder", cfg["data"]["root"], "train"), None)
    sampler = TrainSampler(len(ds), seed=seed, world_size=world_size, rank=rank)
    return DL.DaliTrainLoader(cfg, ds, torch.utils.data.BatchSampler(sampler, 8, drop_last=True),
                              torch.device("cpu")), sampler, ds


@pytest.mark.slow
def test_training_batches_follow_the_sampler_and_the_seed(jpeg_root):
    """Rank r reads the r-th share of TrainSampler's order for (seed, epoch), each epoch anew; the same seed
    gives bitwise the same batches, another seed others; uint8 (N, 3, 32, 32)."""
    loader, sampler, ds = train_loader(dali_config(jpeg_root), seed=3, world_size=2, rank=1)
    labels = [y for _, y in ds.base.samples]
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = [i for i, _ in sampler]
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        got = torch.cat([y for _, y in batches]).tolist()
        assert got == [labels[i] for i in order]
        epochs.append(batches)
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (8, 3, 32, 32)
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    other_rank, s0, _ = train_loader(dali_config(jpeg_root), seed=3, world_size=2, rank=0)
    s0.set_epoch(1)
    assert sorted([i for i, _ in s0] + order) == list(range(48))     # every image once per epoch over ranks
    again, s, _ = train_loader(dali_config(jpeg_root), seed=3, world_size=2, rank=1)
    s.set_epoch(1)
    for (x, y), (x2, y2) in zip(epochs[1], again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    s.set_epoch(1, start=8)                     # a resumed epoch continues where it stopped
    rest = list(again)
    assert len(rest) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(epochs[1][1:], rest))


def test_a_feeding_thread_runs_the_pipeline(jpeg_root, monkeypatch):
    """DALI's pipeline is built, fed and run on the loader's feeding thread, so the training thread only takes
    finished batches; a pass left half-way ends its thread before the next pass, which gives the same batches."""
    runs_on = []
    take = DL.DALIGenericIterator.__next__
    monkeypatch.setattr(DL.DALIGenericIterator, "__next__",
                        lambda self: (runs_on.append(threading.current_thread().name), take(self))[1])
    loader, _, _ = train_loader(dali_config(jpeg_root), seed=3)
    whole = list(loader)
    assert len(whole) == len(loader) == 6 and set(runs_on) == {"evit-dali-feed"}
    assert loader.feeder_cpu_s > 0
    half = iter(loader)
    assert torch.equal(next(half)[0], whole[0][0])
    left = loader.epochs.feeder
    again = list(loader)
    assert not left.thread.is_alive() and next(half, None) is None
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, again))
    assert len(again) == len(whole)
    next(iter(loader))
    left = loader.epochs.feeder
    close_loader(loader)                        # as a run's end does: the thread ends now, mid-pass
    assert not left.thread.is_alive() and loader.epochs.iterator is None


def test_the_feeder_hands_over_a_failure_and_holds_no_batch():
    """`Feeder`: the exception that ends its batches reaches the iterating thread after the batches before it;
    the batches it has handed over are the iterating thread's alone."""
    def batches():
        yield torch.ones(2)
        yield torch.zeros(2)
        raise ImageError("cannot decode c1/broken.jpg")

    class Counter:
        feeder_cpu_s = 0.0

    feeder = DL.Feeder(batches(), None, Counter())
    first = weakref.ref(next(feeder))
    assert torch.equal(next(feeder), torch.zeros(2)) and first() is None
    with pytest.raises(ImageError, match="c1/broken.jpg"):
        next(feeder)
    assert not feeder.thread.is_alive() and next(feeder, None) is None


def truncated_jpeg(root: Path) -> bytes:
    """A JPEG whose header parses but whose data stops short: DALI's decoder fails on it, naming no file."""
    return (root / "val" / "c0" / "photo.jpg").read_bytes()[:2000] + bytes(64)


def with_broken_image(root: Path, tmp_path: Path, split: str, content: bytes) -> Path:
    """A copy of the dataset at ``root`` (as links) with ``split/c1/broken.jpg`` holding ``content``."""
    bad = tmp_path / "jpegs"
    for s in ("train", "val"):
        for f in (root / s).rglob("*.jpg"):
            (bad / f.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            (bad / f.relative_to(root)).symlink_to(f)
    (bad / split / "c1" / "broken.jpg").write_bytes(content)
    return bad


@pytest.mark.parametrize("content", [lambda root: b"not a JPEG at all", truncated_jpeg],
                         ids=["no-header", "corrupt-data"])
def test_an_unreadable_image_is_named(jpeg_root, tmp_path, content):
    """A file that is not an image (one `ImageError` naming it and its index, before DALI gets it), or whose
    data DALI cannot decode (the same error, once DALI fails)."""
    bad = with_broken_image(jpeg_root, tmp_path, "val", content(jpeg_root))
    cfg = resolve_config(dali_config(bad))
    loader, _, raw = build_eval_loader(cfg, 0, 1, torch.device("cpu"))
    index = [Path(p).name for p, _ in raw.samples].index("broken.jpg")
    with pytest.raises(ImageError, match=f"broken.jpg.*index {index}|index {index}.*broken.jpg"):
        list(loader)


def test_an_unreadable_training_image_is_named(jpeg_root, tmp_path):
    """A training file that is not an image: read in DALI's worker process, one `ImageError` naming it and its
    index in the training process."""
    bad = with_broken_image(jpeg_root, tmp_path, "train", b"not a JPEG at all")
    loader, sampler, ds = train_loader(dali_config(bad), seed=0)
    index = [Path(p).name for p, _ in ds.base.samples].index("broken.jpg")
    with pytest.raises(ImageError, match=f"broken.jpg.*index {index}|index {index}.*broken.jpg"):
        list(loader)


@pytest.mark.slow
def test_dali_training_resumed_mid_epoch_ends_with_the_same_weights(jpeg_root, tmp_path, capsys):
    """Two epochs of 6 steps with RandAugment, random erasing and Mixup/CutMix through evit's BatchStage:
    straight, and stopped at step 8 (mid-epoch 2) then resumed, give bitwise the same weights."""
    cfg = dali_config(jpeg_root, mixup=0.8, cutmix=1.0, reprob=0.25)
    straight = T.Trainer(cfg, tmp_path / "straight").run()
    log = capsys.readouterr().out
    assert log.count("DALI decodes and augments in its CPU mode") == 1
    assert T.Trainer(cfg, tmp_path / "resumed").run(max_steps=8) is None
    resumed = T.Trainer(cfg, tmp_path / "resumed").run()
    assert resumed["steps"] == straight["steps"] == 12
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    n_val = len(list((jpeg_root / "val").rglob("*.jpg")))
    assert resumed["top1"] == straight["top1"] and resumed["num_eval_images"] == n_val
