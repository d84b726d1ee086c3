# The workflow config, validated against its schema, and its plan: evit.workflow builds the experiment table and
# every run's config and checks them all while the DAG is built (`snakemake -n` names a bad key or value); the
# rules ask the plan, `WF`. Here only what needs Snakemake: validation, the wildcard constraints, report entries.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from evit.errors import ConfigError
from evit.layout import COMPARISON_TABLE, KEPT_TOKENS_FIGURE, MASKING_FIGURE, MASKING_TABLE, PREFLIGHT_TABLE
from evit.workflow import EVIT, SCHEMA_FILE, download, one_of, write_yaml
from evit.workflow_build import build_workflow
from evit.workflow_schema import schema_error

try:
    validate(config, str(Path(workflow.basedir) / SCHEMA_FILE))
except WorkflowError as e:  # its message dumps the schema and the config: one line naming the key and the file
    raise schema_error(e, config, workflow.configfiles, workflow.config_settings.config) from None
try:
    WF = build_workflow(config, workflow.basedir)
except ConfigError as e:  # one line naming the files, without evit.workflow_build's frames
    raise ConfigError(f"{e} (config files: {', '.join(map(str, workflow.configfiles))})") from None


def run_cpus(wildcards):
    """The cores of a train or eval job (its run's launcher cpus_per_task; the job uses that many threads)."""
    return WF.run_cpus(wildcards.exp)


def one_process_cpus(wildcards):
    """The cores of a one-process job (the masking job, a backbone's evaluation), the bench launcher's."""
    return WF.bench_launcher()["cpus_per_task"]


def job_dir(wildcards, output):
    """The folder of a job's first output, where `evit launch` runs it (its --run-dir)."""
    return Path(output[0]).parent


def report_table(table, ext):
    """A table's .html or .csv, flagged for the report with its caption: workflow/report/table.rst (the masking,
    comparison and preflight tables': masking.rst, comparison.rst, preflight.rst)."""
    view = {"html": "table", "csv": "csv (every column)"}[ext]
    caption = {MASKING_TABLE: "../report/masking.rst", COMPARISON_TABLE: "../report/comparison.rst",
               PREFLIGHT_TABLE: "../report/preflight.rst"}.get(
        table, "../report/table.rst")
    return report(f"{WF.results}/tables/{table}.{ext}", caption=caption, category="Tables",
                  labels={"table": table, "view": view})


def report_figure(fig):
    """A figure's png, flagged for the report with its caption workflow/report/figures/<fig>.rst."""
    return report(f"{WF.results}/figures/{fig}.png", caption=f"../report/figures/{fig}.rst", category="Figures",
                  labels={"figure": fig})


wildcard_constraints:
    exp=one_of(WF.experiments, "no experiment"),
    name=one_of(WF.weight_urls, "no download"),
    ext="pth|safetensors",
    backbone=one_of(WF.backbones, "no backbone"),
