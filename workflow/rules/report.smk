# The paper's tables and figures, from the runs' results and the benchmark.


rule experiments_file:
    output:
        RESULTS + "/tables/experiments.yaml",
    params:
        table=lambda w: {
            "dataset": config["dataset"],
            "tables": config["tables"],
            "experiments": [
                {"name": name, "arch": e["arch"], "img_size": e["img_size"], "method": e["method"],
                 "params": method_params(resolve_config(run_config(name))["model"]), "recipe": e["recipe"],
                 "tables": e["tables"], "paper": e.get("paper"), "result": result_file(name)}
                for name, e in EXPERIMENTS.items()
            ],
        },
    localrule: True
    run:
        write_yaml(output[0], params.table)


rule report:
    input:
        experiments=RESULTS + "/tables/experiments.yaml",
        bench=RESULTS + "/bench/throughput.csv",
        results=[result_file(name) for name in EXPERIMENTS],
        reference="results/reference/paper.csv",
    output:
        expand(RESULTS + "/tables/{table}.{ext}", table=TABLES, ext=("md", "csv", "tex")),
        [report_figure(fig) for fig in REPORT_FIGURES],
        expand(RESULTS + "/figures/{fig}.pdf", fig=REPORT_FIGURES),
    localrule: True
    shell:
        "{EVIT} report --experiments {input.experiments} --bench {input.bench} "
        "--reference {input.reference} --out-dir {RESULTS}"
