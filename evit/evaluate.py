"""`evit eval`: top-1 / top-5 of one checkpoint (ours, DeiT or official EViT) on a val split, as any method with any
parameters (``--method evit --param keep_rate=0.5``, ``--method tome --param r=8``); and of a comparison backbone's
published timm weights off the shelf (`evaluate_backbone`, ``evit eval --backbone NAME``)."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image

from evit import engine as E
from evit.checkpoint import load_pretrained, read_checkpoint, state_dict_of
from evit.errors import CheckpointMismatchError, ConfigError
from evit.methods import METHODS, method_params
from evit.config.io import apply_overrides, config_hash, load_config, parse_value
from evit.config.schema import resolve_config
from evit.data.catalog import DATASETS
from evit.data.loaders import build_eval_loader, close_loader, num_classes_of
from evit.distributed import cleanup_distributed, dist_env, init_distributed, resolve_device
from evit.models.factory import build_model, count_params
from evit.provenance import provenance


def evaluate_checkpoint(checkpoint: str | Path, config: dict | None = None, overrides: list[str] | None = None,
                        out: str | Path | None = None) -> dict:
    """Evaluate ``checkpoint`` (ours, DeiT, official EViT) on the val split; returns (and writes) eval.json.

    The run config is: ``config`` if given, else the checkpoint's own (ours), else defaults; ``overrides``
    (``section.key=value``) apply last. A foreign checkpoint therefore needs at least ``model.arch`` and the
    data section; the result names the method and its parameters, which ``model.<param>`` sets (and
    ``eval.params``, the per-pass parameter of training's evaluation, overrides). The file is read once.
    """
    checkpoint = Path(checkpoint)
    blob = read_checkpoint(checkpoint)
    state = state_dict_of(blob, checkpoint)
    saved = blob.get("config") if isinstance(blob, dict) and isinstance(blob.get("config"), dict) else None
    del blob
    cfg = resolve_config(apply_overrides(config if config is not None else (saved or {}), overrides or []))
    cfg["model"].update(cfg["eval"]["params"])

    def model_for(num_classes: int) -> torch.nn.Module:
        model = build_model(cfg["model"], num_classes)
        if "head.weight" in state and state["head.weight"].shape[0] != num_classes:
            raise ConfigError(f"{checkpoint} has a {state['head.weight'].shape[0]}-class head but the "
                              f"{cfg['data']['dataset']} dataset has {num_classes} classes")
        load_pretrained(model, checkpoint, state)
        return model

    m = cfg["model"]
    described = {"arch": m["arch"], "img_size": m["img_size"], "method": m["method"], **method_params(m)}
    return _evaluate(cfg, checkpoint, model_for, None, described, out)


def evaluate_backbone(checkpoint: str | Path, config: dict, out: str | Path | None = None) -> dict:
    """A comparison backbone off the shelf: timm's ``model.arch`` (a name with its pretrained tag, e.g.
    ``swin_tiny_patch4_window7_224.ms_in1k``) with the weights in ``checkpoint`` (e.g. its published
    ``model.safetensors``), loaded strictly, on the val split through the torch loader with the model's own timm
    pretrained data config (input size, crop, interpolation, mean and std) instead of the run config's; the run
    config gives the data, eval batch size and device. Returns (and writes) eval.json."""
    import timm
    from timm.data import create_transform, resolve_data_config

    checkpoint = Path(checkpoint)
    cfg = resolve_config(config)
    name = cfg["model"]["arch"]
    if not timm.is_model(name):
        raise ConfigError(f"model.arch: timm has no model {name!r} (a comparison backbone)")
    state = state_dict_of(read_checkpoint(checkpoint), checkpoint)
    data_cfg = resolve_data_config({}, pretrained_cfg=timm.get_pretrained_cfg(name).to_dict())
    transform = torchvision.transforms.Compose([functools.partial(Image.Image.convert, mode="RGB"),
                                                create_transform(**data_cfg)])

    def model_for(num_classes: int) -> torch.nn.Module:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # torch names every missing, unexpected and misshapen key, a line each
            why = "; ".join(line.strip() for line in str(e).splitlines()[1:4] if line.strip())
            raise CheckpointMismatchError(f"checkpoint {checkpoint} does not fit timm's {name} with {num_classes} "
                                          f"classes: {why if len(why) < 400 else why[:400] + ' ...'}") from None
        return model

    described = {"arch": name, "img_size": data_cfg["input_size"][-1], "method": "none", "timm": name,
                 "crop_pct": data_cfg["crop_pct"], "interpolation": data_cfg["interpolation"]}
    return _evaluate(cfg, checkpoint, model_for, transform, described, out)


def _evaluate(cfg: dict, checkpoint: Path, model_for, transform, described: dict, out) -> dict:
    """The evaluation both commands share: the val loader (``transform``, or the run config's), the model
    (``model_for(num_classes)``, its weights loaded) on the device, top-1/top-5, and the result JSON."""
    info = dist_env()
    device = resolve_device(cfg["train"]["device"], info.local_rank)
    info = init_distributed(device, info)
    try:
        loader, _, raw_val = build_eval_loader(cfg, info.rank, info.world_size, device, transform)
        model = model_for(num_classes_of(cfg, raw_val)).to(device)
        amp_dtype = E.amp_dtype_for(cfg["train"]["amp"], device)
        t0 = time.perf_counter()
        try:
            res = E.evaluate(model, loader, device, amp_dtype=amp_dtype)
        finally:
            close_loader(loader)
        dt = time.perf_counter() - t0
        result = {
            "checkpoint": str(checkpoint), "top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"],
            "num_eval_images": res["num_images"], **described, "dataset": cfg["data"]["dataset"],
            "params": count_params(model), "eval_time_s": dt,
            "img_per_s": res["num_images"] / max(dt, 1e-9), "meta": cfg.get("meta"),
            "provenance": provenance(config_hash=config_hash(cfg), device=device, world_size=info.world_size),
        }
        if out is not None and info.is_main:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        cleanup_distributed(info)


# --------------------------------------------------------------------------------------------- CLI


def _cmd_eval(args) -> int:
    overrides = list(args.set or [])
    for flag, key in (("arch", "model.arch"), ("method", "model.method"), ("img_size", "model.img_size"),
                      ("patch_size", "model.patch_size"), ("num_classes", "model.num_classes"),
                      ("dataset", "data.dataset"), ("data_root", "data.root"),
                      ("val_subset", "data.val_subset"), ("batch_size", "eval.batch_size"),
                      ("num_workers", "data.num_workers"), ("crop_pct", "eval.crop_pct"),
                      ("device", "train.device"), ("amp", "train.amp")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={json.dumps(v)}")
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. keep_rate=0.7")
        parse_value("--param", item, value)  # a syntax error names --param, not the --set it becomes
        overrides.append(f"model.{key.strip()}={value}")
    config = load_config(args.config) if args.config else None
    if args.backbone:
        if args.method or args.param or args.arch:
            raise ConfigError("--backbone evaluates a timm model as it is published: no --arch, --method or --param")
        overrides.append(f"model.arch={json.dumps(args.backbone)}")
        result = evaluate_backbone(args.checkpoint, apply_overrides(config or {}, overrides), args.out)
    else:
        result = evaluate_checkpoint(args.checkpoint, config, overrides, args.out)
    if dist_env().is_main:
        print(json.dumps({k: result[k] for k in ("top1", "top5", "num_eval_images", "method")}
                         | method_params(result)))
    return 0



def add_commands(sub) -> None:
    p = sub.add_parser("eval", description="Evaluate our, DeiT or official EViT checkpoints, as any method; or a timm "
                                   "backbone's published weights off the shelf (--backbone).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="run config YAML for model/data (default: the checkpoint's own)")
    p.add_argument("--arch", help="the backbone, e.g. deit_small_patch16_224")
    p.add_argument("--backbone", metavar="TIMM_NAME",
                   help="instead: a timm model with its pretrained tag (e.g. swin_tiny_patch4_window7_224.ms_in1k) "
                        "and its published weights (--checkpoint, e.g. model.safetensors), evaluated off the shelf "
                        "with its own timm data config")
    p.add_argument("--method", choices=tuple(METHODS), help="token-reduction method (default: none)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the method (model.KEY; VALUE as YAML), e.g. keep_rate=0.5, "
                        "drop_loc=[3,6,9], r=8; repeatable")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--val-subset", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--crop-pct", type=float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", help="write the result JSON here (e.g. eval.json)")
    p.set_defaults(func=_cmd_eval)
