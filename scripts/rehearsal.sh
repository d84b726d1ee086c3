#!/usr/bin/env bash
# The paper grid rehearsed on the SLURM cluster (CI runs it after the tests, on scripts/slurm_cluster.sh's two
# nodes): paper.yaml's whole DAG, every rule, run for real through the slurm profile with the overlay
# workflow/config/rehearsal.yaml, which changes only sizes and locations (tests/test_rehearsal.py), on the
# ImageNet layout that scripts/rehearsal_data.py writes; then Snakemake's report, a check that the workflow is
# complete (a dry run finds nothing to do) and the time taken.
#
#   bash scripts/rehearsal.sh          (from a checkout with `make env` and `make data` done, a cluster up)
#
# Every run starts over: the overlay's results folder is deleted first (the generated images are kept).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIGS=(workflow/config/paper.yaml workflow/config/rehearsal.yaml)
OPTS=(--profile workflow/profiles/slurm --configfile "${CONFIGS[@]}")  # last: --configfile takes what follows
RESULTS=$(.venv/bin/python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["results"])' "${CONFIGS[1]}")
log() { echo "rehearsal: $*" >&2; }

start=$SECONDS
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
.venv/bin/python scripts/rehearsal_data.py "${CONFIGS[@]}"
log "data ready after $((SECONDS - start)) s"
.venv/bin/snakemake all "${OPTS[@]}" 2>&1 | tee "$RESULTS/snakemake.log"
.venv/bin/snakemake --report "$RESULTS/report.html" "${OPTS[@]}"
if ! .venv/bin/snakemake -n all "${OPTS[@]}" 2>&1 | grep -q "Nothing to be done"; then
    log "FAILED: a dry run after the rehearsal still finds jobs to run"
    exit 1
fi
[[ -s $RESULTS/report.html ]] || { log "FAILED: no $RESULTS/report.html"; exit 1; }
steps=$(grep -o '[0-9]* of [0-9]* steps (100%) done' "$RESULTS/snakemake.log" | tail -1)
log "done in $((SECONDS - start)) s: ${steps:-?}; tables, figures and report.html in $RESULTS"
