# The paper's motivation (Figure 1, Table 1): the baseline's weights on the val set with a share of each image's
# patches masked three ways (background, object, random); the table comes with the others from `evit report`.


rule masking_config:
    output:
        f"{WF.results}/masking/config.yaml",
    params:
        cfg=lambda w: WF.masking_config(),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule masking:
    input:
        check=ancient(WF.check_stamp),  # the local check job (check.smk) passed
        config=f"{WF.results}/masking/config.yaml",
        result=WF.result_file(WF.masking["experiment"]),
    output:
        f"{WF.results}/masking/masking.json",
        report_figure(MASKING_FIGURE),
        f"{WF.results}/figures/{MASKING_FIGURE}.pdf",
    log:
        f"{WF.results}/masking/launch.log",
    params:
        evit=EVIT,
        weights=WF.weights(WF.masking["experiment"]),
        run_dir=job_dir,
    threads: one_process_cpus
    shell:
        "{params.evit} launch --command mask --config {input.config} --checkpoint {params.weights} "
        "--run-dir {params.run_dir} --log {log}"
