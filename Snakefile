# The EViT reproduction workflow: the paper's grid -> runs (via `evit launch`) -> benchmark -> tables and figures.
#   snakemake --profile slurm all                 # the paper's ImageNet grid on SLURM: the profile (installed by
#                                                 #   `evit install-profile`) names workflow/config/paper.yaml
#   snakemake --profile slurm all --configfile workflow/config/demo.yaml   # the demo on the cluster
#   snakemake --profile workflow/profiles/local all   # here, the Fashion-MNIST miniature (what `make demo` runs)
# Without a --configfile (from the command line or a profile) the config is the demo.
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from evit.config.io import yaml_file_error

min_version("8.0")

# The demo is the default; a --configfile (paper.yaml, ...) replaces it rather than being merged into it.
DEMO_CONFIG = f"{workflow.basedir}/workflow/config/demo.yaml"  # this checkout's, in any working directory
if not workflow.overwrite_configfiles:
    try:

        configfile: DEMO_CONFIG

    except WorkflowError as e:  # Snakemake names neither the file nor the line of a YAML error
        raise yaml_file_error(DEMO_CONFIG, e) from None


# `snakemake --report results/report.html`: this page, then every table and figure with its caption.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/check.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/visualize.smk"

if WF.masking:

    include: "workflow/rules/masking.smk"


if WF.comparison:

    include: "workflow/rules/comparison.smk"


if WF.preflight:

    include: "workflow/rules/preflight.smk"


# The runs' results are listed here too: a deleted run (results/runs/<exp>/) is then rerun, with what depends
# on it, even though the tables made from it are still there.
rule all:
    input:
        [WF.result_file(name) for name in WF.experiments],
        f"{WF.results}/bench/throughput.csv",
        expand(f"{WF.results}/tables/{{table}}.{{ext}}", table=WF.tables, ext=("md", "csv", "tex", "html")),
        expand(f"{WF.results}/figures/{{fig}}.{{ext}}", fig=WF.figures, ext=("png", "pdf")),
