"""Run configs, the Trainer (exact resume, checkpoints, failure), `evit train` and `evit eval`."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp
import yaml

from evit.config.io import apply_overrides, config_hash, resume_mismatch
from evit.config.schema import resolve_config
from evit.errors import ConfigError, NonFiniteLossError
from evit.methods import keep_rate_at
import evit.trainer as T
from evit import cli, engine as E
from evit.data.catalog import FASHION_MEAN, FASHION_STD, IMAGENET_MEAN
from evit.data.datasets import FashionMNIST, build_dataset
from evit.data.samplers import TrainSampler, subset_indices
from evit.data.seeding import SeededDataset
from evit.data.transforms import build_transform


def tiny_config(**sections) -> dict:
    """A 4-block EViT (dim 32) on 256 real Fashion-MNIST training images; 8 steps per epoch, 3 epochs.

    DropPath, Mixup/CutMix, label smoothing, random crops/flips and the keep-rate schedule are all on, so
    that every random draw the engine makes is covered by the exact-resume tests."""
    cfg = {
        "model": {"arch": "deit_tiny_patch16_224", "method": "evit", "img_size": 28, "patch_size": 4,
                  "keep_rate": 0.7, "drop_loc": [1, 2], "drop_path": 0.1,
                  "kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2}},
        "data": {"dataset": "fashion_mnist", "num_workers": 0, "train_subset": 256, "val_subset": 101},
        "train": {"recipe": "demo", "epochs": 3, "batch_size": 32, "blr": 4e-3, "warmup_epochs": 1,
                  "shrink_start": 0.5, "shrink_epochs": 1, "mixup": 0.8, "cutmix": 1.0, "seed": 1,
                  "demo_padding": 2, "log_every": 100},
        "eval": {"batch_size": 64},
    }
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    return cfg


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ in {diff[:5]}"


def losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["train_loss"] for ln in (run_dir / "log.jsonl").read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The reference: tiny_config trained in one go."""
    run_dir = tmp_path_factory.mktemp("straight")
    metrics = T.Trainer(tiny_config(), run_dir)()
    return run_dir, metrics


# --------------------------------------------------------------------------------------------- config


def test_config_defaults_and_recipes():
    cfg = resolve_config({"model": {"method": "evit"}, "data": {"dataset": "imagenet", "root": "/data/imagenet"}})
    t = cfg["train"]
    assert t["recipe"] == "scratch" and t["epochs"] == 300 and t["blr"] == 5e-4 and t["warmup_epochs"] == 5
    assert (t["mixup"], t["cutmix"], t["smoothing"], t["reprob"], t["repeated_aug"]) == (0.8, 1.0, 0.1, 0.25, 3)
    assert t["aa"] == "rand-m9-mstd0.5-inc1" and (t["shrink_start"], t["shrink_epochs"]) == (10, 100)
    assert cfg["model"]["num_classes"] == 1000 and cfg["eval"]["crop_pct"] == 0.875
    assert cfg["data"]["mean"] == list(IMAGENET_MEAN)
    # the schedule's training keys are the method's: the baseline has none, and refuses EViT's
    plain = resolve_config({"data": {"dataset": "imagenet", "root": "/x"}})["train"]
    assert "shrink_start" not in plain and set(plain) == set(t) - {"shrink_start", "shrink_epochs"}
    with pytest.raises(ConfigError, match="train.shrink_start: a training key of method evit, not of none"):
        resolve_config({"data": {"dataset": "imagenet", "root": "/x"}, "train": {"shrink_start": 0}})
    ft = resolve_config({"model": {"method": "evit"}, "data": {"dataset": "imagenet", "root": "/x"},
                         "train": {"recipe": "finetune", "init_checkpoint": "deit_s.pth", "epochs": 5}})["train"]
    assert (ft["blr"], ft["min_lr"], ft["weight_decay"], ft["warmup_epochs"]) == (2e-5, 2e-6, 1e-6, 0)
    assert (ft["shrink_start"], ft["shrink_epochs"], ft["hold_eval"], ft["epochs"]) == (0, 0, True, 5)
    demo = resolve_config(tiny_config())
    assert demo["eval"]["crop_pct"] == 1.0 and demo["model"]["num_classes"] == 10
    assert demo["data"]["root"] is None and demo["data"]["mean"] == list(FASHION_MEAN)
    # resolving is idempotent, and the launcher / meta sections pass through without entering the hash
    assert resolve_config(demo) == demo
    with_launcher = resolve_config(dict(tiny_config(), launcher={"partition": "gpu"}, meta={"exp": "x"}))
    assert with_launcher["launcher"] == {"partition": "gpu"}
    assert config_hash(with_launcher) == config_hash(demo)
    # YAML 1.1 reads 1e-3 as a string: accepted as a number
    assert resolve_config(tiny_config(train={"blr": "1e-3"}))["train"]["blr"] == 1e-3


@pytest.mark.parametrize("raw, key", [
    ({"trian": {}}, "trian: unknown section"),
    ({"train": {"lr": 0.1}}, "train.lr: unknown key"),
    ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer"),
    ({"train": {"epochs": 0}}, "train.epochs: expected a value >= 1"),
    ({"train": {"amp": "fp8"}}, "train.amp: expected one of none, bf16, fp16"),
    ({"model": {"keep_rate": 1.5}}, "model.keep_rate: expected a value <= 1.0"),
    ({"model": {"keep_rate": 0}}, "model.keep_rate: expected a value > 0.0"),
    ({"model": {"drop_loc": [3, "x"]}}, "model.drop_loc[1]: expected an integer"),
    ({"model": {"method": "none", "keep_rate": 0.7}}, "model.keep_rate: a parameter of method evit, not of none"),
    ({"model": {"r": 8}}, "model.r: a parameter of method tome, not of evit"),
    ({"model": {"method": "adavit"}}, "model.method: expected one of none, evit, tome, dynamicvit"),
    ({"model": {"arch": "evit_deit_tiny_patch16_224"}},
     "model.arch: 'evit_deit_tiny_patch16_224' includes the method (EViT); write `arch: deit_tiny_patch16_224` "
     "and `method: evit`"),
    ({"model": {"kwargs": {"r": 8}}}, "model.kwargs.r: set it as model.r instead"),
    ({"model": {"kwargs": {"img_size": 32}}}, "model.kwargs.img_size"),
    ({"data": {"dataset": "imagenet"}}, "data.root: required"),
    ({"data": {"dataset": "cifar"}}, "data.dataset: expected one of"),
    ({"train": {"batch_size": 31}}, "train.batch_size: Mixup/CutMix need an even batch size"),
    ({"train": {"recipe": "finetune", "mixup": 0, "cutmix": 0}}, "train.init_checkpoint"),
])
def test_config_errors_name_the_key(raw, key):
    base = tiny_config()
    for sec, values in raw.items():
        base[sec] = dict(base.get(sec, {}), **values)
    with pytest.raises(ConfigError) as e:
        resolve_config(base)
    assert key in str(e.value)


def test_overrides():
    raw = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=5", "model.drop_loc=[1, 2]", "meta.exp=a"])
    assert raw == {"train": {"epochs": 5}, "model": {"drop_loc": [1, 2]}, "meta": {"exp": "a"}}
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])


# --------------------------------------------------------------------------------------------- training runs


def test_run_outputs(straight_run):
    run_dir, metrics = straight_run
    log = [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and [r["step"] for r in log] == [8, 16, 24]
    for r in log:
        for k in ("train_loss", "lr", "keep_rate", "top1", "top5", "img_per_s", "epoch_time_s", "train_time_s"):
            assert isinstance(r[k], float), k
    # the keep rate follows the schedule: start 0.5 epochs, cosine over 1 epoch, per iteration
    assert log[0]["keep_rate"] == pytest.approx(keep_rate_at(7, 8, 0.7, 0.5, 1)) and log[2]["keep_rate"] == 0.7
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert metrics["num_eval_images"] == 101 and metrics["top1"] == log[-1]["top1"] > 10   # it learned a bit
    assert metrics["params"] == sum(v.numel() for k, v in final_weights(run_dir).items())
    prov = metrics["provenance"]
    assert prov["config_hash"] == config_hash(resolve_config(tiny_config()))
    assert prov["world_size"] == 1 and prov["torch"] == torch.__version__ and prov["timm"] == timm.__version__
    assert {"git_commit", "python", "device"} <= prov.keys()
    ckpt = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)   # weights_only-safe
    assert (ckpt["epoch"], ckpt["step"]) == (3, 24)
    assert {"optimizer", "scheduler", "scaler", "rng", "sampler", "config"} <= ckpt.keys()
    assert {"python", "numpy", "torch", "cuda"} == ckpt["rng"].keys()
    assert yaml.safe_load((run_dir / "config.resolved.yaml").read_text()) == resolve_config(tiny_config())


def test_resume_after_an_epoch_is_exact(straight_run, tmp_path):
    ref_dir, ref = straight_run
    assert T.Trainer(tiny_config(), tmp_path).run(max_steps=8) is None      # stop after epoch 1
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
    metrics = T.Trainer(tiny_config(), tmp_path)()                          # a fresh Trainer resumes
    assert_same_weights(final_weights(ref_dir), final_weights(tmp_path))
    assert losses(tmp_path) == losses(ref_dir) and metrics["top1"] == ref["top1"]


def test_resume_mid_epoch_with_workers_is_exact(straight_run, tmp_path):
    """Stopped twice mid-epoch (steps 5 and 13), loaded by 2 worker processes: still bitwise the same."""
    ref_dir, ref = straight_run
    cfg = tiny_config(data={"num_workers": 2})
    assert T.Trainer(cfg, tmp_path).run(max_steps=5) is None
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["sampler"]["start"]) == (0, 5, 5 * 32)
    assert T.Trainer(cfg, tmp_path).run(max_steps=13) is None
    metrics = T.Trainer(cfg, tmp_path)()
    assert_same_weights(final_weights(ref_dir), final_weights(tmp_path))
    assert losses(tmp_path) == pytest.approx(losses(ref_dir), abs=0)   # mean of the same per-step losses
    assert metrics["top1"] == ref["top1"] and metrics["steps"] == 24


class Preempted(Exception):
    pass


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_the_cpu_resumes_exactly(amp, tmp_path):
    """paper.yaml's `amp: bf16` (and fp16 with its GradScaler) through the Trainer, as a GPU run takes it:
    a run stopped mid-epoch and resumed (scaler state included) equals the uninterrupted run bitwise."""
    cfg = tiny_config(train={"amp": amp, "epochs": 2})
    straight = T.Trainer(cfg, tmp_path / "straight")()
    assert T.Trainer(cfg, tmp_path / "resumed").run(max_steps=5) is None
    saved = torch.load(tmp_path / "resumed/checkpoint.pth", weights_only=True)
    if amp == "fp16":
        assert saved["scaler"]["scale"] > 0 and saved["scaler"]["_growth_tracker"] == 5  # 5 unskipped steps
    else:
        assert saved["scaler"] is None
    resumed = T.Trainer(cfg, tmp_path / "resumed")()
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    assert resumed["top1"] == straight["top1"]
    T.Trainer(tiny_config(train={"epochs": 2}), tmp_path / "fp32")()
    assert losses(tmp_path / "fp32") != losses(tmp_path / "straight")  # autocast really changed the arithmetic


def test_build_gives_the_run_and_its_step(tmp_path, monkeypatch):
    """`Trainer.build`: the run's parts and `steps`, the loop's step; at the target: the method's parameter at its
    schedule's end and the lr as it is; staged: batches already through the batch stage. Its settings are frozen."""
    trainer = T.Trainer(tiny_config(), tmp_path)
    real_call, overrides = E.call_model, []
    monkeypatch.setattr(E, "call_model", lambda model, x, override: (overrides.append(override),
                                                                     real_call(model, x, override))[1])
    with trainer.build() as run:
        assert (run.ipe, run.batch, run.world_batch, run.num_train, run.num_eval) == (8, 32, 32, 256, 101)
        assert run.target == {"keep_rate": 0.7} and run.ctx.override_fn(0) == {"keep_rate": 1.0}
        lr = run.optimizer.param_groups[0]["lr"]
        state = run.steps(run.epoch(0), at_target=True, max_step=2)
        assert state.step == 2 and overrides == [{"keep_rate": 0.7}] * 2
        assert run.optimizer.param_groups[0]["lr"] == lr
        images, targets = run.stage(*next(iter(run.epoch(1))))
        assert targets.shape == (32, 10)                          # Mixup's soft targets: staged once, not twice
        overrides.clear()
        assert run.steps([(images, targets)], staged=True).step == 1 and overrides == [{"keep_rate": 1.0}]
        with pytest.raises(dataclasses.FrozenInstanceError):
            run.ctx.on_step = print
    assert trainer.checkpoint_now() is False                  # built no more: nothing to save


def test_gradient_checkpointing_trains_the_same_weights(straight_run, tmp_path):
    ref_dir, ref = straight_run
    trainer = T.Trainer(tiny_config(train={"grad_checkpointing": True}), tmp_path)
    metrics = trainer()
    assert_same_weights(final_weights(ref_dir), final_weights(tmp_path))  # DropPath draws are replayed too
    assert metrics["top1"] == ref["top1"]
    with trainer.build() as run:  # really on (the blocks re-run in backward: tests/test_models.py)
        assert run.model.grad_checkpointing


def test_checkpoint_on_request_mid_step_is_exact(straight_run, tmp_path, monkeypatch):
    """A request arriving inside a forward pass (as from a signal handler) saves the state at the start of
    that step; the resumed run redoes the step and ends bitwise equal to the straight run."""
    ref_dir, _ = straight_run
    trainer = T.Trainer(tiny_config(), tmp_path)
    assert trainer.checkpoint_now() is False          # not running: nothing to save
    real_call, calls = E.call_model, []

    def call_model(model, x, override):
        calls.append(override) if model.training else None
        if model.training and len(calls) == 11:      # the 11th training forward = step 10 (epoch 1, step 2)
            assert trainer.checkpoint_now() is True
            raise Preempted
        return real_call(model, x, override)

    monkeypatch.setattr(E, "call_model", call_model)
    with pytest.raises(Preempted):
        trainer()
    monkeypatch.setattr(E, "call_model", real_call)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["state"]["epoch_step"]) == (1, 10, 2)
    restored = pickle.loads(pickle.dumps(trainer))    # as submitit would requeue it
    restored()
    assert_same_weights(final_weights(ref_dir), final_weights(tmp_path))


def test_checkpoint_on_request_during_update_keeps_the_last_one(tmp_path, monkeypatch):
    """A request while the optimizer is updating writes nothing: the last epoch checkpoint stays."""
    cfg = tiny_config(train={"clip_grad": 1.0, "epochs": 2})
    trainer = T.Trainer(cfg, tmp_path)
    real_clip, n = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):          # called inside the update phase
        n.append(1)
        if len(n) == 12:
            assert trainer.checkpoint_now() is False
            raise Preempted
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(Preempted):
        trainer()
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 8)


def test_an_interrupt_during_the_update_saves_that_step_once_it_has_ended(tmp_path, monkeypatch):
    """SIGINT's `Trainer.interrupt` arriving while the optimizer updates: the step ends, is saved, then the run
    stops (`checkpoint_now` alone would save nothing then)."""
    trainer = T.Trainer(tiny_config(train={"clip_grad": 1.0, "epochs": 2}), tmp_path)
    real_clip, n = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):          # called inside the update phase
        n.append(1)
        if len(n) == 11:                 # the update of step 10 (global), 11 steps done once it ends
            assert trainer.interrupt() is None
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(T.Interrupted) as e:
        trainer()
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert e.value.step == ckpt["step"] == 11 and (ckpt["epoch"], ckpt["state"]["epoch_step"]) == (1, 3)


def test_sigint_to_evit_train_saves_the_step_reached_and_exits_with_one_line(tmp_path):
    """Ctrl-C: the step reached is in checkpoint.pth, stderr is one line, the exit status 130; a temp file that a
    killed checkpoint write left is gone at the start; the same command resumes from the step saved."""
    import signal
    import subprocess
    import sys

    cfg = _write(tmp_path / "run.yaml", tiny_config(train={"epochs": 2, "log_every": 1}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".checkpoint.pth.k1ll3d.tmp").write_bytes(b"\0" * 1024)  # as a SIGTERM mid-write leaves it
    argv = [sys.executable, "-m", "evit.cli", "train", "--config", str(cfg), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch 1/2 step 2/8" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert proc.returncode == 130 and ckpt["step"] >= 2
    assert err == (f"evit train: interrupted; saved step {ckpt['step']} to {run_dir / 'checkpoint.pth'}; the same "
                   "command resumes the run\n")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")) == []
    resumed = subprocess.run([*argv, "--max-steps", str(ckpt["step"] + 1)], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and f"at epoch 0, step {ckpt['step']}" in resumed.stdout, resumed.stderr


def test_trainer_pickles_and_finished_runs_return_metrics(straight_run, tmp_path):
    ref_dir, ref = straight_run
    trainer = T.Trainer(tiny_config(), ref_dir)
    clone = pickle.loads(pickle.dumps(trainer))
    assert clone.config == trainer.config and clone.run_dir == ref_dir
    before = (ref_dir / "checkpoint.pth").stat().st_mtime_ns
    again = clone()                                  # already finished: evaluates, does not train
    assert again["top1"] == ref["top1"] and again["steps"] == 24
    assert (ref_dir / "checkpoint.pth").stat().st_mtime_ns == before
    assert len(losses(ref_dir)) == 3


def test_resume_refuses_another_config(straight_run):
    ref_dir, _ = straight_run
    with pytest.raises(ConfigError, match=r"train\.blr: checkpoint 0\.004 vs config 0\.002"):
        T.Trainer(tiny_config(train={"blr": 2e-3}), ref_dir)()
    # keys that do not change the maths may differ
    assert resume_mismatch(resolve_config(tiny_config()),
                             resolve_config(tiny_config(data={"num_workers": 3}, eval={"batch_size": 7}))) == []


def test_nan_loss_stops_without_writing_a_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        T.Trainer(tiny_config(train={"blr": 1e30, "warmup_epochs": 0, "mixup": 0, "cutmix": 0}), tmp_path)()
    assert e.value.epoch == 0 and e.value.step < 8
    assert not (tmp_path / "checkpoint.pth").exists() and not (tmp_path / "metrics.json").exists()


def test_poisoned_batch_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN image in epoch 2 stops the run; the epoch-1 checkpoint and log stay as they were."""
    real_set_epoch, real_getitem, poison = TrainSampler.set_epoch, SeededDataset.__getitem__, []

    def set_epoch(self, epoch, start=0):
        poison[:] = [epoch == 1]
        real_set_epoch(self, epoch, start)

    def getitem(self, key):
        img, y = real_getitem(self, key)
        return (img * float("nan") if poison and poison[0] and isinstance(key, tuple) else img), y

    monkeypatch.setattr(TrainSampler, "set_epoch", set_epoch)
    monkeypatch.setattr(SeededDataset, "__getitem__", getitem)
    trainer = T.Trainer(tiny_config(), tmp_path)
    with pytest.raises(NonFiniteLossError) as e:
        trainer()
    assert (e.value.epoch, e.value.step) == (1, 8)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len(losses(tmp_path)) == 1 and not (tmp_path / "metrics.json").exists()
    assert trainer.checkpoint_now() is False         # the run is over: a late request writes nothing


def test_finetune_recipe_loads_init_and_matches_eval(straight_run, tmp_path):
    """finetune: weights from init_checkpoint, keep rate 0.7 from step 0, model in eval mode. With lr 0 the
    weights stay put, so its final top-1 equals `evit eval` of the init checkpoint at keep rate 0.7."""
    ref_dir, _ = straight_run
    init = tmp_path / "init.pth"
    torch.save({"model": final_weights(ref_dir)}, init)                # a foreign-style {"model": ...} file
    cfg = tiny_config(train={"recipe": "finetune", "init_checkpoint": str(init), "epochs": 1, "blr": 0.0, "min_lr": 0.0,
                             "augment": "demo", "aa": None, "reprob": 0.0, "repeated_aug": 1, "batch_size": 32},
                      model={"keep_rate": 0.5, "fuse_token": True})
    for key in ("shrink_start", "shrink_epochs", "warmup_epochs", "mixup", "cutmix"):
        del cfg["train"][key]                                          # the finetune recipe's values
    resolved = resolve_config(cfg)
    assert resolved["train"]["hold_eval"] and resolved["train"]["shrink_epochs"] == 0
    metrics = T.Trainer(cfg, tmp_path / "ft")()
    assert_same_weights(final_weights(ref_dir), final_weights(tmp_path / "ft"))
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(init), "--config", str(_write(tmp_path / "c.yaml", cfg)),
                     "--param", "keep_rate=0.5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["top1"] == metrics["top1"] and result["keep_rate"] == 0.5
    assert result["num_eval_images"] == 101


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------------------------- evit eval


def test_eval_own_checkpoint_and_keep_rate_override(straight_run, tmp_path, capsys):
    ref_dir, ref = straight_run
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(ref_dir / "checkpoint.pth"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["top1"] == ref["top1"] and res["top5"] == ref["top5"] and res["keep_rate"] == 0.7
    assert res["provenance"]["config_hash"] and res["provenance"]["world_size"] == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == ref["top1"]
    # keep rate 1 = the full ViT: another (deterministic) accuracy, recorded as such
    cli.main(["eval", "--checkpoint", str(ref_dir / "checkpoint.pth"), "--param", "keep_rate=1.0", "--out", str(out)])
    full = json.loads(out.read_text())
    assert full["keep_rate"] == 1.0 and full["val_loss"] != res["val_loss"]


def test_eval_a_deit_checkpoint_as_evit_and_tome(tmp_path):
    """A plain timm DeiT state dict evaluates off the shelf as EViT and as ToMe; at keep rate 1 / r 0 each equals
    the DeiT model itself."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=4,
                             num_heads=2, num_classes=10)
    ckpt = tmp_path / "deit.pth"
    torch.save(deit.state_dict(), ckpt)                                  # raw state dict, as DeiT's releases
    args = ["eval", "--checkpoint", str(ckpt), "--arch", "deit_tiny_patch16_224", "--img-size", "28",
            "--patch-size", "4", "--dataset", "fashion_mnist", "--val-subset", "64", "--num-workers", "0",
            "--set", "model.kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
            "--set", "train.augment=demo", "--amp", "none"]  # the recipe (scratch) would autocast to bf16
    evit = ["--method", "evit", "--param", "drop_loc=[1,2]"]
    runs = {"k1": evit + ["--param", "keep_rate=1.0"], "k05": evit + ["--param", "keep_rate=0.5", "--param",
                                                                     "fuse_token=true"],
            "r0": ["--method", "tome", "--param", "r=0"], "r3": ["--method", "tome", "--param", "r=3"]}
    for name, extra in runs.items():
        assert cli.main(args + extra + ["--out", str(tmp_path / f"{name}.json")]) == 0
    res = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    tf = build_transform("demo", False, 28, FASHION_MEAN, FASHION_STD)
    ds = SeededDataset(FashionMNIST(None, "val"), tf, subset_indices(10000, 64))
    direct = E.evaluate(deit, torch.utils.data.DataLoader(ds, batch_size=64), torch.device("cpu"))
    for name in ("k1", "r0"):
        assert res[name]["top1"] == direct["top1"] and res[name]["val_loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert res["k05"]["method"] == "evit" and res["k05"]["keep_rate"] == 0.5 and res["k05"]["fuse_token"] is True
    assert res["r3"]["method"] == "tome" and res["r3"]["r"] == 3 and "keep_rate" not in res["r3"]
    for name in ("k05", "r3"):  # fewer tokens: another loss
        assert res[name]["val_loss"] != res["k1"]["val_loss"]


def test_eval_needs_an_arch_for_foreign_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "w.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=2,
                                 num_heads=2, num_classes=10).state_dict(), ckpt)
    # without a config, the defaults (DeiT-S, imagenet) do not fit: one clear error, exit status 2
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--dataset", "fashion_mnist", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_a_comparison_backbone_is_evaluated_off_the_shelf_with_its_own_timm_data_config(tmp_path, capsys):
    """`evit eval --backbone NAME` (the comparison's eval job): timm's model of a pretrained tag, its weights in the
    published format (safetensors) loaded strictly, real val images through timm's own transform of that tag (160 px,
    crop 0.95, bicubic; not the run config's 224 px): the top-1 and loss of that transform and model by hand. Weights
    of another model are one error naming both."""
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config

    name = "test_vit.r160_in1k"
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    args = ["eval", "--backbone", name, "--dataset", "fashion_mnist", "--val-subset", "40", "--num-workers", "0",
            "--batch-size", "16", "--out", str(tmp_path / "eval.json")]
    assert cli.main([*args, "--checkpoint", str(tmp_path / "model.safetensors")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())

    transform = create_transform(**resolve_data_config({}, model=model))
    val = build_dataset("fashion_mnist", None, "val")
    items = [val[i] for i in subset_indices(len(val), 40)]
    images = torch.stack([transform(image) for image, _ in items])
    labels = torch.tensor([label for _, label in items])
    with torch.inference_mode():
        logits = model(images)
    assert images.shape[-1] == result["img_size"] == 160 and result["timm"] == name
    assert result["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert result["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)

    save_file(timm.create_model("test_vit2.r160_in1k", num_classes=10).state_dict(), tmp_path / "other.safetensors")
    assert cli.main([*args, "--checkpoint", str(tmp_path / "other.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"other.safetensors does not fit timm's {name} with 10 classes" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- CLI


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", tiny_config(train={"epocs": 3}))
    assert cli.main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "train.epocs: unknown key" in capsys.readouterr().err
    missing = _write(tmp_path / "m.yaml", tiny_config(data={"root": str(tmp_path / "no-fashion")}))
    assert cli.main(["train", "--config", str(missing), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no-fashion") in err and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.slow
def test_cli_train_subprocess(tmp_path):
    """`evit train` as the launcher runs it: a fresh process, plain log lines (not a TTY)."""
    import subprocess
    import sys

    cfg = _write(tmp_path / "run.yaml", dict(tiny_config(train={"epochs": 1}), launcher={"timeout_min": 5}))
    proc = subprocess.run([sys.executable, "-m", "evit.cli", "train", "--config", str(cfg), "--run-dir",
                           str(tmp_path / "run"), "--set", "train.log_every=4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1 step 4/8" in proc.stdout and "epoch 1/1 step 8/8" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["num_eval_images"] == 101


@pytest.mark.slow
def test_compiled_training_through_the_whole_keep_rate_schedule_compiles_a_bounded_number_of_times(tmp_path):
    """train.compile with compile_levels 2 through a whole shrink (1 -> 0.7 over 8 steps of 16): the rates are
    1, 0.85 and 0.7, each compiled once (dynamo's counters; a fourth graph would be an error, not eager), and
    the model trains. Dynamo's aot_eager backend, as inductor's C++ builds take minutes here (the bench test
    compiles EViT with inductor). In a child process: compiling starts threads after which the fork-based DDP
    tests cannot fork."""
    import subprocess
    import sys

    cfg = tiny_config(train={"epochs": 2, "compile": True, "compile_levels": 2, "eval_every": 0})
    code = f"""
import functools, json, torch
from torch._dynamo.utils import counters
from evit import engine as E
from evit.trainer import Trainer
torch.set_num_threads(1)
E.compile_for_training = functools.partial(E.compile_for_training, backend="aot_eager")
metrics = Trainer({cfg!r}, {str(tmp_path / "run")!r})()
print(json.dumps(dict(frames=counters["frames"]["ok"], graphs=counters["stats"]["unique_graphs"],
                      breaks=len(counters["graph_break"]), top1=metrics["top1"])))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["graphs"] == 3 and res["breaks"] == 0, res
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log]
    assert len(log) == 2 and losses[1] < losses[0] and res["top1"] > 10, (losses, res)


# --------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_train_worker(rank: int, world: int, port: int, run_dir: str, out):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    out[rank] = T.Trainer(_ddp_config(batch_size=16), run_dir)()


def _ddp_config(batch_size: int) -> dict:
    # without Mixup and DropPath (drawn per process batch), 2 x 16 is the same computation as 1 x 32
    return tiny_config(train={"epochs": 2, "batch_size": batch_size, "mixup": 0, "cutmix": 0},
                       model={"drop_path": 0.0})


@pytest.mark.slow
def test_ddp_training_two_gloo_processes(tmp_path):
    """2 gloo processes x 16 images = 1 process x 32: same images, augmentations and averaged gradients, so
    the same weights up to float rounding; exact eval counts; rank 0 alone writes."""
    single = T.Trainer(_ddp_config(batch_size=32), tmp_path / "single")()
    with mp.get_context("fork").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_ddp_train_worker, args=(2, _free_port(), str(tmp_path / "ddp"), out), nprocs=2,
                           start_method="fork")
        res = dict(out)
    assert res[0]["top1"] == res[1]["top1"] and res[0]["num_eval_images"] == 101
    assert res[0]["steps"] == single["steps"] == 16 and res[0]["provenance"]["world_size"] == 2
    log = [json.loads(ln) for ln in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert [r["train_loss"] for r in log] == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(a[k], b[k]) for k in a)     # really two different computations
