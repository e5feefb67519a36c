"""Rule score_figure: subspace demand heatmaps (Figures 2, 5 from ISE scores; Figures 4, 6 from LSP scores)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo import figures

    plot = getattr(figures, snakemake.params.function)  # figure2_subspace, figure4_lsp, ...
    plot(snakemake.input.scores, snakemake.output.png)
