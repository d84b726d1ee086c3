"""The Snakemake workflow: config validation, the paper grid's dry run, tables from checkpoints, and SLURM."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml

import evit.models  # noqa: F401  (registers the EViT models with timm)
from evit.benchmark import count_macs
from evit.config.schema import resolve_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TINY_MODEL = {"patch_size": 4, "drop_path": 0.0, "kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2}}


def snakemake(*args, cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny_config(results: Path, experiments: list[dict], **extra) -> dict:
    """A small version of the demo config: a 4-block EViT on Fashion-MNIST subsets (the demo's canvas, at 28 px)."""
    cfg = yaml.safe_load((ROOT / "workflow/config/demo.yaml").read_text())
    cfg["results"] = str(results)
    cfg["run_defaults"]["model"] = TINY_MODEL
    cfg["run_defaults"]["data"].update(train_subset=512, val_subset=256)
    cfg["run_defaults"]["train"].update(batch_size=64)
    cfg["experiment_defaults"].update(drop_loc=[1, 2], epochs=1, init=experiments[0]["name"], img_size=28)
    cfg["experiment_defaults"]["run"]["data"]["train_subset"] = 512
    cfg["bench"].update(batch_size=8, warmup=1, rounds=2, iters=1)
    cfg["visualize"] = {"experiment": experiments[-1]["name"], "num_images": 2}
    cfg["masking"].update(experiment=experiments[0]["name"], val_subset=256, figure_images=2)
    cfg["tables"] = {"main": {"title": "tiny", "baseline": experiments[0]["name"]}}
    cfg["experiments"] = experiments
    cfg["preflight"] = {"enabled": False}  # its measured runs are the demo's (tests/test_preflight.py)
    cfg.update(extra)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_counts(dry_run_output: str) -> dict:
    """{rule: count} from the 'Job stats' table of `snakemake -n`."""
    lines = dry_run_output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


# ------------------------------------------------------------------------------------------ config validation


WEIGHTS = "https://huggingface.co/timm/{name}/resolve/main/model.safetensors"


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(epochs_total=3), "epochs_total: unknown key (known: backend, bench, bench_launcher, "),
    (lambda c: c["experiments"][1].update(keep_rate=1.7),
     "config: experiment 'evit_s_0.9': model.keep_rate: expected a value <= 1.0, got 1.7"),
    (lambda c: c["experiments"][1].update(keep_rat=0.7),
     "config: experiment 'evit_s_0.9': keep_rat: unknown experiment field (fields: arch, epochs, img_size, init, "
     "method, name, paper, recipe, run, tables; the methods' parameters: keep_rate, fuse_token, drop_loc, r, "),
    (lambda c: c["experiments"][1].update(tabels=["main"]),
     "config: experiment 'evit_s_0.9': tabels: unknown experiment field (fields: arch, epochs, img_size, init, "),
    (lambda c: c["experiments"][1].update(recipe="distill"),
     "experiment 'evit_s_0.9': recipe: 'distill' is not one of ['scratch', 'finetune', 'demo', 'none']"),
    (lambda c: c["experiments"][1].update(init="deit_x"), "has init 'deit_x', which is neither an experiment"),
    (lambda c: c["tables"]["main"].update(baseline="nope"), "table 'main' has unknown baseline experiment 'nope'"),
    (lambda c: c.update(checkpoints={"ghost": "/x.pth"}), "checkpoints maps unknown experiment 'ghost'"),
    (lambda c: c["experiments"][2].update(tables=["main", "apendix"]), "unknown table(s) ['apendix']"),
    # every run's full config is resolved while the DAG is built: a typo anywhere fails the dry run
    (lambda c: c["run_defaults"]["train"].update(blrr=0.1), "experiment 'deit_s': train.blrr: unknown key"),
    (lambda c: c["launcher"].update(partitoin="gpu"), "experiment 'deit_s': unknown launcher key(s) ['partitoin']"),
    (lambda c: c["experiments"][3].update(run={"data": {"num_workrs": 4}}),
     "experiment 'evit_s_0.7': data.num_workrs: unknown key"),
    (lambda c: c["experiments"][1].update(run={"train": {"amp": "fp8"}}),
     "experiment 'evit_s_0.9': train.amp: expected one of none, bf16, fp16"),
    (lambda c: c["launcher"].update(nodes=2), "launcher nodes=2 needs the slurm backend"),
    (lambda c: c["bench_launcher"].update(tasks_per_node=2), "bench_launcher: the benchmark runs in one process"),
    # an experiment's own values label its table row: its run: section may not train or bench another one
    (lambda c: c["experiments"][3].update(run={"model": {"keep_rate": 0.6}}),
     "experiment 'evit_s_0.7' sets model.keep_rate in its run: section; set `keep_rate:` on the experiment"),
    (lambda c: c["experiments"][3].update(run={"model": {"r": 4}}),
     "experiment 'evit_s_0.7' sets model.r in its run: section; set `r:` on the experiment"),
    # an experiment names its method and sets that method's parameters only
    (lambda c: c["experiments"][1].update(r=4),
     "config: experiment 'evit_s_0.9' (method evit) sets r, a parameter of method tome"),
    (lambda c: c["experiments"][0].update(keep_rate=0.5),
     "config: experiment 'deit_s' (method none) sets keep_rate, a parameter of method evit"),
    (lambda c: c["experiments"][1].update(method="dynamicvt"),
     "config: experiment 'evit_s_0.9': method 'dynamicvt' is not one of ['none', 'evit', 'tome', 'dynamicvit']"),
    # DynamicViT is evaluated only (its own training is not built): an experiment training it is refused
    (lambda c: c["experiments"].append({"name": "dyn", "method": "dynamicvit", "base_rate": 0.7}),
     "config: experiment 'dyn' (recipe finetune): model.method: dynamicvit is evaluated only here"),
    (lambda c: c["experiments"][1].update(method="tome", r=-2),
     "config: experiment 'evit_s_0.9': model.r: expected a value >= 0, got -2"),
    (lambda c: c["experiment_defaults"].update(r=1.5), "config: experiment_defaults: model.r: expected an integer"),
    (lambda c: c["experiments"][3].update(drop_loc=[3, 3, 9]),
     "config: experiment 'evit_s_0.7': model.drop_loc: expected distinct values (each at most once), got [3, 3, 9]"),
    (lambda c: c["run_defaults"]["data"].update(root="/nowhere/fashion"),
     "config: experiment 'deit_s': data.root /nowhere/fashion lacks the Fashion-MNIST file(s) train-images-idx3"),
    (lambda c: c["experiment_defaults"].update(arch="evit_deit_tiny_patch16_224"),
     "experiment 'deit_s': model.arch: 'evit_deit_tiny_patch16_224' includes the method (EViT); write "
     "`arch: deit_tiny_patch16_224` and `method: evit`"),
    (lambda c: c["visualize"].update(experiment="deit_s"), "visualize.experiment 'deit_s': its method does not keep patches"),
    (lambda c: c["masking"].update(experiment="evit_s_0.7"),
     "masking.experiment 'evit_s_0.7' is not a method-none experiment"),
    (lambda c: c["masking"].update(boxes="/nowhere/LOC_val_solution.csv", boxes_format="csv"),
     "config: masking: mask.boxes: /nowhere/LOC_val_solution.csv does not exist"),
    (lambda c: c["masking"].update(share=1.0), "1.0 is greater than or equal to the maximum of 1"),
    (lambda c: c.update(comparison={"weights": WEIGHTS, "backbones": {"deit_s.fb_in1k": "DeiT"}},
                        experiments=[*c["experiments"], {**c["experiments"][0], "name": "deit_s.fb_in1k"}]),
     "config: comparison.backbones: 'deit_s.fb_in1k' is also an experiment's name"),
    (lambda c: c.update(comparison={"weights": WEIGHTS, "backbones": {"nfnet_f0": "NFNet"}}),
     "config: comparison.backbones: 'nfnet_f0' has no pretrained tag"),
    (lambda c: c.update(comparison={"weights": WEIGHTS, "backbones": {"coat_mini.in1k": "CoaT"},
                                    "experiments": ["deit_s", "evit_9"]}),
     "config: comparison.experiments: 'evit_9' is not an experiment"),
])
def test_bad_config_is_named_before_anything_runs(tmp_path, mutate, message):
    cfg = yaml.safe_load((ROOT / "workflow/config/demo.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    mutate(cfg)
    proc = snakemake("-n", "--configfile", str(write_config(tmp_path / "bad.yaml", cfg)), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("site, key, message", [
    ({"experimnts": []}, "experimnts", "unknown key (known: backend, bench, bench_launcher, checkpoints, comparison, "),
    ({"run_defautls": {}}, "run_defautls", "unknown key (known: backend, bench, bench_launcher, checkpoints, "),
    ({"masking": {"share": "half"}}, "masking.share", "'half' is not of type 'number'"),
    ({"tables": {"main": {"title": "x", "baselin": "deit_s"}}}, "tables.main.baselin", "unknown key (known: baseline, "
                                                                                        "title)"),
])
def test_a_schema_violation_is_one_line_naming_the_key_and_the_file_that_sets_it(tmp_path, site, key, message):
    """No schema and config dump: the line names the key, the file that sets it (here the site file given after
    paper.yaml) and what the schema allows."""
    site_file = write_config(tmp_path / "site.yaml", site)
    proc = snakemake("-n", "--configfile", "workflow/config/paper.yaml", str(site_file), check=False)
    assert proc.returncode != 0
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert output[1].startswith(f"config {site_file}: {key}: {message}"), output[:3]
    assert len(output) == 3 and "Failed validating" not in proc.stderr  # Snakemake's header, the line, its frame


def test_a_yaml_syntax_error_in_the_default_config_names_its_file_and_line(tmp_path):
    """Snakemake reads the Snakefile's own config file (the demo) and names neither file nor line; the workflow
    does. (A --configfile is read by Snakemake's command line before the workflow: its one line names no file.)"""
    shutil.copytree(ROOT / "workflow", tmp_path / "workflow")
    shutil.copy(ROOT / "Snakefile", tmp_path / "Snakefile")
    demo = tmp_path / "workflow/config/demo.yaml"
    lines = demo.read_text().splitlines()
    demo.write_text("\n".join([*lines, "results: [oops"]) + "\n")
    proc = subprocess.run([SNAKEMAKE, "--snakefile", str(tmp_path / "Snakefile"), "-n"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert (f"{demo}, line {len(lines) + 2}, column 1: not valid YAML: while parsing a flow sequence; expected ',' "
            "or ']', but got '<stream end>'") in (proc.stdout + proc.stderr).splitlines()


def test_the_installed_slurm_profile_runs_from_another_directory(tmp_path):
    """`evit install-profile` writes the profile's config file and this checkout's Snakefile by absolute path:
    `snakemake --profile slurm all` dry-runs the paper grid in any directory (here with data.root and the boxes on
    the command line, as a site file would set them)."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    evit = str(Path(sys.executable).parent / "evit")
    subprocess.run([evit, "install-profile"], env=env, check=True, capture_output=True, timeout=120)
    installed = yaml.safe_load((tmp_path / "xdg/snakemake/slurm/config.yaml").read_text())
    assert (installed["configfile"], installed["snakefile"]) == (
        str(ROOT / "workflow/config/paper.yaml"), str(ROOT / "Snakefile"))
    site = yaml.safe_load(imagenet_site(tmp_path).read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([SNAKEMAKE, "--profile", "slurm", "-n", "all", "--config", "backend=slurm",
                           f"run_defaults={{data: {{root: {site['run_defaults']['data']['root']}}}}}",
                           f"masking={{boxes: {site['masking']['boxes']}}}"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert job_counts(proc.stdout)["train"] == 20 and "results/runs/deit_s/metrics.json" in proc.stdout
    assert sorted(p.name for p in elsewhere.iterdir()) == [".snakemake"]


def test_paper_dry_run_lists_the_paper_grid_and_the_frontier(tmp_path):
    proc = snakemake("-n", "--configfile", "workflow/config/paper.yaml", str(imagenet_site(tmp_path)),
                     "--config", "backend=slurm")
    assert job_counts(proc.stdout).items() >= {  # the runs, and one bench, tables and figures job each
        "all": 1, "bench_config": 1, "benchmark": 1, "experiments_file": 1, "report": 1, "run_config": 31,
        "train": 20, "evaluate": 11, "visualize": 1, "masking_config": 1, "masking": 1,
        "download": 30, "backbone_config": 29, "evaluate_backbone": 29,  # DynamicViT's and the backbones' weights
    }.items()
    for exp in ("deit_s", "evit_s_0.7", "evit_s_0.5_nofuse", "evit_s_304_0.5", "tome_s_r11", "tome_s_r16",
                "evit_s_0.7_loc258", "evit_s_0.7_loc4710", "evit_s_0.7_scratch", "evit_s_0.7_scratch_nowarmup"):
        assert f"{tmp_path}/results/runs/{exp}/metrics.json" in proc.stdout
    for exp in ("evit_s_0.9_offshelf", "evit_s_0.5_offshelf", "tome_s_r4_offshelf", "tome_s_r16_offshelf",
                "dynamicvit_s_0.7"):
        assert f"{tmp_path}/results/runs/{exp}/eval.json" in proc.stdout  # evaluated, not trained
    for out in ("tables/frontier.md", "figures/frontier.png", "tables/ablation.md", "masking/masking.json",
                "tables/masking.md", "figures/masking.png", "tables/comparison.md", "figures/comparison.png",
                "comparison/dm_nfnet_f0.dm_in1k/eval.json", "weights/swin_small_patch4_window7_224.ms_in1k.safetensors"):
        assert f"{tmp_path}/results/{out}" in proc.stdout
    masking_file = tmp_path / "results/masking/config.yaml"  # the masking job's config, by a local rule
    experiments_file = tmp_path / "results/tables/experiments.yaml"
    bench_file = tmp_path / "results/bench/config.yaml"
    nfnet_file = tmp_path / "results/comparison/dm_nfnet_f0.dm_in1k/config.yaml"
    snakemake(str(masking_file), str(experiments_file), f"{tmp_path}/results/runs/dynamicvit_s_0.7/config.yaml",
              str(bench_file), str(nfnet_file), "--cores", "1", "--configfile", "workflow/config/paper.yaml",
              str(imagenet_site(tmp_path)))
    ablation = {e["name"]: e for e in yaml.safe_load(experiments_file.read_text())["experiments"]
                if "ablation" in e["tables"]}
    assert [ablation[n]["params"]["drop_loc"] for n in ("evit_s_0.7", "evit_s_0.7_loc258", "evit_s_0.7_loc4710")] == [
        [3, 6, 9], [2, 5, 8], [4, 7, 10]]
    assert "schedule" not in ablation["evit_s_0.7_scratch"] and ablation["evit_s_0.7_scratch"]["recipe"] == "scratch"
    assert ablation["evit_s_0.7_scratch_nowarmup"]["schedule"] == {"shrink_start": 0, "shrink_epochs": 0}
    dynamicvit = yaml.safe_load((tmp_path / "results/runs/dynamicvit_s_0.7/config.yaml").read_text())
    assert (dynamicvit["model"]["method"], dynamicvit["model"]["base_rate"], dynamicvit["train"]["recipe"]) == (
        "dynamicvit", 0.7, "none")
    assert f"output: {tmp_path}/results/weights/dynamicvit_deit_s_0.7.pth" in proc.stdout  # fetched by a local rule
    masking = yaml.safe_load(masking_file.read_text())
    assert masking["mask"] == {"share": 0.5, "boxes": str(tmp_path / "imagenet/LOC_val_solution.csv"),
                               "boxes_format": "csv", "seed": 0, "figure_images": 6,
                               "figure": f"{tmp_path}/results/figures/masking"}
    assert (masking["model"]["arch"], masking["model"]["method"]) == ("deit_small_patch16_224", "none")
    assert (masking["launcher"]["tasks_per_node"], masking["launcher"]["gpus_per_node"]) == (1, 1)  # one GPU
    backbones = [m["timm"] for m in yaml.safe_load(bench_file.read_text())["models"] if "timm" in m]
    assert len(backbones) == 29 and {"swin_small_patch4_window7_224.ms_in1k", "dm_nfnet_f0.dm_in1k",
                                     "efficientnet_b1.ft_in1k"} <= set(backbones)  # the original releases' tags
    nfnet = yaml.safe_load(nfnet_file.read_text())  # its eval job's config: the runs' data, timm's model
    assert (nfnet["model"], nfnet["data"]["loader"], nfnet["data"]["root"]) == (
        {"arch": "dm_nfnet_f0.dm_in1k"}, "torch", str(tmp_path / "imagenet"))
    assert (nfnet["launcher"]["gpus_per_node"], nfnet["launcher"]["exclusive"]) == (1, False)
    comparison = yaml.safe_load(experiments_file.read_text())["comparison"]
    assert comparison["experiments"][-1] == "dynamicvit_s_0.7" and len(comparison["backbones"]) == 29
    assert comparison["backbones"][-4] == {"name": "dm_nfnet_f0.dm_in1k", "family": "NFNet",
                                           "result": f"{tmp_path}/results/comparison/dm_nfnet_f0.dm_in1k/eval.json"}


def imagenet_site(tmp_path: Path) -> Path:
    """A site file pointing paper.yaml at an (empty) ImageNet layout, its val boxes and tmp_path/results."""
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "n01440764").mkdir(parents=True, exist_ok=True)
    boxes = imagenet / "LOC_val_solution.csv"
    boxes.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 111 108 441 325 \n")
    return write_config(tmp_path / "site.yaml", {"results": str(tmp_path / "results"),
                                                 "run_defaults": {"data": {"root": str(imagenet)}},
                                                 "masking": {"boxes": str(boxes)}})


def nearest_r(tome_model: dict, gmacs: float) -> int:
    """The r whose analytic GMACs (the model built from `tome_model` with that r) are nearest `gmacs`."""
    from evit.models.factory import build_model

    def tome_gmacs(r):
        with torch.device("meta"):
            return count_macs(build_model({**tome_model, "r": r}, 10)) / 1e9
    return min(range(0, 64), key=lambda r: (abs(tome_gmacs(r) - gmacs), r))


@pytest.mark.parametrize("config", ["paper", "demo"])
def test_fine_tuned_tome_runs_match_the_gmacs_of_the_fine_tuned_evit_runs_of_the_frontier(tmp_path, config):
    """The frontier's fine-tuned ToMe runs have the r whose GMACs are nearest those of its fine-tuned EViT runs
    (each ToMe run one EViT run's nearest r, each EViT run's nearest r a ToMe run), with the same recipe."""
    from evit.models.factory import build_model

    files = ["workflow/config/paper.yaml", str(imagenet_site(tmp_path))] if config == "paper" else [
        "workflow/config/demo.yaml", str(write_config(tmp_path / "site.yaml", {"results": str(tmp_path / "results")}))]
    targets = [str(tmp_path / "results/tables/experiments.yaml"), str(tmp_path / "results/bench/config.yaml")]
    snakemake(*targets, "--cores", "1", "--configfile", *files)  # two local rules that write YAML, nothing more
    experiments = yaml.safe_load(Path(targets[0]).read_text())["experiments"]
    models = {m["label"]: m["model"] for m in yaml.safe_load(Path(targets[1]).read_text())["models"]
              if "model" in m}  # not the comparison backbones, which the bench builds by timm name
    fine_tuned = [e for e in experiments if "frontier" in e["tables"] and e["recipe"] != "none"]
    evit = [e for e in fine_tuned if e["method"] == "evit"]
    tome = [e for e in fine_tuned if e["method"] == "tome"]
    assert evit and tome and {e["recipe"] for e in evit + tome} == {"finetune"}
    with torch.device("meta"):
        evit_gmacs = {e["name"]: count_macs(build_model(models[e["name"]], 10)) / 1e9 for e in evit}
    wanted = {nearest_r(models[tome[0]["name"]], g) for g in evit_gmacs.values()}
    assert sorted(e["params"]["r"] for e in tome) == sorted(wanted), (evit_gmacs, wanted)


def test_the_slurm_profile_runs_the_paper_grid_and_asks_for_the_imagenet_root(tmp_path):
    """`snakemake --profile slurm all` on an unedited checkout: paper.yaml, which needs data.root set."""
    proc = snakemake("-n", "--profile", str(ROOT / "workflow/profiles/slurm"), "all", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "data.root /datasets/imagenet is not a imagenet directory" in output
    assert "set run_defaults.data.root to your ImageNet in workflow/config/paper.yaml" in output


def test_paper_config_requires_the_imagenet_root(tmp_path):
    proc = snakemake("-n", "--configfile", "workflow/config/paper.yaml",
                     "--config", f"results={tmp_path}/results", check=False)
    assert proc.returncode != 0
    assert "data.root /datasets/imagenet" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ runs end to end


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A DeiT checkpoint of the tiny architecture, as an official release would be: a raw {"model": state_dict}."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=28, num_classes=10,
                              **{"patch_size": 4, **TINY_MODEL["kwargs"]})
    path = tmp_path_factory.mktemp("ckpt") / "released.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_tables_from_existing_checkpoints_and_adding_an_entry_adds_its_row(tmp_path, tiny_checkpoint):
    results = tmp_path / "results"
    experiments = [
        {"name": "base", "method": "none", "tables": ["main"], "paper": "deit_small"},
        {"name": "evit_0.5", "keep_rate": 0.5, "tables": ["main"], "paper": "evit_deit_small_0.5_fused"},
    ]
    mapped = {"base": str(tiny_checkpoint), "evit_0.5": str(tiny_checkpoint)}  # DeiT weights, evaluated as EViT
    cfg = tiny_config(results, experiments, checkpoints=mapped, backend="inline")
    config_file = write_config(tmp_path / "c.yaml", cfg)
    snakemake("all", "--cores", "2", "--configfile", str(config_file))
    table = pd.read_csv(results / "tables/main.csv")
    assert len(table) == 2
    assert not list((results / "runs").glob("*/checkpoint.pth"))  # nothing was trained
    evaluated = timm.create_model("evit_deit_tiny_patch16_224", img_size=28, num_classes=10, drop_loc=(1, 2),
                                  keep_rate=0.5, fuse_token=True, **{"patch_size": 4, **TINY_MODEL["kwargs"]})
    bench = pd.read_csv(results / "bench/throughput.csv").set_index("label")
    assert bench.loc["evit_0.5", "gmacs"] == pytest.approx(count_macs(evaluated) / 1e9)  # the benched = the evaluated
    benched = {m["label"]: m["model"] for m in yaml.safe_load((results / "bench/config.yaml").read_text())["models"]}
    for name in ("base", "evit_0.5"):  # one model factory: the bench builds the run config's model section
        run_cfg = resolve_config(yaml.safe_load((results / "runs" / name / "config.yaml").read_text()))
        assert benched[name] == run_cfg["model"]
    assert "Nothing to be done" in snakemake("all", "-n", "--configfile", str(config_file)).stdout
    (results / "runs/evit_0.5/eval.json").unlink()  # one run's output gone: only it and what uses it rerun
    assert job_counts(snakemake("all", "-n", "--configfile", str(config_file)).stdout) == {  # the bench comes
        "evaluate": 1, "benchmark": 1, "report": 1, "visualize": 1, "all": 1}  # after the runs it would share a
    # machine with (not on SLURM); visualize shows evit_0.5's kept tokens
    snakemake("all", "--cores", "2", "--configfile", str(config_file))

    cfg["experiments"].append({"name": "evit_0.7", "keep_rate": 0.7, "recipe": "none", "tables": ["main"]})
    write_config(config_file, cfg)
    proc = snakemake("all", "-n", "--configfile", str(config_file))
    assert "evaluate" in job_counts(proc.stdout) and job_counts(proc.stdout)["evaluate"] == 1
    snakemake("all", "--cores", "2", "--configfile", str(config_file))
    table = pd.read_csv(results / "tables/main.csv")
    assert len(table) == 3
    assert table.iloc[:, 0].astype(str).str.contains("evit_0.7").any()


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_workflow_with_the_slurm_profile_trains_through_sbatch(tmp_path):
    results = tmp_path / "results"
    experiments = [
        {"name": "base", "method": "none", "recipe": "demo", "init": None, "tables": ["main"], "paper": "deit_small"},
        {"name": "evit_0.5", "keep_rate": 0.5, "tables": ["main"]},
    ]
    cfg = tiny_config(results, experiments)
    cfg["launcher"].update(cpus_per_task=1, timeout_min=10, tasks_per_node=2)  # DDP: two processes per run
    config_file = write_config(tmp_path / "c.yaml", cfg)
    snakemake("all", "--profile", str(ROOT / "workflow/profiles/slurm"), "--configfile", str(config_file))
    assert len(pd.read_csv(results / "tables/main.csv")) == 2
    for exp in experiments:
        metrics = yaml.safe_load((results / "runs" / exp["name"] / "metrics.json").read_text())
        assert metrics["provenance"]["world_size"] == 2, exp
    job_ids = {exp["name"]: yaml.safe_load((results / "runs" / exp["name"] / "job.json").read_text())["job_id"]
               for exp in experiments}
    for name, jid in job_ids.items():
        state = subprocess.run(["sacct", "-j", jid, "-n", "-X", "-o", "State"], capture_output=True, text=True)
        assert state.stdout.split() == ["COMPLETED"], (name, state.stdout)


def test_published_weights_are_fetched_once_by_a_local_rule_and_named_when_they_cannot_be(tmp_path):
    released = tmp_path / "released.pth"
    released.write_bytes(b"the published weights")
    cfg = tiny_config(tmp_path / "results", [
        {"name": "base", "method": "none", "recipe": "none", "init": "released", "tables": ["main"]},
        {"name": "evit_released", "keep_rate": 0.7, "recipe": "none", "init": "released", "tables": ["main"]}])
    cfg["downloads"] = {"released": released.as_uri(), "gone": (tmp_path / "gone.pth").as_uri()}
    config_file = write_config(tmp_path / "c.yaml", cfg)  # (the paper dry run lists its download before its eval)
    snakemake(f"{tmp_path}/results/weights/released.pth", "--cores", "1", "--configfile", str(config_file))
    assert (tmp_path / "results/weights/released.pth").read_bytes() == b"the published weights"
    proc = snakemake(f"{tmp_path}/results/weights/gone.pth", "--cores", "1", "--configfile", str(config_file),
                     check=False)
    assert proc.returncode != 0 and f"download gone: cannot fetch {(tmp_path / 'gone.pth').as_uri()}" in proc.stderr
    assert not (tmp_path / "results/weights/gone.pth").exists()


def test_the_bench_runs_alone(tmp_path):
    """On SLURM the bench job asks for a node of its own; otherwise every run would share its machine, so it comes
    after them all. Its config says which (the tables' note records it)."""
    demo = yaml.safe_load((ROOT / "workflow/config/demo.yaml").read_text())
    results = [f"{tmp_path}/results/runs/{e['name']}/{'eval' if e.get('recipe') == 'none' else 'metrics'}.json"
               for e in demo["experiments"]]
    for backend, after in (("local", sorted(results)), ("slurm", [])):
        site = write_config(tmp_path / "site.yaml", {"results": str(tmp_path / "results"), "backend": backend})
        files = ("--configfile", "workflow/config/demo.yaml", str(site))
        dry_run = snakemake("-n", "all", *files).stdout.split("rule benchmark:")[1]
        bench_input = next(line for line in dry_run.splitlines() if line.strip().startswith("input:"))
        inputs = bench_input.split(":", 1)[1].replace(",", " ").split()
        assert sorted(f for f in inputs if "/runs/" in f) == after, backend
    snakemake(str(tmp_path / "results/bench/config.yaml"), "--cores", "1", *files)  # a local rule writing YAML
    bench = yaml.safe_load((tmp_path / "results/bench/config.yaml").read_text())
    assert bench["after_runs"] is False and bench["launcher"]["exclusive"] is True  # SLURM: a node of its own
