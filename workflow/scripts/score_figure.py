"""Rule score_figure: subspace demand heatmaps (Figures 2, 5 from ISE scores; Figures 4, 6 from LSP scores)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo import figures  # noqa: E402

plot = getattr(figures, snakemake.wildcards.figure)  # figures.figure2, figure4, figure5, figure6
plot(scores_tsv=snakemake.input.scores, language_table=snakemake.input.table, out_png=snakemake.output.png)
