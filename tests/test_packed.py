"""Packed datasets (evit/data/packed.py): `evit pack` of a folder of real JPEGs holds its samples byte for byte, in
its order with its labels; both loaders give bitwise the same batches from the folder and from the pack for the same
seed; a truncated or missing shard, or an index that does not match its shards, is one `DatasetError` naming the
file, at open and at the workflow's dry run."""
from __future__ import annotations

import importlib.util
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evit.cli import main as evit_main
from evit.config.schema import resolve_config
from evit.data.datasets import FashionMNIST, build_dataset
from evit.data.loaders import build_train_data
from evit.data.packed import INDEX, META, PackedDataset, check_pack, pack_dataset
from evit.errors import ConfigError, DatasetError, ImageError

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SPLITS = {"train": 40, "val": 14}


def fashion_jpegs():
    spec = importlib.util.spec_from_file_location("scripts_fashion_jpegs", SCRIPTS / "fashion_jpegs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A `folder` dataset of ImageNet-like 500 x 375 JPEGs (~100 KB: scripts/fashion_jpegs.py), 10 classes in each
    split, plus a small PNG (not every file is a JPEG)."""
    root = tmp_path_factory.mktemp("folder")
    photo, garments = fashion_jpegs().garment_photo, FashionMNIST(None, "train").images.numpy()
    rng = np.random.default_rng(0)
    for split, n in SPLITS.items():
        for k in range(n):
            path = root / split / f"c{k % 10}" / f"{split}_{k:03d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(garments[k], rng)[0].save(path, format="JPEG", quality=90)
    Image.fromarray(garments[0]).convert("RGB").save(root / "val" / "c3" / "small.png")
    return root


@pytest.fixture(scope="module")
def pack(folder, tmp_path_factory) -> Path:
    """`evit pack` of ``folder`` in 1 MiB shards (several per split)."""
    out = tmp_path_factory.mktemp("pack") / "fashion"
    assert evit_main(["pack", "--dataset", "folder", "--root", str(folder), "--out", str(out),
                      "--shard-size-mb", "1", "--threads", "2"]) == 0
    return out


def test_a_pack_holds_the_folder_sample_for_sample(folder, pack, capsys):
    for split in SPLITS:
        src, packed = build_dataset("folder", str(folder), split), build_dataset("folder", str(pack), split,
                                                                                 fmt="packed")
        assert isinstance(packed, PackedDataset) and len(packed) == len(src)
        assert packed.classes == src.classes and packed.targets == src.targets
        assert packed.samples == [(str(Path(p).relative_to(folder / split)), y) for p, y in src.samples]
        assert len(list((pack / split).glob("shard-*.bin"))) > 1 and not (pack / f"{split}.partial").exists()
        for i in range(len(src)):
            assert packed.encoded(i) == src.encoded(i)
            assert packed.image_size(i) == Image.open(src.samples[i][0]).size
        for i in (0, len(src) - 1):
            (a, y), (b, y2) = src[i], packed[i]
            assert y == y2 and np.array_equal(np.asarray(a), np.asarray(b))
        assert packed.describe(1) == f"{packed.samples[1][0]} in the pack {pack / split} (index 1)"
    again = pickle.loads(pickle.dumps(packed))         # as a spawned worker gets it: opens its own descriptors
    assert again._fds == {} and again.encoded(3) == packed.encoded(3)
    assert evit_main(["pack", "--dataset", "folder", "--root", str(folder), "--out", str(pack)]) == 2
    assert f"evit pack: error: --out: {pack / 'train'} already exists" in capsys.readouterr().err


def test_a_file_that_is_no_image_stops_the_pack_naming_it(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "val" / "c2" / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageError, match=f"cannot pack {bad / 'val' / 'c2' / 'notes.jpg'}: not an image"):
        pack_dataset(bad, tmp_path / "pack", threads=2)
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == ["train"]       # no val, no val.partial


def run_config(root: Path, fmt: str, loader: str, **data) -> dict:
    return resolve_config({
        "model": {"arch": "deit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                  "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        "data": {"dataset": "folder", "root": str(root), "format": fmt, "loader": loader, "num_workers": 1, **data},
        "train": {"batch_size": 8, "repeated_aug": 1, "seed": 5},
        "eval": {"batch_size": 16}})


def batches(cfg: dict, epoch: int = 1) -> tuple[list, list]:
    data = build_train_data(cfg, 0, 1, torch.device("cpu"))
    data.sampler.set_epoch(epoch)
    return list(data.loader), list(data.eval_loader)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (x, y), (x2, y2) in zip(a, b):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_the_torch_loader_gives_the_same_batches_from_the_folder_and_its_pack(folder, pack):
    """Training (deit augment, RandAugment, a DataLoader worker process reading the pack) and evaluation."""
    train, val = batches(run_config(folder, "folder", "torch"))
    packed_train, packed_val = batches(run_config(pack, "packed", "torch"))
    assert_same(train, packed_train)
    assert_same(val, packed_val)
    assert train[0][0].dtype == torch.uint8 and not torch.equal(train[0][0], batches(
        run_config(pack, "packed", "torch"), epoch=2)[0][0][0])     # another epoch, other batches


@pytest.mark.slow
def test_the_dali_loader_gives_the_same_batches_from_the_folder_and_its_pack(folder, pack):
    """DALI's CPU mode: training (ROI decode, RandAugment) and evaluation."""
    pytest.importorskip("nvidia.dali")
    train, val = batches(run_config(folder, "folder", "dali"))
    packed_train, packed_val = batches(run_config(pack, "packed", "dali"))
    assert_same(train, packed_train)
    assert_same(val, packed_val)
    assert train[0][0].shape == (8, 3, 32, 32) and val[0][0].dtype == torch.float32


def copy_pack(pack: Path, to: Path) -> Path:
    shutil.copytree(pack, to)
    return to


def test_a_truncated_or_missing_shard_is_named(pack, tmp_path):
    broken = copy_pack(pack, tmp_path / "broken")
    shard = broken / "train" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    for open_it in (lambda: PackedDataset(broken, "train", "folder"), lambda: check_pack(broken, "folder"),
                    lambda: build_dataset("folder", str(broken), "train", fmt="packed")):
        with pytest.raises(DatasetError, match=f"{shard}: the shard is truncated"):
            open_it()
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard}: the shard is missing"):
        PackedDataset(broken, "train", "folder")
    with pytest.raises(DatasetError, match=f"no {META} in {broken / 'val'}"):
        (broken / "val" / META).unlink() or PackedDataset(broken, "val", "folder")
    with pytest.raises(DatasetError, match="a pack of the folder dataset, not of data.dataset imagenet"):
        PackedDataset(pack, "train", "imagenet")


def test_a_shard_truncated_after_the_pack_was_opened_is_named(pack, tmp_path):
    broken = copy_pack(pack, tmp_path / "broken")
    ds = PackedDataset(broken, "val", "folder")
    last = ds.shards[-1]
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=f"{last}: truncated since the pack was opened"):
        ds.encoded(len(ds) - 1)


def test_an_index_that_does_not_match_its_shards_is_named(pack, tmp_path):
    """The val split's index in the train split (another pack's), and an index whose offsets were shifted."""
    broken = copy_pack(pack, tmp_path / "broken")
    index = broken / "train" / INDEX
    shutil.copy(broken / "val" / INDEX, index)
    with pytest.raises(DatasetError, match=f"{index}: does not match its {META}"):
        PackedDataset(broken, "train", "folder")
    rows = np.load(pack / "train" / INDEX)
    rows["offset"][5] += 1
    np.save(index, rows)
    with pytest.raises(DatasetError, match=f"{index}: does not match its shards: sample 5 lies in shard"):
        check_pack(broken, "folder")
    rows = np.load(pack / "train" / INDEX)
    rows["length"][-1] -= 1
    np.save(index, rows)
    with pytest.raises(DatasetError, match=f"{index}: does not match its shards: its samples in shard-"):
        PackedDataset(broken, "train", "folder")


def test_the_run_config_reads_data_format():
    cfg = resolve_config({"data": {"dataset": "imagenet", "root": "/data/imagenet-pack", "format": "packed"}})
    assert cfg["data"]["format"] == "packed"
    assert resolve_config({"data": {"dataset": "folder", "root": "/x"}})["data"]["format"] == "folder"
    with pytest.raises(ConfigError, match="data.format: packed is for the imagenet and folder datasets"):
        resolve_config({"data": {"dataset": "fashion_mnist", "format": "packed"}})
    with pytest.raises(ConfigError, match="data.format"):
        resolve_config({"data": {"dataset": "folder", "root": "/x", "format": "lmdb"}})


def test_the_masking_experiment_reads_the_pack(folder, pack, tmp_path):
    """The masking job finds an image's boxes by its file's stem, and masks the same patches of the same images, from
    the pack as from the folder."""
    from evit.config.masking import resolve_mask
    from evit.masking import MaskedVal

    boxes = tmp_path / "boxes.csv"
    stems = [Path(p).stem for p, _ in build_dataset("folder", str(folder), "val").samples]
    boxes.write_text("ImageId,PredictionString\n" + "".join(f"{s},c0 {40 + i} 30 {300 + i} 200 \n"
                                                             for i, s in enumerate(stems)))
    items = []
    for root, fmt in ((folder, "folder"), (pack, "packed")):
        val = MaskedVal(run_config(root, fmt, "torch"), resolve_mask({"share": 0.5, "boxes": str(boxes),
                                                                       "boxes_format": "csv"}))
        items.append([val[j] for j in range(len(val))])
    for (x, y, m), (x2, y2, m2) in zip(*items):
        assert torch.equal(x, x2) and y == y2 and torch.equal(m, m2)
    assert len(items[1]) == SPLITS["val"] + 1


def test_the_check_job_reads_the_pack_as_the_loaders_do(folder, pack, tmp_path):
    from evit.check import dataset_classes

    assert dataset_classes("folder", str(pack), ("train", "val"), "packed") == 10
    assert dataset_classes("folder", str(folder), ("train", "val"), "folder") == 10
    broken = copy_pack(pack, tmp_path / "broken")
    shard = broken / "val" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=f"{shard}: the shard is truncated"):
        dataset_classes("folder", str(broken), ("train", "val"), "packed")
