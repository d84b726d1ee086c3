# Throughput of every experiment's model and of the `comparison:` backbones (by timm name), all in ONE job,
# interleaved (weights do not matter); each experiment's model is built from its run config's model section by the
# same factory as training and evaluation. The job runs alone:
# on SLURM on a node of its own (the bench launcher's `exclusive`), otherwise after every run, which would share
# its machine (`after_runs`, recorded in the tables' note).


rule bench_config:
    output:
        f"{WF.results}/bench/config.yaml",
    params:
        cfg=lambda w: WF.bench_config(),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule benchmark:
    input:
        check=ancient(WF.check_stamp),  # the local check job (check.smk) passed
        config=f"{WF.results}/bench/config.yaml",
        # without SLURM every run shares the bench's machine: the bench comes after them all (ancient: a run
        # redone later does not redo the bench; a deleted one does)
        runs=[] if config["backend"] == "slurm" else [ancient(WF.result_file(name)) for name in WF.experiments],
    output:
        f"{WF.results}/bench/throughput.csv",
    log:
        f"{WF.results}/bench/launch.log",
    params:
        evit=EVIT,
        run_dir=job_dir,
    threads: lambda w: workflow.cores  # a function: `snakemake --report` runs without --cores
    shell:
        "{params.evit} launch --command bench --config {input.config} --run-dir {params.run_dir} --log {log}"
