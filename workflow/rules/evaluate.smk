# Experiments that are evaluated, not trained: `recipe: none`, or mapped to an existing checkpoint.


rule evaluate:
    input:
        config=RUNS + "/{exp}/config.yaml",
        upstream=lambda w: upstream_results(w.exp),
    output:
        RUNS + "/{exp}/eval.json",
    log:
        RUNS + "/{exp}/eval.log",
    params:
        checkpoint=lambda w: weights(w.exp),
    threads: run_cpus
    shell:
        "{EVIT} launch --command eval --config {input.config} --checkpoint {params.checkpoint} "
        "--run-dir {RUNS}/{wildcards.exp} > {log} 2>&1"
