"""Rule score: spBLEU and chrF++ per direction, aggregated per resource-group pair and AVG (over directions)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo.evaluate import score_variant  # noqa: E402

inp, out = snakemake.input, snakemake.output
score_variant(hyp_tsvs=list(inp.hyps), test_tsv=inp.test, language_table=inp.table, spm_model=inp.spm,
              out_directions=out.directions, out_groups=out.groups, label=snakemake.params.label,
              out_stats=out.stats)
