"""Rules finetune, finetune_full, finetune_pretrain: one variant (LSLo, Ft-all or the untrained base model) ->
variant.json, per-epoch metrics and the adapters / model directory; resources gpu=N > 1 trains in N processes."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.finetune import run_finetune
    from lslo.jobs import run_processes
    from lslo.languages import row_codes

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    run_processes(run_finetune, getattr(snakemake.resources, "gpu", 1), log_path=snakemake.log[0],
                  threads=snakemake.threads, method=params.method, model_dir=inp.model, train_tsv=inp.train,
                  dev_tsv=inp.dev or None, language_table=params.table,
                  languages=row_codes(params.languages), index_plan=params.index,
                  plan_json=inp.get("plan"), ranks_json=inp.get("ranks"), modules=params.modules,
                  options=params.options, out_dir=params.out_dir, out_metrics=out.metrics,
                  checkpoint_dir=params.checkpoint_dir)
