"""Rule demo_pretrain: SentencePiece + tokenizer + a tiny M2M100 pretrained on the demo bitext."""

import logging
import shutil
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo.demo import pretrain_demo_model  # noqa: E402

params, out = snakemake.params, snakemake.output
pretrain_demo_model(snakemake.input.benchmark, out.model, seed=params.seed, max_minutes=params.max_minutes,
                    max_steps=params.max_steps, max_tokens=params.max_tokens, lr=params.lr, warmup=params.warmup,
                    threads=snakemake.threads, **dict(params.model))
# The spm is its own output: the evaluation input (spBLEU with the demo's own SentencePiece model).
shutil.copyfile(f"{out.model}/spm.model", out.spm)
