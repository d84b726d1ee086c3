# The paper's motivation (Figure 1, Table 1): the baseline's weights on the val set with a share of each image's
# patches masked three ways (background, object, random); the table comes with the others from `evit report`.


rule masking_config:
    output:
        RESULTS + "/masking/config.yaml",
    params:
        cfg=lambda w: masking_config(),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule masking:
    input:
        config=RESULTS + "/masking/config.yaml",
        result=lambda w: result_file(MASKING["experiment"]),
    output:
        RESULTS + "/masking/masking.json",
        report_figure(MASKING_FIGURE),
        f"{RESULTS}/figures/{MASKING_FIGURE}.pdf",
    log:
        RESULTS + "/masking/launch.log",
    params:
        weights=lambda w: weights(MASKING["experiment"]),
    threads: lambda w: bench_launcher()["cpus_per_task"]
    shell:
        "{EVIT} launch --command mask --config {input.config} --checkpoint {params.weights} "
        "--run-dir {RESULTS}/masking > {log} 2>&1"
