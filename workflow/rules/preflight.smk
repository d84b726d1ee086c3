# The node check (`evit preflight`), before any training job (each waits for its result): versions, NCCL, DALI's
# decode against PIL, the loop against the step for the measured runs, and the grid's cost. config: preflight.


rule preflight_config:
    output:
        f"{WF.results}/preflight/config.yaml",
    params:
        cfg=lambda w: WF.preflight_config(),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule preflight:
    input:
        config=f"{WF.results}/preflight/config.yaml",
    output:
        WF.preflight_files,
    log:
        f"{WF.results}/preflight/launch.log",
    params:
        evit=EVIT,
        run_dir=job_dir,
    threads: lambda w: WF.preflight_config()["launcher"]["cpus_per_task"]
    shell:
        "{params.evit} launch --command preflight --config {input.config} --run-dir {params.run_dir} > {log} 2>&1"
