"""The names of the pipeline's figures under results/figures/, shared by the workflow, `evit report` and
`evit visualize` (torch- and pandas-free, so the workflow reads them while it builds the DAG)."""

REPORT_FIGURES = ("accuracy_vs_throughput", "keep_rate_sweep", "frontier")   # drawn by `evit report`
KEPT_TOKENS_FIGURE = "kept_tokens"                                           # the paper's Figure 3, by `evit visualize`
FIGURES = (*REPORT_FIGURES, KEPT_TOKENS_FIGURE)
