# The EViT reproduction workflow: the paper's grid -> runs (via `evit launch`) -> benchmark -> tables and figures.
#   snakemake --profile slurm all                 # on a SLURM cluster (profile installed by `evit install-profile`)
#   snakemake --profile workflow/profiles/local all   # here, the Fashion-MNIST miniature (what `make demo` runs)
# The default config is the demo; the paper's ImageNet grid is `--configfile workflow/config/paper.yaml`.
from snakemake.utils import min_version

min_version("8.0")

# The demo is the default; a --configfile (paper.yaml, ...) replaces it rather than being merged into it.
if not workflow.overwrite_configfiles:

    configfile: "workflow/config/demo.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/visualize.smk"


rule all:
    input:
        expand(RESULTS + "/tables/{table}.{ext}", table=TABLES, ext=("md", "csv", "tex")),
        expand(RESULTS + "/figures/{fig}.{ext}", fig=FIGURES, ext=("png", "pdf")),
