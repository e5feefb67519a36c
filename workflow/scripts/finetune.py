"""Rule finetune: one variant (pretrain, full fine-tuning or LSLo) -> variant.json + per-epoch metrics."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

import torch  # noqa: E402

from lslo.finetune import run_finetune  # noqa: E402

torch.set_num_threads(snakemake.threads)
inp, out, params = snakemake.input, snakemake.output, snakemake.params
run_finetune(method=params.method, model_dir=inp.model, train_tsv=inp.train, dev_tsv=inp.dev,
             language_table=inp.table, languages=params.languages, index_plan=params.index,
             plan_json=inp.get("plan"), ranks_json=inp.get("ranks"), modules=params.modules,
             options=params.options, out_dir=params.out_dir, out_metrics=out.metrics,
             checkpoint_dir=params.checkpoint_dir)
