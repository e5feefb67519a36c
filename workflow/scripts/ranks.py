"""Rule ranks: per-language ranks and GPS targets of one LSLo variant (lslo.ranks)."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo.ranks import assign_ranks  # noqa: E402

inp, params = snakemake.input, snakemake.params
assign_ranks(policy=params.policy, language_table=inp.table, languages=params.languages,
             group_ranks=params.group_ranks, gps=params.gps, scores_tsv=inp.scores or None,
             subspace_options=params.subspace_options, out_json=snakemake.output.plan, epochs=params.epochs)
