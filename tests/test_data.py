"""The input pipeline (evit/data/): datasets, transforms, samplers and the batch stage, on the real Fashion-MNIST
files; and the package's import structure."""
from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evit.data.catalog import DEFAULT_FASHION_DIR, FASHION_FILES, FASHION_MEAN, FASHION_STD, IMAGENET_MEAN, IMAGENET_STD
from evit.data.datasets import FashionMNIST, build_dataset
from evit.errors import DatasetError, DeterministicError, ImageError
from evit.data.samplers import ShardSampler, TrainSampler, subset_indices
from evit.data.seeding import SeededDataset, seed_all
from evit.data.stage import BatchStage
from evit.data.transforms import build_transform

FASHION = Path(DEFAULT_FASHION_DIR)


@pytest.fixture(scope="module")
def fashion_val():
    return FashionMNIST(FASHION, "val")


def test_fashion_mnist_idx_decoding(fashion_val):
    train = FashionMNIST(None, "train")       # None = the Debian package's directory
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert fashion_val.images.shape == (10000, 28, 28)
    # the dataset is balanced: 6000 / 1000 images per class
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(fashion_val.targets).tolist() == [1000] * 10
    # objects on a black background: corners dark, centre bright on average
    mean = fashion_val.images.float().mean(0)
    assert mean[:3, :3].mean() < 5 and mean[10:18, 10:18].mean() > 100
    img, label = fashion_val[0]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8 and label == int(fashion_val.targets[0])


def test_fashion_mnist_pil_items_are_rgb(fashion_val):
    ds = FashionMNIST(FASHION, "val", pil=True)
    img, label = ds[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    arr = np.asarray(img)
    assert (arr[..., 0] == fashion_val.images[3].numpy()).all() and (arr[..., 0] == arr[..., 2]).all()


def test_missing_fashion_mnist_error_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as e:
        FashionMNIST(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "train-images-idx3-ubyte.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert isinstance(e.value, DeterministicError)  # a retry would not find it either


def test_corrupt_idx_is_a_clear_error(tmp_path):
    for name in FASHION_FILES["val"]:
        shutil.copy(FASHION / name, tmp_path / name)
    data = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated"):
        FashionMNIST(tmp_path, "val")
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(b"\x12\x34" + data[2:100])
    with pytest.raises(DatasetError, match="magic"):
        FashionMNIST(tmp_path, "val")


def _write_images(d: Path, images, ext=".JPEG"):
    d.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.numpy()).convert("RGB").save(d / f"img{i}{ext}", format="PNG")


def test_imagenet_layout_and_errors(tmp_path, fashion_val):
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    for split, n in (("train", 3), ("val", 2)):
        for c, w in enumerate(reversed(wnids)):   # created out of order: classes must come out sorted
            _write_images(root / split / w, fashion_val.images[c * 5: c * 5 + n])
    ds = build_dataset("imagenet", str(root), "val")
    assert ds.classes == sorted(wnids) and len(ds) == 6
    img, label = ds[0]
    assert img.mode == "RGB" and label == 0

    with pytest.raises(DatasetError, match="does not exist") as e:
        build_dataset("imagenet", str(tmp_path / "absent"), "train")
    assert "train/<wnid>/*.JPEG" in str(e.value)

    flat = tmp_path / "flat"
    _write_images(flat / "train" / "n01440764", fashion_val.images[:2])
    _write_images(flat / "val", fashion_val.images[:2])     # ImageNet val as downloaded: no class folders
    with pytest.raises(DatasetError, match="LOC_val_solution.csv") as e:
        build_dataset("imagenet", str(flat), "val")
    assert str(flat / "val") in str(e.value)

    odd = tmp_path / "odd"
    _write_images(odd / "val" / "cats", fashion_val.images[:2])
    with pytest.raises(DatasetError, match="not wnids"):
        build_dataset("imagenet", str(odd), "val")
    assert build_dataset("folder", str(odd), "val").classes == ["cats"]   # any names for `folder`
    with pytest.raises(DatasetError, match="no train/ directory"):
        build_dataset("folder", str(odd), "train")


def test_a_folder_dataset_lists_its_files_and_labels(tmp_path, fashion_val):
    """`ImageFolderDataset.samples` names each item's file and label; `SeededDataset.encoded` reads its file's bytes,
    through a subset, and `SeededDataset.describe` names it."""
    root = tmp_path / "folder"
    for c in ("bags", "shirts"):
        _write_images(root / "val" / c, fashion_val.images[:3], ext=".png")
    raw = build_dataset("folder", str(root), "val")
    assert raw.samples == [(str(root / "val" / c / f"img{i}.png"), label)
                           for label, c in enumerate(("bags", "shirts")) for i in range(3)]
    ds = SeededDataset(raw, None, indices=[4, 1])
    assert [ds.encoded(i) for i in range(2)] == [((root / "val" / "shirts" / "img1.png").read_bytes(), 1),
                                                 ((root / "val" / "bags" / "img1.png").read_bytes(), 0)]
    assert ds.describe(ds.raw_index(0)) == f"{root / 'val' / 'shirts' / 'img1.png'} (index 4)"
    assert ds[0][1] == 1 and ds.raw_index(1) == 1


def test_demo_transforms(fashion_val):
    mean, std = FASHION_MEAN, FASHION_STD
    tr = build_transform("demo", True, 28, mean, std)
    ev = build_transform("demo", False, 28, mean, std)
    img = fashion_val[7][0]
    x = ev(img)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    expected = (img.float() / 255 - mean[0]) / std[0]
    torch.testing.assert_close(x[1:2], expected)
    # training: the same seed gives the same augmentation, other seeds other crops/flips
    outs = []
    for seed in range(8):
        seed_all(seed)
        outs.append(tr(img))
    seed_all(3)
    assert torch.equal(tr(img), outs[3])
    assert len({o.sum().item() for o in outs}) > 1
    # crops are shifted copies: every output equals the eval image shifted by <= 2 px, maybe flipped
    background = (0 - mean[0]) / std[0]
    padded = torch.nn.functional.pad(expected, (2, 2, 2, 2), value=background)
    for o in outs:
        cands = [padded[:, i:i + 28, j:j + 28] for i in range(5) for j in range(5)]
        assert any(torch.allclose(o[0:1], c) or torch.allclose(o[0:1], c.flip(-1)) for c in cands)
    # resizing to another size
    assert build_transform("demo", False, 32, mean, std)(img).shape == (3, 32, 32)


def test_the_demo_canvas_centres_for_evaluation_and_places_on_its_grid_for_training(fashion_val):
    mean, std = FASHION_MEAN, FASHION_STD
    img = fashion_val[7][0]
    background = (0 - mean[0]) / std[0]
    image = (img.float() / 255 - mean[0]) / std[0]
    x = build_transform("demo", False, 42, mean, std, canvas=42)(img)
    expected = torch.nn.functional.pad(image, (7, 7, 7, 7), value=background)
    torch.testing.assert_close(x[1:2], expected)
    tr = build_transform("demo", True, 42, mean, std, demo_padding=0, canvas=42, canvas_step=7)
    offsets = set()
    for seed in range(40):
        seed_all(seed)
        o = tr(img)[0:1]
        windows = {(i, j): o[..., i:i + 28, j:j + 28] for i in range(15) for j in range(15)}
        at = [ij for ij, w in windows.items() if torch.allclose(w, image) or torch.allclose(w.flip(-1), image)]
        assert len(at) == 1, f"seed {seed}: the image is not on the canvas once ({at})"
        top, left = at[0]
        outside = torch.ones_like(o, dtype=torch.bool)
        outside[..., top:top + 28, left:left + 28] = False
        torch.testing.assert_close(o[outside], torch.full_like(o[outside], background))
        offsets.add(at[0])
    assert offsets == {(i, j) for i in (0, 7, 14) for j in (0, 7, 14)}  # every whole-patch position, no other
    # evaluation on a canvas whose centre is off the grid: the most central grid position (7, not 10 px)
    x = build_transform("demo", False, 49, mean, std, canvas=49, canvas_step=7)(img)
    torch.testing.assert_close(x[1:2], torch.nn.functional.pad(image, (7, 14, 7, 14), value=background))
    # another size: the canvas is resized with the image on it
    assert build_transform("demo", False, 49, mean, std, canvas=42)(img).shape == (3, 49, 49)
    with pytest.raises(ValueError, match="data.canvas: 20 px is smaller than the 28x28 px image"):
        build_transform("demo", False, 28, mean, std, canvas=20)(img)
    with pytest.raises(ValueError, match="data.canvas: only the demo augment"):
        build_transform("deit", False, 28, mean, std, canvas=42)


def test_deit_transforms_via_timm(fashion_val):
    pil = FashionMNIST(FASHION, "val", pil=True)[0][0]
    tr = build_transform("deit", True, 32, IMAGENET_MEAN, IMAGENET_STD, aa="rand-m9-mstd0.5-inc1",
                           reprob=0.25)
    names = " ".join(type(t).__name__ for t in tr.transforms)
    assert "RandomResizedCrop" in names and "RandAugment" in names and "RandomErasing" in names
    seed_all(0)
    a = tr(pil)
    seed_all(0)
    assert torch.equal(a, tr(pil)) and a.shape == (3, 32, 32)
    ev = build_transform("deit", False, 224, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875)
    assert [type(t).__name__ for t in ev.transforms][:2] == ["Resize", "CenterCrop"]
    assert ev.transforms[0].size == 256 and ev(pil).shape == (3, 224, 224)   # DeiT: 224 / 0.875


def test_train_sampler_is_a_function_of_seed_and_epoch():
    s = TrainSampler(100, seed=1)
    s.set_epoch(0)
    a = list(s)
    assert sorted(i for i, _ in a) == list(range(100))
    s2 = TrainSampler(100, seed=1)
    s2.set_epoch(0)
    assert list(s2) == a
    s2.set_epoch(1)
    assert [i for i, _ in s2] != [i for i, _ in a]
    s3 = TrainSampler(100, seed=2)
    s3.set_epoch(0)
    assert [i for i, _ in s3] != [i for i, _ in a]
    # resuming mid-epoch yields exactly the rest, with the same per-sample seeds
    s.set_epoch(0, start=40)
    assert list(s) == a[40:] and len(s) == 60
    assert len({seed for _, seed in a}) == 100


def test_train_sampler_shards_and_repeats():
    shards = []
    for rank in range(3):
        s = TrainSampler(100, seed=0, world_size=3, rank=rank)
        s.set_epoch(5)
        shards.append([i for i, _ in s])
    assert [len(x) for x in shards] == [34, 34, 34]          # padded by wrapping, as DistributedSampler
    assert set().union(*map(set, shards)) == set(range(100))
    ra = [TrainSampler(600, seed=0, world_size=3, rank=r, repeats=3) for r in range(3)]
    for s in ra:
        s.set_epoch(0)
    idx = [[i for i, _ in s] for s in ra]
    assert all(len(x) == 512 // 3 for x in idx)               # DeiT's RASampler: ~len/world per rank
    # repeated augmentation: the k-th sample of each rank is the same image (3 repeats over 3 ranks)
    assert idx[0] == idx[1] == idx[2]


@pytest.mark.parametrize("n,world", [(101, 2), (10, 3), (2, 4)])
def test_shard_sampler_covers_each_index_once(n, world):
    seen = [i for r in range(world) for i in ShardSampler(n, world, r)]
    assert sorted(seen) == list(range(n))
    assert sum(len(ShardSampler(n, world, r)) for r in range(world)) == n


def test_augmentation_independent_of_workers(fashion_val):
    """Same sampler, 0 vs 2 workers: bitwise the same augmented batches (per-sample seeding)."""
    tf = build_transform("demo", True, 28, FASHION_MEAN, FASHION_STD)
    ds = SeededDataset(fashion_val, tf, subset_indices(len(fashion_val), 96))
    batches = []
    for workers in (0, 2):
        s = TrainSampler(len(ds), seed=3)
        s.set_epoch(2)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=torch.utils.data.BatchSampler(s, 16, True),
                                             num_workers=workers)
        batches.append(list(loader))
    assert len(batches[0]) == 6
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_subset_indices():
    a = subset_indices(1000, 10)
    assert a == sorted(a) and len(set(a)) == 10 and a == subset_indices(1000, 10)
    assert subset_indices(10, 10) is None and subset_indices(10, None) is None


def _jpeg_garment(fashion_val, i: int, size: int) -> Image.Image:
    """Fashion-MNIST image ``i`` tinted to colour, upscaled to ``size`` px and passed through JPEG (a real photo's
    path: RGB, decoded by PIL)."""
    import io

    grey = np.asarray(Image.fromarray(fashion_val.images[i].numpy()).resize((size, size), Image.BICUBIC))
    rgb = np.stack([grey, (grey * 0.7).astype(np.uint8), 255 - grey], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _rand_augment(tr):
    return next(t for t in tr.transforms if type(t).__name__ == "RandAugment")


def test_every_rand_augment_op_of_the_recipe_at_magnitude_0_and_10(fashion_val):
    """Each op of `rand-m9-mstd0.5-inc1` at both ends of its magnitude range, on a real RGB JPEG: none raises with
    the locked Pillow, and posterize at magnitude 10 (0 bits kept) gives a black image, as Pillow < 13 did."""
    import copy

    img = _jpeg_garment(fashion_val, 0, 96)
    tr = build_transform("deit", True, 64, IMAGENET_MEAN, IMAGENET_STD, aa="rand-m9-mstd0.5-inc1")
    ops = _rand_augment(tr).ops
    assert len(ops) == 15 and "PosterizeIncreasing" in [op.name for op in ops]
    for op in ops:
        for magnitude in (0, 10):
            fixed = copy.copy(op)
            fixed.prob, fixed.magnitude, fixed.magnitude_std = 1.0, magnitude, 0
            out = fixed(img)
            assert out.mode == "RGB" and out.size == img.size, (op.name, magnitude)
            if op.name == "PosterizeIncreasing":
                arr = np.asarray(out)
                if magnitude == 10:
                    assert arr.max() == 0
                else:   # 4 bits kept
                    assert (arr & 0x0F).max() == 0 and (arr >> 4 == np.asarray(img) >> 4).all()


def test_the_deit_recipe_transform_survives_thousands_of_draws(fashion_val):
    """The whole scratch recipe (RandomResizedCrop, RandAugment, erasing) over 3000 draws, including draws of
    posterize at 0 bits, which the locked Pillow would raise on."""
    tr = build_transform("deit", True, 16, IMAGENET_MEAN, IMAGENET_STD, aa="rand-m9-mstd0.5-inc1",
                           reprob=0.25)
    op = next(op for op in _rand_augment(tr).ops if op.name == "PosterizeIncreasing")
    bits_drawn = []
    posterize = op.aug_fn

    def counting(img, bits, **kw):
        bits_drawn.append(bits)
        return posterize(img, bits, **kw)

    op.aug_fn = counting
    images = [_jpeg_garment(fashion_val, i, 32) for i in range(10)]
    for seed in range(3000):
        seed_all(seed)
        x = tr(images[seed % 10])
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all()
    assert bits_drawn.count(0) >= 1, bits_drawn


@pytest.mark.parametrize("augment,size,kw", [
    ("deit", 32, {"aa": "rand-m9-mstd0.5-inc1"}),
    ("none", 32, {}),
    ("demo", 28, {}),
    ("demo", 42, {"canvas": 42, "canvas_step": 7}),
    ("demo", 49, {"canvas": 42, "canvas_step": 7}),       # resized: the worker hands over float in [0, 1]
])
def test_the_device_stage_gives_the_worker_float_path_s_images(fashion_val, augment, size, kw):
    """Workers handing over uint8 (or [0, 1] float) and `BatchStage` normalizing the batch give the images that
    the all-in-the-worker transform gives, for the same per-sample seeds."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if augment != "demo" else (FASHION_MEAN, FASHION_STD)
    old = build_transform(augment, True, size, mean, std, **kw)
    new = build_transform(augment, True, size, mean, std, device_stage=True, **kw)
    stage = BatchStage(torch.device("cpu"), mean, std)
    images = ([_jpeg_garment(fashion_val, i, 48) for i in range(6)] if augment != "demo"
              else [fashion_val[i][0] for i in range(6)])
    expected, handed = [], []
    for seed, img in enumerate(images):
        seed_all(seed)
        expected.append(old(img))
        seed_all(seed)
        handed.append(new(img))
    assert handed[0].dtype == (torch.float32 if size == 49 else torch.uint8)
    out, targets = stage(torch.stack(handed), torch.arange(6))
    assert out.shape == (6, 3, size, size) and out.dtype == torch.float32 and targets.tolist() == list(range(6))
    torch.testing.assert_close(out, torch.stack(expected))
    assert len({x.sum().item() for x in expected}) > 1 or augment == "none"   # really augmented


def test_the_device_stage_erases_one_box_per_image_as_deit(fashion_val):
    """`BatchStage`'s random erasing is timm's, with DeiT's settings: per image with probability reprob, one box
    of 2 % to 1/3 of the image, filled with per-pixel noise; the rest of the image is untouched. The draws are
    functions of the global seed."""
    imgs = torch.stack([fashion_val[i][0].expand(3, -1, -1) for i in range(64)])
    plain = BatchStage(torch.device("cpu"), FASHION_MEAN, FASHION_STD)(imgs, torch.zeros(64))[0]
    stage = BatchStage(torch.device("cpu"), FASHION_MEAN, FASHION_STD, reprob=0.5)
    seed_all(5)
    out = stage(imgs, torch.zeros(64))[0]
    seed_all(5)
    assert torch.equal(out, stage(imgs, torch.zeros(64))[0])
    erased = 0
    for x, p in zip(out, plain):
        diff = (x != p).any(0)
        if not diff.any():
            continue
        erased += 1
        rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert diff.sum() >= 0.9 * box                      # one box (noise may equal a pixel by chance)
        assert 0.02 * 28 * 28 * 0.8 <= box <= 28 * 28 / 3 * 1.2
    assert 20 <= erased <= 44                               # about half of 64


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_is_one_error_naming_its_file_and_index(tmp_path, fashion_val, workers):
    """A JPEG cut short and a file of garbage in a `folder` dataset: loading either (in the process or in a
    DataLoader worker) raises one `ImageError` naming the file, its index and the decoder's complaint."""
    root = tmp_path / "folder"
    for c in ("bags", "shirts"):
        _write_images(root / "train" / c, fashion_val.images[:3], ext=".png")
    good = (root / "train" / "bags" / "img1.png").read_bytes()
    (root / "train" / "bags" / "img1.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "shirts" / "img2.png").write_bytes(b"not an image at all")
    raw = build_dataset("folder", str(root), "train")
    tf = build_transform("deit", True, 16, IMAGENET_MEAN, IMAGENET_STD, device_stage=True)
    ds = SeededDataset(raw, tf)
    for index, name, cause in ((1, "bags/img1.png", "OSError"), (5, "shirts/img2.png", "UnidentifiedImageError")):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, index]), batch_size=2,
                                             num_workers=workers)
        with pytest.raises(ImageError) as e:
            next(iter(loader))
        message = str(e.value)
        assert message.startswith(f"cannot decode or augment the image {root / 'train' / name} (index {index}): "
                                  f"{cause}"), message
        assert "\n" not in message and "Traceback" not in message


DATA_MODULES = ("catalog", "datasets", "transforms", "stage", "seeding", "samplers", "loaders", "dali_augment", "dali")


@pytest.mark.parametrize("module", DATA_MODULES)
def test_each_data_module_imports_on_its_own(module):
    """In a fresh interpreter, each module of evit.data imports first (an import circle fails here); the catalog
    imports no torch (the config schema reads it), and only the dali modules import DALI."""
    code = (f"import sys; import evit.data.{module}; "
            "print('torch' in sys.modules, any(m.startswith('nvidia.dali') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    torch_loaded, dali_loaded = out.stdout.split()
    if module == "catalog":
        assert torch_loaded == "False"
    assert dali_loaded == str(module.startswith("dali"))


def test_the_config_imports_the_catalog_without_torch():
    code = "import sys; import evit.data, evit.config; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
