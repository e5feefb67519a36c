"""Rule weight_learning (§4.1, eq. 5): learned per-layer index weights and the index plan."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

import torch  # noqa: E402

from lslo.weight_learning import run_weight_learning  # noqa: E402

torch.set_num_threads(snakemake.threads)
inp, out, params = snakemake.input, snakemake.output, snakemake.params
run_weight_learning(model_dir=inp.model, train_tsv=inp.train, dev_tsv=inp.dev, language_table=inp.table,
                    languages=params.languages, modules=params.modules, rank=params.rank, options=params.options,
                    out_weights=out.weights, out_plan=out.plan, checkpoint_dir=params.checkpoint_dir)
