# One run directory per experiment: its resolved config, then training through the launcher.


rule run_config:
    output:
        f"{WF.runs}/{{exp}}/config.yaml",
    params:
        cfg=lambda w: WF.run_config(w.exp),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule train:
    input:
        config=f"{WF.runs}/{{exp}}/config.yaml",
        upstream=lambda w: WF.upstream_results(w.exp),
        preflight=WF.preflight_files,  # the node check comes first (config: preflight)
    output:
        f"{WF.runs}/{{exp}}/metrics.json",
    log:
        f"{WF.runs}/{{exp}}/train.log",
    params:
        evit=EVIT,
        run_dir=job_dir,
    threads: run_cpus
    shell:
        "{params.evit} launch --command train --config {input.config} --run-dir {params.run_dir} > {log} 2>&1"
