"""Rule figure1: learned index weights per layer (Figure 1, §6.1)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo import figures  # noqa: E402

figures.figure1(weights_tsv=snakemake.input.weights, out_png=snakemake.output.png)
