"""Rule figure1: learned index weights per layer (Figure 1, §6.1)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo.figures import figure1_weights  # noqa: E402

figure1_weights(weights_tsv=snakemake.input.weights, out=snakemake.output.png)
