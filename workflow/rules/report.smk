# The paper's tables and figures, from the runs' results and the benchmark. `snakemake --report` shows every
# table (its html page and its csv) and every figure's png, each with its caption from workflow/report/. Tables
# come from config["tables"], figures from evit.layout.FIGURES: a new one is in the report without a rule change
# (a figure needs its caption file).


rule experiments_file:
    output:
        f"{WF.results}/tables/experiments.yaml",
    params:
        table=lambda w: WF.experiments_file(),
    localrule: True
    run:
        write_yaml(output[0], params.table)


rule report:
    input:
        experiments=f"{WF.results}/tables/experiments.yaml",
        bench=f"{WF.results}/bench/throughput.csv",
        results=[WF.result_file(name) for name in WF.experiments],
        masking=[f"{WF.results}/masking/masking.json"] if WF.masking else [],
        backbones=expand(f"{WF.results}/comparison/{{backbone}}/eval.json", backbone=WF.backbones),
        preflight=WF.preflight_files,
        reference=f"{workflow.basedir}/results/reference/paper.csv",  # the checkout's, in any working directory
    output:
        expand(f"{WF.results}/tables/{{table}}.{{ext}}", table=WF.tables, ext=("md", "tex")),
        [report_table(table, ext) for table in WF.tables for ext in ("html", "csv")],
        [report_figure(fig) for fig in WF.drawn_figures],
        expand(f"{WF.results}/figures/{{fig}}.pdf", fig=WF.drawn_figures),
    params:
        evit=EVIT,
        out_dir=lambda w, output: Path(output[0]).parents[1],  # <results>/tables/<table>.md -> <results>
    localrule: True
    shell:
        "{params.evit} report --experiments {input.experiments} --bench {input.bench} "
        "--reference {input.reference} --out-dir {params.out_dir}"
