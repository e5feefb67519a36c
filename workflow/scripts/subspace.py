"""Rule subspace (§4.2 eq. 6, §7.3): ISE or language-specific pruning scores under GPS."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

import torch  # noqa: E402

from lslo.io import read_json  # noqa: E402
from lslo.subspace import run_subspace  # noqa: E402

torch.set_num_threads(snakemake.threads)
inp, params = snakemake.input, snakemake.params
run_subspace(model_dir=inp.model, train_tsv=inp.train, dev_tsv=inp.dev, language_table=inp.table,
             languages=params.languages, plan=read_json(inp.plan), rank=params.rank, options=params.options,
             mode=snakemake.wildcards.mode, target_ratio=params.target_ratio, gps=params.gps,
             out_scores=snakemake.output.scores, checkpoint_dir=params.checkpoint_dir)
