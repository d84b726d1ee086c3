"""A method from its own installed package: a throwaway package `evit-cut`, installed into a folder of its own,
provides the method `cut` by an entry point of group `evit.methods`, with no edit to evit/. The workflow then runs it
in every process (Snakemake, the launcher, the local jobs, the bench and the report), and `evit config` lists its
keys. Without the package on the path, the same method is unknown."""
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from evit.methods import METHODS
from test_workflow import snakemake, tiny_checkpoint, tiny_config, write_config  # noqa: F401 (tiny_checkpoint: a fixture)

PACKAGE = {
    "pyproject.toml": """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "evit-cut"
version = "0.1"

[project.entry-points."evit.methods"]
cut = "evit_cut:METHOD"

[tool.setuptools]
packages = ["evit_cut"]
""",
    # the torch-free side: what the config, the workflow and the report ask of the method
    "evit_cut/__init__.py": '''
from evit.config.fields import Field, PerRecipe
from evit.methods import Method


def cut_at(step, iters_per_epoch, cut, warmup_epochs):
    return 0 if step < warmup_epochs * iters_per_epoch else cut


METHOD = Method(
    "Cut", "cut_", "evit_cut.models", {"cut": Field("int", 0, lo=0, help="Cut: patch tokens dropped after block 0.")},
    override="cut", shown=("cut",),
    schedule=lambda m, t, ipe: lambda step: cut_at(step, ipe, m["cut"], t["cut_warmup"]),
    train_params={"cut_warmup": Field("float", PerRecipe(none=0.0, scratch=5.0, finetune=0.0, demo=0.0), lo=0.0,
                                      help="Cut: epochs before the cut starts.")},
    schedule_words=lambda s: f"no cut for {s['cut_warmup']:g} ep",
    grad_checkpointing=False, compile=False,
)
''',
    # the model side: a timm ViT whose first block drops the last `cut` patch tokens
    "evit_cut/models.py": '''
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from evit.models.base import BlockTokens, TokenReducer


class Cut(TokenReducer, VisionTransformer):
    def __init__(self, *args, cut=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.cut = cut

    def token_counts(self, num_patches=None, cut=None):
        n = (num_patches or self.patch_embed.num_patches) + 1
        cut = self.cut if cut is None else cut
        return [BlockTokens(n, n - cut, cut > 0, False)] + [BlockTokens(n - cut, n - cut, False, False)] * (
            len(self.blocks) - 1)

    def forward_features(self, x, cut=None):
        cut = self.cut if cut is None else cut
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0 and cut:
                x = x[:, : x.shape[1] - cut]
        return self.norm(x)

    def forward(self, x, cut=None):
        return self.forward_head(self.forward_features(x, cut))


@register_model
def cut_deit_tiny_patch16_224(pretrained=False, **kwargs):
    kwargs = dict(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs)
    return build_model_with_cfg(Cut, "cut_deit_tiny_patch16_224", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
''',
}


def uv() -> list[str]:
    """The uv that `make env` uses (the project's Makefile: `python3 -m uv`), or one on the PATH."""
    return [shutil.which("uv")] if shutil.which("uv") else ["python3", "-m", "uv"]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The package, installed with uv into a folder of its own (put on PYTHONPATH by the tests)."""
    source = tmp_path_factory.mktemp("evit-cut")
    for name, text in PACKAGE.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text.lstrip())
    site = tmp_path_factory.mktemp("site")
    subprocess.run([*uv(), "pip", "install", "--quiet", "--python", sys.executable, "--no-deps", "--target",
                    str(site), str(source)], check=True, capture_output=True, text=True, timeout=300)
    assert (site / "evit_cut" / "models.py").is_file()
    return site


def with_path(site: Path) -> dict:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_the_reference_lists_an_installed_methods_keys(plugin_site):
    evit = [sys.executable, "-m", "evit.cli", "config"]
    listed = subprocess.run(evit, env=with_path(plugin_site), capture_output=True, text=True, check=True).stdout
    assert "| `model.cut` | int >= 0 | `0` | Cut: patch tokens dropped after block 0. |" in listed
    assert "`train.cut_warmup`" in listed and "scratch `5.0`" in listed
    assert "model.cut" not in subprocess.run(evit, capture_output=True, text=True, check=True).stdout
    assert "cut" not in METHODS  # this process never saw it


@pytest.mark.slow
def test_an_installed_method_runs_through_the_workflow(tmp_path, plugin_site, tiny_checkpoint, monkeypatch):
    results = tmp_path / "results"
    experiments = [
        {"name": "base", "method": "none", "tables": ["main"], "paper": None},
        {"name": "cut_4", "method": "cut", "cut": 4, "recipe": "none", "tables": ["main"]},
        {"name": "cut_4_ft", "method": "cut", "cut": 4, "tables": ["main"], "run": {"train": {"cut_warmup": 0.5}}},
        {"name": "evit_0.5", "keep_rate": 0.5, "recipe": "none", "tables": ["main"]},
    ]
    cfg = tiny_config(results, experiments, checkpoints={"base": str(tiny_checkpoint)}, backend="local")
    cfg.pop("masking")
    config_file = write_config(tmp_path / "c.yaml", cfg)

    unknown = snakemake("all", "-n", "--configfile", str(config_file), check=False)
    assert unknown.returncode != 0 and "cut" in unknown.stderr + unknown.stdout

    monkeypatch.setenv("PYTHONPATH", with_path(plugin_site)["PYTHONPATH"])
    snakemake("all", "--cores", "2", "--configfile", str(config_file))
    log = [yaml.safe_load(line) for line in (results / "runs/cut_4_ft/log.jsonl").read_text().splitlines()]
    assert log[-1]["cut"] == 4  # the method's schedule ran in the job, with its own training key
    table = pd.read_csv(results / "tables/main.csv").set_index("experiment")
    assert table.loc["cut_4", "method"] == "cut" and table.loc["cut_4", "parameters"] == "cut 4"
    assert table.loc["cut_4_ft", "training"] == "fine-tuned, no cut for 0.5 ep"
    assert table.loc["cut_4", "gmacs"] < table.loc["base", "gmacs"]  # the bench job built the method's model
