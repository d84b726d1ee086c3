# Experiments that are evaluated, not trained: `recipe: none`, or mapped to an existing checkpoint.


rule evaluate:
    input:
        check=ancient(WF.check_stamp),  # the local check job (check.smk) passed
        config=f"{WF.runs}/{{exp}}/config.yaml",
        upstream=lambda w: WF.upstream_results(w.exp),
    output:
        f"{WF.runs}/{{exp}}/eval.json",
    log:
        f"{WF.runs}/{{exp}}/eval.log",
    params:
        evit=EVIT,
        checkpoint=lambda w: WF.weights(w.exp),
        run_dir=job_dir,
    threads: run_cpus
    shell:
        "{params.evit} launch --command eval --config {input.config} --checkpoint {params.checkpoint} "
        "--run-dir {params.run_dir} --log {log}"
