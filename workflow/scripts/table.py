"""Rule table: a results table (Tables 1-4, 8): spBLEU per group pair + AVG and #Params, one row per variant."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo import figures  # noqa: E402

inp, out = snakemake.input, snakemake.output
figures.results_table(groups_tsvs=list(inp.groups), metrics_tsvs=list(inp.metrics), labels=snakemake.params.labels,
                      out_tsv=out.tsv, out_md=out.md)
