# One run directory per experiment: its resolved config, then training through the launcher.
from evit.reruns import move_aside


# `--config rerun=[name]`: a changed experiment's finished run moves aside before any job starts (evit/reruns.py).
onstart:
    for name in WF.reruns:
        print(f"rerun {name}: its run moved to {move_aside(Path(WF.runs) / name)}")


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
        check=ancient(WF.check_stamp),  # the local check job (check.smk) passed
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
        "{params.evit} launch --command train --config {input.config} --run-dir {params.run_dir} --log {log}"
