# Throughput of every experiment's model and of the `comparison:` backbones (by timm name), all in ONE job,
# interleaved (weights do not matter); each experiment's model is built from its run config's model section by the
# same factory as training and evaluation. The job runs alone:
# on SLURM on a node of its own (the bench launcher's `exclusive`), otherwise after every run, which would share
# its machine (`after_runs`, recorded in the tables' note).


rule bench_config:
    output:
        RESULTS + "/bench/config.yaml",
    params:
        cfg=lambda w: {
            **config["bench"],
            "models": [{"label": name, "model": RESOLVED[name]["model"]} for name in EXPERIMENTS]
            + [{"label": name, "timm": name} for name in BACKBONES],
            "launcher": bench_launcher(),
            "after_runs": config["backend"] != "slurm",
        },
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule benchmark:
    input:
        config=RESULTS + "/bench/config.yaml",
        # without SLURM every run shares the bench's machine: the bench comes after them all (ancient: a run
        # redone later does not redo the bench; a deleted one does)
        runs=[] if config["backend"] == "slurm" else [ancient(result_file(name)) for name in EXPERIMENTS],
    output:
        RESULTS + "/bench/throughput.csv",
    log:
        RESULTS + "/bench/launch.log",
    threads: lambda w: workflow.cores  # a function: `snakemake --report` runs without --cores
    shell:
        "{EVIT} launch --command bench --config {input.config} --run-dir {RESULTS}/bench > {log} 2>&1"
