"""The names of the pipeline's figures under results/figures/ (and of the masking and comparison tables), shared
by the workflow, `evit report`, `evit visualize` and the masking job (torch- and pandas-free: the workflow reads
them while it builds the DAG)."""

REPORT_FIGURES = ("accuracy_vs_throughput", "keep_rate_sweep", "frontier")   # drawn by `evit report`
COMPARISON_FIGURE = "comparison"                # the paper's Figure 4, by `evit report` when the config has backbones
KEPT_TOKENS_FIGURE = "kept_tokens"                                           # the paper's Figure 3, by `evit visualize`
MASKING_FIGURE = "masking"                      # the paper's Figure 1, by the masking job (`launch --command mask`)
FIGURES = (*REPORT_FIGURES, COMPARISON_FIGURE, KEPT_TOKENS_FIGURE, MASKING_FIGURE)
MASKING_TABLE = "masking"                       # the paper's Table 1, by `evit report` from the masking job's result
COMPARISON_TABLE = "comparison"                 # the backbones beside EViT, by `evit report`
PREFLIGHT_TABLE = "preflight"                   # the grid's cost and the node's checks, by `evit report`
