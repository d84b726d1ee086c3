# The comparison with other backbones (the paper's Figure 4): each backbone's published timm weights, evaluated off
# the shelf with its own timm data config (`evit launch --command eval-backbone`); their throughput comes from the
# one bench job, and the table and figure from `evit report`.


def backbone_config(name):
    """A backbone's eval config: the runs' data and device, timm's model `name`, the torch loader with the backbone's
    own transform (so not the demo's canvas), in one process on a node it may share."""
    return deep_merge(config["run_defaults"], {
        "model": {"arch": name},
        "data": {"loader": "torch", "canvas": None},
        "launcher": shared_one_process_launcher(),
        "meta": {"backbone": name, "family": BACKBONES[name]},
    })


rule backbone_config:
    output:
        RESULTS + "/comparison/{backbone}/config.yaml",
    params:
        cfg=lambda w: backbone_config(w.backbone),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule evaluate_backbone:
    input:
        config=RESULTS + "/comparison/{backbone}/config.yaml",
        weights=lambda w: download_file(w.backbone),
    output:
        RESULTS + "/comparison/{backbone}/eval.json",
    log:
        RESULTS + "/comparison/{backbone}/eval.log",
    threads: lambda w: bench_launcher()["cpus_per_task"]
    shell:
        "{EVIT} launch --command eval-backbone --config {input.config} --checkpoint {input.weights} "
        "--run-dir {RESULTS}/comparison/{wildcards.backbone} > {log} 2>&1"


def _check_backbone_configs():
    """Each backbone's eval config, resolved now: a bad key or value fails the dry run, naming the backbone."""
    for name in BACKBONES:
        try:
            resolve_config(backbone_config(name))
        except ConfigError as e:
            raise ValueError(f"config: comparison.backbones: {name!r}: {e}") from None


_check_backbone_configs()
