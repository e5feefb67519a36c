"""Rule demo_pretrain: SentencePiece + tokenizer + a tiny M2M100 pretrained on the demo bitext."""

import shutil

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.demo import pretrain_demo_model

    params, out = snakemake.params, snakemake.output
    pretrain_demo_model(snakemake.input.benchmark, out.model, seed=params.seed, max_steps=params.max_steps,
                        max_tokens=params.max_tokens, lr=params.lr, warmup=params.warmup,
                        temperature=params.temperature, threads=snakemake.threads, **dict(params.model))
    # The spm is its own output: the evaluation input (spBLEU with the demo's own SentencePiece model).
    shutil.copyfile(f"{out.model}/spm.model", out.spm)
