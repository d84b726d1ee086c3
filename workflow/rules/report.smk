# The paper's tables and figures, from the runs' results and the benchmark. `snakemake --report` shows every
# table (its html page and its csv) and every figure's png, each with its caption from workflow/report/. Tables
# come from config["tables"], figures from evit.layout.FIGURES: a new one is in the report without a rule change
# (a figure needs its caption file).


def report_table(table, ext):
    """A table's .html or .csv, flagged for the report with its caption: workflow/report/table.rst (the masking and
    comparison tables': masking.rst, comparison.rst)."""
    view = {"html": "table", "csv": "csv (every column)"}[ext]
    caption = {MASKING_TABLE: "../report/masking.rst", COMPARISON_TABLE: "../report/comparison.rst"}.get(
        table, "../report/table.rst")
    return report(f"{RESULTS}/tables/{table}.{ext}", caption=caption, category="Tables",
                  labels={"table": table, "view": view})


def report_figure(fig):
    """A figure's png, flagged for the report with its caption workflow/report/figures/<fig>.rst."""
    return report(f"{RESULTS}/figures/{fig}.png", caption=f"../report/figures/{fig}.rst", category="Figures",
                  labels={"figure": fig})


def schedule_of(name):
    """{"schedule": the training keys of the run's method} when they are not its recipe's (an ablation's row says
    so), else {}."""
    resolved = RESOLVED[name]
    changes = METHODS[resolved["model"]["method"]].schedule_changes(resolved["train"])
    return {"schedule": changes} if changes else {}


DRAWN_FIGURES = [*REPORT_FIGURES, *([COMPARISON_FIGURE] if COMPARISON else [])]  # by `evit report`


rule experiments_file:
    output:
        RESULTS + "/tables/experiments.yaml",
    params:
        table=lambda w: {
            "dataset": config["dataset"],
            "tables": config["tables"],
            **({"masking": {"result": f"{RESULTS}/masking/masking.json", "experiment": MASKING["experiment"],
                            "paper": MASKING.get("paper") or {}}} if MASKING else {}),
            **({"comparison": {"experiments": COMPARISON["experiments"], "backbones": [
                {"name": name, "family": family, "result": f"{RESULTS}/comparison/{name}/eval.json"}
                for name, family in BACKBONES.items()]}} if COMPARISON else {}),
            "experiments": [
                {"name": name, "arch": e["arch"], "img_size": e["img_size"], "method": e["method"],
                 "params": method_params(RESOLVED[name]["model"]), "recipe": e["recipe"],
                 "tables": e["tables"], "paper": e.get("paper"), "result": result_file(name),
                 **schedule_of(name)}
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
        masking=[RESULTS + "/masking/masking.json"] if MASKING else [],
        backbones=expand(RESULTS + "/comparison/{backbone}/eval.json", backbone=BACKBONES),
        reference="results/reference/paper.csv",
    output:
        expand(RESULTS + "/tables/{table}.{ext}", table=TABLES, ext=("md", "tex")),
        [report_table(table, ext) for table in TABLES for ext in ("html", "csv")],
        [report_figure(fig) for fig in DRAWN_FIGURES],
        expand(RESULTS + "/figures/{fig}.pdf", fig=DRAWN_FIGURES),
    localrule: True
    shell:
        "{EVIT} report --experiments {input.experiments} --bench {input.bench} "
        "--reference {input.reference} --out-dir {RESULTS}"
