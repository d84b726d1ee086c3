#!/usr/bin/env python
"""Our EViT against a straightforward explicit-attention EViT, both over timm's DeiT-S (or -Ti), in one process.

The explicit version is EViT as usually written (and as the official code does it): every block builds the
N x N attention matrix, reads the CLS row from it, top-k + gather, and the fused token as a masked weighted
sum. Ours: fused attention (SDPA) everywhere, the CLS row computed on its own in the three reorganizing
blocks, the fused token as one batched matrix-vector product. Same weights, so the same logits up to fp32
rounding (checked before timing). Rounds are interleaved after a warm-up, as in `evit bench`.

    .venv/bin/python scripts/bench_explicit.py                  # DeiT-S, batch 32, 224 px, fp32, 15 rounds
    .venv/bin/python scripts/bench_explicit.py --size tiny --img-size 64 --batch-size 2 --rounds 1   # a smoke run
"""
from __future__ import annotations

import argparse
import math
from contextlib import nullcontext

import timm
import torch
from torch import nn

import evit.models  # noqa: F401  (registers the EViT models with timm)
from evit.benchmark import quartiles, timed_batches
from evit.provenance import device_name


class ExplicitEViT(nn.Module):
    """EViT over a timm DeiT, attention written out (q k^T, softmax, @ v) in every block."""

    def __init__(self, deit: nn.Module, keep_rate: float, drop_loc=(3, 6, 9)):
        super().__init__()
        self.deit, self.keep_rate, self.drop_loc = deit, keep_rate, drop_loc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.deit
        x = m._pos_embed(m.patch_embed(x))
        for i, blk in enumerate(m.blocks):
            B, N, C = x.shape
            a = blk.attn
            q, k, v = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = x + a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
            if i in self.drop_loc:
                cls_attn = attn[:, :, 0, 1:].mean(dim=1)
                k_keep = math.ceil(self.keep_rate * (N - 1))
                idx = cls_attn.topk(k_keep, dim=1).indices
                others = x[:, 1:]
                kept = others.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))
                rest = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
                fused = (others[rest].reshape(B, -1, C) * cls_attn[rest].reshape(B, -1, 1)).sum(1, keepdim=True)
                x = torch.cat([x[:, :1], kept, fused], dim=1)
            x = x + blk.mlp(blk.norm2(x))
        return m.head(m.norm(x)[:, 0])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("small", "tiny"), default="small", help="DeiT-S or DeiT-Ti")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    args = p.parse_args(argv)

    torch.manual_seed(0)
    arch = f"deit_{args.size}_patch16_224"
    deit = timm.create_model(arch, img_size=args.img_size).eval()
    models = {f"timm {arch}": deit}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    for rate in args.keep_rates:
        ours = timm.create_model(f"evit_{arch}", img_size=args.img_size, keep_rate=rate, fuse_token=True).eval()
        ours.load_state_dict(deit.state_dict())
        explicit = ExplicitEViT(deit, rate)
        with torch.inference_mode():
            diff = (ours(x[:4]) - explicit(x[:4])).abs().max().item()
        assert diff < 1e-4, f"keep rate {rate}: ours and the explicit EViT differ by {diff}"
        models[f"ours (SDPA) {rate}"] = ours
        models[f"explicit attention {rate}"] = explicit

    times = {name: [] for name in models}
    cpu = torch.device("cpu")
    with torch.inference_mode():
        for model in models.values():
            timed_batches(model, x, 2, cpu, nullcontext())
        for r in range(args.rounds):
            for name, model in models.items():
                times[name].append(timed_batches(model, x, 1, cpu, nullcontext()))
            print(f"round {r + 1}/{args.rounds}: "
                  + "  ".join(f"{name} {args.batch_size / times[name][-1]:.1f}" for name in models), flush=True)

    base = quartiles([args.batch_size / t for t in times[f"timm {arch}"]])[1]
    print(f"\n{device_name(cpu)}, {torch.get_num_threads()} threads, batch {args.batch_size}, fp32, torch "
          f"{torch.__version__}, timm {timm.__version__}, {args.rounds} interleaved rounds")
    print(f"{'model':32s} {'img/s':>7s} {'q1':>7s} {'q3':>7s} {'speedup':>8s}")
    medians = {}
    for name, ts in times.items():
        q1, medians[name], q3 = quartiles([args.batch_size / t for t in ts])
        print(f"{name:32s} {medians[name]:7.2f} {q1:7.2f} {q3:7.2f} {medians[name] / base:7.2f}x")
    return medians


if __name__ == "__main__":
    main()
