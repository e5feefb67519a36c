"""Rule weight_learning (§4.1, eq. 5): learned per-layer index weights and the index plan."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.jobs import run_processes
    from lslo.languages import row_codes
    from lslo.weight_learning import run_weight_learning

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    run_processes(run_weight_learning, getattr(snakemake.resources, "gpu", 1), log_path=snakemake.log[0],
                  threads=snakemake.threads, model_dir=inp.model, train_tsv=inp.train, dev_tsv=inp.dev or None,
                  language_table=params.table, languages=row_codes(params.languages), modules=params.modules,
                  rank=params.rank,
                  options=params.options, out_weights=out.weights, out_plan=out.plan,
                  checkpoint_dir=params.checkpoint_dir)
