"""A method is one plug-in: a toy method, defined in this file alone (its registry entry and its timm model), runs
through config validation, build_model, training's schedule, evaluation, the bench, MACs and a report row, with
nothing edited elsewhere."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch.utils.flop_counter import FlopCounterMode

from evit.config.fields import Field
from evit.config.schema import resolve_config
from evit.errors import ConfigError
from evit.methods import METHODS, Method, method_params, register_method
from evit import cli, report as R
from evit.benchmark import benchmark, count_macs
from evit.layout import REPORT_FIGURES
from evit.models.base import BlockTokens, TokenReducer, deit_cfg
from evit.models.factory import build_model
from evit.report.figures import _colours
from evit.trainer import Trainer

# ----------------------------------------------------------------------------------------- the toy method: Trim


class TrimBlock(Block):
    """Between attention and MLP, drops the `cut` patch tokens least similar to the CLS token."""

    cut = 0  # set by the model for each pass
    sort = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.cut:
            score = (x[:, 1:] @ x[:, :1].transpose(1, 2))[..., 0]  # B, N-1: each patch token . CLS
            keep = score.topk(x.shape[1] - 1 - self.cut, dim=1, sorted=True).indices
            keep = keep if self.sort else keep.sort(dim=1).values
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Trim(TokenReducer, VisionTransformer):
    """A timm ViT whose block `at` drops `cut` patch tokens."""

    def __init__(self, *args, cut: int = 0, at: int = 0, sort: bool = True, **kwargs):
        super().__init__(*args, block_fn=TrimBlock, **kwargs)
        self.cut, self.at = cut, at
        for block in self.blocks:
            block.sort = sort

    def token_counts(self, num_patches: int | None = None, cut: int | None = None) -> list[BlockTokens]:
        n = (num_patches or self.patch_embed.num_patches) + 1
        cut = self.cut if cut is None else cut
        counts = []
        for i in range(len(self.blocks)):
            n_out = n - cut if i == self.at else n
            counts.append(BlockTokens(n, n_out, n_out < n, False))
            n = n_out
        return counts

    def extra_macs(self, tokens: BlockTokens) -> int:
        return (tokens.attn - 1) * self.embed_dim if tokens.reorganized else 0  # the scores

    def forward(self, x: torch.Tensor, cut: int | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            block.cut = (self.cut if cut is None else cut) if i == self.at else 0
        return super().forward(x)


default_cfgs = generate_default_cfgs({"trim_deit_tiny_patch16_224.fb_in1k": deit_cfg()})


@register_model
def trim_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Trim:
    kwargs = dict(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs)
    return build_model_with_cfg(Trim, "trim_deit_tiny_patch16_224", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


TRIM = Method(
    "Trim", "trim_", __name__, {
        "cut": Field("int", 0, lo=0, help="Trim: patch tokens dropped."),
        "at": Field("int", 0, lo=0, help="Trim: the block that drops them."),
        "sort": Field("bool", True, help="Trim: order the kept tokens by score (else by position)."),
    },
    override="cut", shown=("cut",), variant=("sort",), brief={"sort": lambda v: "sorted" if v else "in place"},
    schedule=lambda m, t, ipe: lambda step: min(m["cut"], step),  # one more token each step, up to `cut`
    grad_checkpointing=False, compile=False,
)

# ----------------------------------------------------------------------------------------- the tests

TINY = {"arch": "deit_tiny_patch16_224", "img_size": 28, "patch_size": 4, "drop_path": 0.0,
        "kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2}}
DATA = {"dataset": "fashion_mnist", "num_workers": 0, "train_subset": 32, "val_subset": 64}
TRAIN = {"recipe": "demo", "epochs": 1, "batch_size": 8, "device": "cpu", "eval_every": 0}


@pytest.fixture(scope="module")
def trim():
    """The toy method, registered for this module's tests only (the docs and schema tests see the real ones)."""
    register_method("trim", TRIM)
    yield TRIM
    del METHODS["trim"]


def resolve(**model) -> dict:
    return resolve_config({"model": {**TINY, "method": "trim", **model}, "data": DATA, "train": TRAIN})


def test_the_registry_refuses_a_method_that_is_not_new(trim):
    with pytest.raises(ValueError, match="method 'trim2': its name, its prefix 'evit_' and its keys"):
        register_method("trim2", Method("Trim2", "evit_", None, {}))
    with pytest.raises(ValueError, match=r"keys \['keep_rate'\] must be new"):
        register_method("trim2", Method("Trim2", "trim2_", None, {"keep_rate": Field("float", 1.0)}))
    assert "trim2" not in METHODS


def test_a_toy_method_runs_through_the_whole_pipeline(trim, tmp_path, one_thread):
    # config: its parameters with their defaults, checked; what it does not support is named
    cfg = resolve(cut=3, at=1)
    assert method_params(cfg["model"]) == {"cut": 3, "at": 1, "sort": True}
    with pytest.raises(ConfigError, match="model.cut: expected a value >= 0, got -1"):
        resolve(cut=-1)
    with pytest.raises(ConfigError, match="model.keep_rate: a parameter of method evit, not of trim"):
        resolve(keep_rate=0.5)
    with pytest.raises(ConfigError, match="train.grad_checkpointing: method trim does not support it"):
        resolve_config({"model": {**TINY, "method": "trim"}, "data": DATA, "train": {"grad_checkpointing": True}})
    assert resolve_config({"model": {"method": "trim"}, "data": DATA, "eval": {"params": {"cut": 2}}})
    with pytest.raises(ConfigError, match="train.compile: method trim does not support torch.compile"):
        resolve_config({"model": {"method": "trim"}, "data": DATA, "train": {"compile": True}})

    # build_model: timm's trim_<arch>, and its MACs by the analytic count equal torch's flop counter's
    model = build_model(cfg["model"], 10).eval()
    assert isinstance(model, Trim) and [t.mlp for t in model.token_counts()] == [50, 47, 47, 47]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, 28, 28))
    assert count_macs(model) == counter.get_total_flops() // 2
    assert count_macs(model, cut=0) > count_macs(model) > count_macs(model, cut=9)

    # training: the method's schedule sets the per-pass parameter of every step (logged under its name)
    metrics = Trainer(cfg, tmp_path / "run")()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["cut"] == 3 and metrics["cut"] == 3 and metrics["at"] == 1     # 4 steps: cut min(3, 3)

    # evaluation: `evit eval --method trim --param ...` on the run's weights; cut 0 is another model
    out = {}
    for name, cut in (("cut3", "3"), ("cut0", "0")):
        out[name] = tmp_path / f"{name}.json"
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--param", f"cut={cut}",
                         "--out", str(out[name])]) == 0
    res = {name: json.loads(path.read_text()) for name, path in out.items()}
    assert res["cut3"]["top1"] == metrics["top1"] and res["cut3"]["method"] == "trim"
    assert res["cut0"]["cut"] == 0 and res["cut0"]["val_loss"] != res["cut3"]["val_loss"]

    # the bench: the model built from its section, its MACs; compile is refused as the method says
    base = resolve_config({"model": TINY, "data": DATA})["model"]
    sections = {"deit": base, "trim_3": cfg["model"], "trim_0": resolve(cut=0, sort=False)["model"]}
    bench = benchmark(list(sections.values()), labels=list(sections), batch_size=2, warmup=0, rounds=1,
                      log=lambda m: None)
    assert bench["gmacs"].tolist() == [count_macs(build_model(s, 10)) / 1e9 for s in sections.values()]
    assert bench["spec"].iloc[1].startswith("trim_deit_tiny_patch16_224:img_size=28,patch_size=4,cut=3,at=1,")
    with pytest.raises(ConfigError, match="compile: method trim does not support torch.compile"):
        benchmark([cfg["model"]], compile=True, log=lambda m: None)

    # a report row, labelled by every parameter off its default, and the figures (the toy in a colour of its own)
    bench_csv = tmp_path / "throughput.csv"
    bench.to_csv(bench_csv, index=False)
    (tmp_path / "deit.json").write_text(json.dumps({"top1": 50.0, "top5": 90.0}))
    experiments = {"tables": {"main": {"title": "toy", "baseline": "deit"}}, "experiments": [
        {"name": "deit", "img_size": 28, "method": "none", "params": {}, "recipe": "demo", "tables": ["main"],
         "result": str(tmp_path / "deit.json")},
        {"name": "trim_3", "img_size": 28, "method": "trim", "params": method_params(cfg["model"]),
         "recipe": "demo", "tables": ["main"], "result": str(out["cut3"])},
        {"name": "trim_0", "img_size": 28, "method": "trim", "params": method_params(sections["trim_0"]),
         "recipe": "none", "tables": ["main"], "result": str(out["cut0"])},
    ]}
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(experiments))
    reference = Path(__file__).resolve().parents[1] / "results" / "reference" / "paper.csv"
    written = R.report(tmp_path / "experiments.yaml", bench_csv, reference, tmp_path / "out", log=lambda m: None)
    assert len(written) == 4 + 2 * len(REPORT_FIGURES)
    table = (tmp_path / "out" / "tables" / "main.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| trim_3 "))
    assert [c.strip() for c in row.split("|")[2:5]] == ["Trim", "cut 3, at 1", "from scratch"]
    row = next(line for line in table.splitlines() if line.startswith("| trim_0 "))
    assert [c.strip() for c in row.split("|")[2:5]] == ["Trim", "cut 0, in place", "off the shelf"]
    order, palette = _colours(["baseline", "Trim sorted", "Trim in place", "EViT fused"])
    assert order == ["baseline", "EViT fused", "Trim sorted", "Trim in place"] and len(set(palette.values())) == 4
