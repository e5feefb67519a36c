"""Rule figure3: dev spBLEU per epoch, H2H and V2V (Figure 3, §7.2)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo import figures  # noqa: E402

figures.figure3(metrics_tsvs=list(snakemake.input.metrics), labels=snakemake.params.labels,
                out_png=snakemake.output.png)
