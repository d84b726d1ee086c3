"""`evit eval`: top-1 / top-5 of one checkpoint (ours, DeiT or official EViT) on a val split, as any method with any
parameters (``--method evit --param keep_rate=0.5``, ``--method tome --param r=8``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from evit import data as D
from evit import engine as E
from evit.checkpoint import load_pretrained, read_checkpoint, state_dict_of
from evit.config import (
    METHODS, ConfigError, apply_overrides, config_hash, load_config, method_params, resolve_config,
)
from evit.distributed import cleanup_distributed, dist_env, init_distributed, resolve_device
from evit.models.factory import build_model, count_params
from evit.provenance import provenance
from evit.trainer import command_errors


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

    info = dist_env()
    device = resolve_device(cfg["train"]["device"], info.local_rank)
    info = init_distributed(device, info)
    try:
        loader, n, raw_val = D.build_eval_loader(cfg, info.rank, info.world_size, device)
        num_classes = D.num_classes_of(cfg, raw_val)
        model = build_model(cfg["model"], num_classes)
        if "head.weight" in state and state["head.weight"].shape[0] != num_classes:
            raise ConfigError(f"{checkpoint} has a {state['head.weight'].shape[0]}-class head but the "
                              f"{cfg['data']['dataset']} dataset has {num_classes} classes")
        load_pretrained(model, checkpoint, state)
        model.to(device)
        amp_dtype = E.amp_dtype_for(cfg["train"]["amp"], device)
        t0 = time.perf_counter()
        try:
            res = E.evaluate(model, loader, device, amp_dtype=amp_dtype)
        finally:
            D.shutdown_workers(loader)
        dt = time.perf_counter() - t0
        m = cfg["model"]
        result = {
            "checkpoint": str(checkpoint), "top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"],
            "num_eval_images": res["num_images"], "arch": m["arch"], "img_size": m["img_size"],
            "method": m["method"], **method_params(m), "dataset": cfg["data"]["dataset"],
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
        overrides.append(f"model.{key.strip()}={value}")
    config = load_config(args.config) if args.config else None
    result = evaluate_checkpoint(args.checkpoint, config, overrides, args.out)
    if dist_env().is_main:
        print(json.dumps({k: result[k] for k in ("top1", "top5", "num_eval_images", "method")}
                         | method_params(result)))
    return 0



def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on the val split",
                       description="Evaluate our, DeiT or official EViT checkpoints, as any method.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="run config YAML for model/data (default: the checkpoint's own)")
    p.add_argument("--arch", help="the backbone, e.g. deit_small_patch16_224")
    p.add_argument("--method", choices=tuple(METHODS), help="token-reduction method (default: none)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the method (model.KEY; VALUE as YAML), e.g. keep_rate=0.5, "
                        "drop_loc=[3,6,9], r=8; repeatable")
    p.add_argument("--dataset", choices=D.DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--val-subset", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--crop-pct", type=float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", help="write the result JSON here (e.g. eval.json)")
    p.set_defaults(func=command_errors(_cmd_eval))
