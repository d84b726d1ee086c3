# One run directory per experiment: its resolved config, then training through the launcher.


rule run_config:
    output:
        RUNS + "/{exp}/config.yaml",
    params:
        cfg=lambda w: run_config(w.exp),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule train:
    input:
        config=RUNS + "/{exp}/config.yaml",
        upstream=lambda w: upstream_results(w.exp),
    output:
        RUNS + "/{exp}/metrics.json",
    log:
        RUNS + "/{exp}/train.log",
    threads: run_cpus
    shell:
        "{EVIT} launch --command train --config {input.config} --run-dir {RUNS}/{wildcards.exp} > {log} 2>&1"
