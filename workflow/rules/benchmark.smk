# Throughput of every experiment's architecture, all in ONE job, interleaved (weights do not matter).


rule bench_config:
    output:
        RESULTS + "/bench/config.yaml",
    params:
        cfg=lambda w: {
            **{k: v for k, v in config["bench"].items() if k != "num_classes"},
            "labels": list(EXPERIMENTS),
            "specs": [model_spec(name) for name in EXPERIMENTS],
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
    threads: workflow.cores
    shell:
        "{EVIT} launch --command bench --config {input} --run-dir {RESULTS}/bench > {log} 2>&1"
