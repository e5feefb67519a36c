"""Rule score_table: Pearson correlation of subspace scores with bitext size per module (Tables 9, 10)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo.tables import correlation_table  # noqa: E402

inp, out = snakemake.input, snakemake.output
correlation_table(scores_tsv=inp.scores, language_table=inp.table, side=snakemake.params.side,
                  out_tsv=out.tsv, out_md=out.md, title=snakemake.params.title)
