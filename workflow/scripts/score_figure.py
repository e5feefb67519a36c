"""Rule score_figure: subspace demand heatmaps (Figures 2, 5 from ISE scores; Figures 4, 6 from LSP scores)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo import figures  # noqa: E402

plot = getattr(figures, snakemake.params.function)  # figure2_subspace, figure4_lsp, ...
plot(snakemake.input.scores, snakemake.output.png)
