"""Loading DeiT / official EViT / our checkpoints, written by the tests themselves."""
import argparse
import os
import signal

import pytest
import timm
import torch

import evit.models  # noqa: F401  (registers the EViT models with timm)
from evit.checkpoint import load_checkpoint, load_pretrained, read_state_dict, remove_stale_temps, save_atomic
from evit.errors import CheckpointError, CheckpointMismatchError


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


def logits(model, size=224):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("wrap", ["raw", "model", "ddp"])
def test_loads_deit_checkpoint_layouts(tmp_path, deit_tiny, wrap):
    state = deit_tiny.state_dict()
    if wrap == "model":  # official DeiT / EViT releases: {"model": ..., "optimizer": ..., "epoch": ...}
        state = {"model": state, "epoch": 299}
    elif wrap == "ddp":
        state = {"model": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "deit.pth"
    torch.save(state, path)
    model = timm.create_model("evit_deit_tiny_patch16_224", keep_rate=1.0)
    load_pretrained(model, path)
    torch.testing.assert_close(logits(model), logits(deit_tiny), rtol=0, atol=1e-5)


def test_resizes_pos_embed_for_another_input_size(tmp_path, deit_tiny):
    path = tmp_path / "deit.pth"
    torch.save(deit_tiny.state_dict(), path)
    model = timm.create_model("evit_deit_tiny_patch16_224", img_size=272, keep_rate=0.7)
    load_pretrained(model, path)
    assert model.pos_embed.shape == (1, 1 + 17 * 17, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], deit_tiny.pos_embed[:, 0])  # CLS entry kept as is
    assert logits(model, 272).shape == (2, 1000)


def test_drops_a_head_of_another_class_count_with_a_warning(tmp_path, deit_tiny):
    path = tmp_path / "deit.pth"
    torch.save(deit_tiny.state_dict(), path)
    model = timm.create_model("evit_deit_tiny_patch16_224", num_classes=10)
    head_before = model.head.weight.clone()
    with pytest.warns(UserWarning, match="dropping the classifier head"):
        load_pretrained(model, path)
    assert torch.equal(model.head.weight, head_before)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, deit_tiny.blocks[0].attn.qkv.weight)


def test_wrong_architecture_names_the_mismatched_keys(tmp_path, deit_tiny):
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit_tiny.state_dict()}, path)
    model = timm.create_model("evit_deit_small_patch16_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape .*blocks\.0\.attn\.qkv\.weight"):
        load_pretrained(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    shallow = timm.create_model("evit_deit_tiny_patch16_224", depth=6, drop_loc=(3,))
    torch.save(shallow.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\): blocks\.6\."):
        load_pretrained(timm.create_model("evit_deit_tiny_patch16_224"), path)


def test_loads_an_official_evit_training_checkpoint(tmp_path):
    """The layout of the official EViT main.py's checkpoint.pth: weights plus optimizer, timm scheduler, AMP scaler,
    epoch, EMA weights and the run's argparse.Namespace -- readable weights-only, with the Namespace allowed."""
    from timm.scheduler import create_scheduler_v2

    torch.manual_seed(0)
    trained = timm.create_model("evit_deit_tiny_patch16_224", keep_rate=0.7, fuse_token=True, num_classes=10,
                                img_size=64)
    opt = torch.optim.AdamW(trained.parameters(), lr=5e-4, weight_decay=0.05)
    trained(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()                                       # a real optimizer state: exp_avg / exp_avg_sq per parameter
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=30, warmup_epochs=5, min_lr=1e-5, warmup_lr=1e-6)
    sched.step(3)
    args = argparse.Namespace(model="deit_small_patch16_224", batch_size=128, epochs=30, lr=2e-5, min_lr=2e-6,
                              weight_decay=1e-6, base_keep_rate=0.7, keep_rate=0.7, drop_loc="(3, 6, 9)",
                              fuse_token=True, finetune="deit_small_patch16_224-cd65a155.pth", input_size=224,
                              model_ema=False, output_dir="output/evit-0.7", dist_url="env://", seed=0,
                              sched="cosine", warmup_epochs=0, mixup=0.8, smoothing=0.1)
    for ema in (trained.state_dict(), None):
        path = tmp_path / "checkpoint.pth"
        torch.save({"model": trained.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                    "epoch": 3, "model_ema": ema, "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args},
                   path)
        assert torch.load(path, weights_only=False)["args"] == args   # the file really holds the Namespace
        with pytest.raises(Exception, match="argparse.Namespace"):  # which plain weights-only loading refuses
            torch.load(path, weights_only=True)
        model = timm.create_model("evit_deit_tiny_patch16_224", keep_rate=0.7, fuse_token=True, num_classes=10,
                                  img_size=64)
        load_pretrained(model, path)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            assert torch.equal(model.eval()(x), trained.eval()(x))
    # the Namespace is allowed only while we load: torch's global allowlist is left as it was
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_refuses_pickled_code_and_non_checkpoints(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": print}, evil)  # needs full unpickling
    with pytest.raises(CheckpointError, match=r"evil\.pth is not a readable checkpoint \(it needs print"):
        read_state_dict(evil)
    evil_args = tmp_path / "evil_args.pth"  # code hidden inside the one allowed class is still refused
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-3, hook=os.system)}, evil_args)
    with pytest.raises(CheckpointError, match="it needs posix.system"):
        read_state_dict(evil_args)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(junk)


def test_reads_published_safetensors_weights_and_names_a_truncated_file(tmp_path, deit_tiny):
    """timm's published weights are .safetensors files: read to the same tensors; a truncated one is one error
    naming it, and is left as it was."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(deit_tiny.state_dict(), path)
    state = read_state_dict(path)
    assert state.keys() == deit_tiny.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in deit_tiny.state_dict().items())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"^{path} is not a readable checkpoint \\(truncated or corrupt"):
        read_state_dict(path)
    assert path.stat().st_size == 1000


def test_truncated_training_checkpoint_is_one_clear_error_and_left_alone(tmp_path):
    path = tmp_path / "run" / "checkpoint.pth"
    model = timm.create_model("evit_deit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=4,
                              num_heads=2, num_classes=10, drop_loc=(1, 2))
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {"format": "evit-train-v1", "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": {"t_initial": 30}, "scaler": None, "state": {"epoch": 1, "step": 8}, "epoch": 1, "step": 8,
            "config": {"train": {"epochs": 3}}}
    save_atomic(ckpt, path)
    loaded = load_checkpoint(path)
    assert loaded["config"] == ckpt["config"] and torch.equal(loaded["model"]["pos_embed"], model.pos_embed.detach())

    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    half = path.read_bytes()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a readable checkpoint (truncated or corrupt") and "\n" not in msg
    assert msg.endswith("delete it to start the run over, or restore it")
    assert path.read_bytes() == half and [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]

    path.write_bytes(b"")                                   # an empty file (e.g. a full disk) is the same error
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    save_atomic({"model": model.state_dict()}, path)        # readable, but weights only: not a training checkpoint
    with pytest.raises(CheckpointError, match="not a training checkpoint of evit .no optimizer, scheduler, state"):
        load_checkpoint(path)
    save_atomic(ckpt, path)
    path.write_bytes(path.read_bytes()[:-100])              # a torn end (lost central directory)
    with pytest.raises(CheckpointError, match=f"^{path} is not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pth")


def test_save_atomic_replaces_whole_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pth"
    save_atomic({"a": torch.ones(3)}, path)
    save_atomic({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]


def test_a_checkpoint_write_killed_by_sigterm_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    """SIGTERM kills a process without unwinding it, so `save_atomic`'s own cleanup cannot run: its temp file
    stays, until `remove_stale_temps` (which `evit train` calls at every start) removes it, and nothing else."""
    import subprocess
    import sys

    path = tmp_path / "checkpoint.pth"
    writer = ("import os, signal, sys, torch\n"
              "from evit.checkpoint import save_atomic\n"
              "def save(obj, f):\n"
              "    f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGTERM)\n"
              "torch.save = save\n"
              "save_atomic({}, sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", writer, str(path)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGTERM
    stale = [p for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].name.startswith(".checkpoint.pth.") and stale[0].name.endswith(".tmp")
    others = [tmp_path / n for n in (".other.pth.abc.tmp", ".checkpoint.pth.abc.part", "checkpoint.pth.tmp")]
    for other in others:
        other.write_bytes(b"")
    assert remove_stale_temps(path) == stale
    assert sorted(tmp_path.iterdir()) == sorted(others)
