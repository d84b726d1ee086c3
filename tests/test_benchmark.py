"""`evit macs` against the paper and a FLOP counter; `evit bench` output and interleaving."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from evit import benchmark as B
from evit.benchmark import PAPER_MACS_SPECS, benchmark, count_macs, create_model, macs_table, parse_model_spec
from evit.cli import main
from evit.errors import ConfigError

PAPER_GMACS = [4.6, 4.0, 3.5, 3.0, 2.6, 2.3]  # DeiT-S, then EViT-S fused at 0.9 ... 0.5


def test_macs_match_the_paper():
    table = macs_table(PAPER_MACS_SPECS).set_index("model")["gmacs"]
    assert [round(g, 1) for g in table.iloc[:6]] == PAPER_GMACS
    for spec in PAPER_MACS_SPECS[6:9]:  # 272/0.7, 288/0.6, 304/0.5: about DeiT-S's cost
        assert 4.3 <= table[spec] <= 4.7
    assert round(table["deit_base_patch16_224"], 1) == 17.6
    assert round(table["evit_deit_base_patch16_224:keep_rate=0.7,fuse_token=true"], 1) == 11.6


@pytest.mark.parametrize("spec", [
    "deit_small_patch16_224",
    "evit_deit_small_patch16_224:keep_rate=0.7,fuse_token=true",
    "evit_deit_small_patch16_224:keep_rate=0.5,fuse_token=false",
    "evit_deit_tiny_patch16_224:img_size=96,keep_rate=0.6,fuse_token=true,drop_loc=[2,5]",
    "tome_deit_small_patch16_224:r=8",
    "tome_deit_small_patch16_224:r=0",
    "tome_deit_tiny_patch16_224:img_size=96,r=[0,5,5,0,3,3,100,2,2,2,1,1]",
])
def test_analytic_macs_equal_torch_flop_counter(spec):
    model = create_model(spec).eval()
    size = model.patch_embed.img_size[0]
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    counted = counter.get_flop_counts()["Global"]
    assert any("attention" in str(op) for op in counted), "the counter must see the attention matmuls"
    assert count_macs(model) == counter.get_total_flops() // 2


def test_model_specs_parse_and_bad_ones_are_named():
    assert parse_model_spec("evit_deit_small_patch16_224:keep_rate=0.7,fuse_token=true,drop_loc=[3,6,9]") == (
        "evit_deit_small_patch16_224", {"keep_rate": 0.7, "fuse_token": True, "drop_loc": [3, 6, 9]})
    with pytest.raises(ValueError, match="unknown timm model 'evit_nope'"):
        parse_model_spec("evit_nope:keep_rate=0.7")
    with pytest.raises(ValueError, match="expected key=value, got 'keep_rate'"):
        parse_model_spec("evit_deit_small_patch16_224:keep_rate")


def test_bench_interleaves_models_and_reports_speedup_over_the_first():
    specs = ["deit_tiny_patch16_224:img_size=64", "evit_deit_tiny_patch16_224:img_size=64,keep_rate=0.5,fuse_token=true"]
    lines = []
    df = benchmark(specs, labels=["deit", "evit"], batch_size=2, warmup=1, rounds=3, log=lines.append)
    assert list(df["label"]) == ["deit", "evit"]
    assert df["speedup"].iloc[0] == 1.0
    assert df["speedup"].iloc[1] == pytest.approx(df["img_s"].iloc[1] / df["img_s"].iloc[0])
    assert (df["img_s_min"] <= df["img_s"]).all() and (df["img_s"] <= df["img_s_max"]).all()
    assert df["gmacs"].iloc[1] < df["gmacs"].iloc[0]
    for col in ("device", "threads", "batch_size", "img_size", "dtype", "torch", "timm", "date"):
        assert df[col].notna().all(), col
    rounds = [line for line in lines if line.startswith("round")]
    assert len(rounds) == 3 and all("deit" in r and "evit" in r for r in rounds)


TINY_EVIT = ("evit_deit_tiny_patch16_224:img_size=28,patch_size=4,embed_dim=32,depth=4,num_heads=2,"
             "keep_rate=0.5,drop_loc=[1,2]")


def _record_output_dtypes(monkeypatch) -> list:
    """Make benchmark()'s models record the dtype of their classifier's output at every forward."""
    seen = []

    def create(spec, **overrides):
        model = create_model(spec, **overrides)
        model.head.register_forward_hook(lambda mod, inputs, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(B, "create_model", create)
    return seen


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_bench_autocasts_on_the_cpu(monkeypatch, amp, dtype):
    seen = _record_output_dtypes(monkeypatch)
    df = benchmark([TINY_EVIT], batch_size=2, warmup=1, rounds=2, amp=amp, log=lambda m: None)
    assert seen == [dtype] * 3 and df["dtype"].iloc[0] == amp and df["device_type"].iloc[0] == "cpu"


@pytest.mark.slow
def test_bench_compiles_on_the_cpu(tmp_path):
    """`evit bench --compile --amp bf16` on the CPU: inductor builds C++ kernels with the system compiler (a fresh
    cache, so it really compiles), and EViT's reorganization (topk, gather) compiles as one graph, once.

    In a child process: compiling starts autograd's threads, after which the fork-based DDP tests cannot fork."""
    code = f"""
import json
from torch._dynamo.utils import counters
from evit.benchmark import benchmark
df = benchmark([{TINY_EVIT!r}], batch_size=2, warmup=1, rounds=2, amp="bf16", compile=True, log=lambda m: None)
print(json.dumps(dict(compiled=bool(df["compile"].iloc[0]), img_s=float(df["img_s"].iloc[0]),
                      graphs=counters["stats"]["unique_graphs"], breaks=len(counters["graph_break"]),
                      misses=counters["inductor"]["fxgraph_cache_miss"])))
"""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["compiled"] and res["img_s"] > 0
    assert res["graphs"] == 1 and res["breaks"] == 0           # 3 calls, no recompile
    assert res["misses"] == 1                                  # inductor generated the kernels ...
    assert any((tmp_path / "inductor").rglob("*.so"))          # ... and gcc built them


def test_bench_rejects_bad_options():
    with pytest.raises(ValueError, match="amp must be one of"):
        benchmark(["deit_tiny_patch16_224"], amp="fp8")
    with pytest.raises(ValueError, match="2 labels for 1 models"):
        benchmark(["deit_tiny_patch16_224"], labels=["a", "b"])


def test_cli_macs_prints_and_writes_table(tmp_path, capsys):
    out = tmp_path / "macs.csv"
    assert main(["macs", "evit_deit_small_patch16_224:keep_rate=0.7,fuse_token=true", "--out", str(out)]) == 0
    assert "3.030" in capsys.readouterr().out
    assert out.read_text().splitlines()[0].startswith("model,img_size,gmacs")


def test_cli_names_a_bad_spec_or_option_without_a_traceback(capsys):
    assert main(["bench", "deit_tiny_patch16_224", "--labels", "a", "b"]) == 2
    assert capsys.readouterr().err.strip() == "evit bench: error: got 2 labels for 1 models"
    assert main(["macs", "evit_nope:keep_rate=0.7"]) == 2
    assert "unknown timm model 'evit_nope'" in capsys.readouterr().err


def test_the_bench_job_measures_each_precision_and_records_whether_it_ran_alone(tmp_path):
    from evit.config.schema import resolve_config

    section = resolve_config({"model": {"arch": "deit_tiny_patch16_224", "img_size": 28, "patch_size": 4,
                                        "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
                              "data": {"dataset": "fashion_mnist"}})["model"]
    config = {"models": [{"label": "a", "model": section}, {"label": "b", "model": section}], "amp": ["fp32", "bf16"],
              "batch_size": 2, "warmup": 0, "rounds": 1, "launcher": {"backend": "local"}, "after_runs": True}
    B.bench_from_config(config, tmp_path)
    df = pd.read_csv(tmp_path / "throughput.csv")
    assert list(zip(df["label"], df["dtype"])) == [("a", "fp32"), ("b", "fp32"), ("a", "bf16"), ("b", "bf16")]
    assert set(df["isolation"]) == {"after the runs"}
    with pytest.raises(ValueError, match="bench config amp: expected a precision or a list of distinct ones"):
        B.bench_from_config({**config, "amp": ["bf16", "bf16"]}, tmp_path)


def test_the_bench_job_builds_a_comparison_backbone_by_timm_name_at_its_own_input_size(tmp_path):
    config = {"models": [{"label": "effnet", "timm": "efficientnet_b1"}], "batch_size": 1, "warmup": 0, "rounds": 1,
              "launcher": {"backend": "local"}}
    B.bench_from_config(config, tmp_path)
    row = pd.read_csv(tmp_path / "throughput.csv").iloc[0]
    assert (row["label"], row["spec"], row["img_size"]) == ("effnet", "efficientnet_b1", 240)  # timm's pretrained cfg
    assert 0.65 < row["gmacs"] < 0.75  # timm's card: 0.71 GMACs, counted by FlopCounterMode (not a ViT)
    bad = {**config, "models": [*config["models"], {"label": "x", "timm": "swin_nope_patch4"}]}
    with pytest.raises(ConfigError, match="timm has no model 'swin_nope_patch4'"):
        B.bench_from_config(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # named before anything was built or written
