# The comparison with other backbones (the paper's Figure 4): each backbone's published timm weights, evaluated off
# the shelf with its own timm data config (`evit launch --command eval-backbone`); their throughput comes from the
# one bench job, and the table and figure from `evit report`.


rule backbone_config:
    output:
        f"{WF.results}/comparison/{{backbone}}/config.yaml",
    params:
        cfg=lambda w: WF.backbone_config(w.backbone),
    localrule: True
    run:
        write_yaml(output[0], params.cfg)


rule evaluate_backbone:
    input:
        check=ancient(WF.check_stamp),  # the local check job (check.smk) passed
        config=f"{WF.results}/comparison/{{backbone}}/config.yaml",
        weights=lambda w: WF.download_file(w.backbone),
    output:
        f"{WF.results}/comparison/{{backbone}}/eval.json",
    log:
        f"{WF.results}/comparison/{{backbone}}/eval.log",
    params:
        evit=EVIT,
        run_dir=job_dir,
    threads: one_process_cpus
    shell:
        "{params.evit} launch --command eval-backbone --config {input.config} --checkpoint {input.weights} "
        "--run-dir {params.run_dir} --log {log}"
