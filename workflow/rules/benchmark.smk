# Throughput of every experiment's model, all in ONE job, interleaved (weights do not matter); each model is
# built from its run config's model section by the same factory as training and evaluation.


rule bench_config:
    output:
        RESULTS + "/bench/config.yaml",
    params:
        cfg=lambda w: {
            **config["bench"],
            "models": [{"label": name, "model": RESOLVED[name]["model"]} for name in EXPERIMENTS],
            "launcher": bench_launcher(),
        },
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule benchmark:
    input:
        RESULTS + "/bench/config.yaml",
    output:
        RESULTS + "/bench/throughput.csv",
    log:
        RESULTS + "/bench/launch.log",
    threads: lambda w: workflow.cores  # a function: `snakemake --report` runs without --cores
    shell:
        "{EVIT} launch --command bench --config {input} --run-dir {RESULTS}/bench > {log} 2>&1"
