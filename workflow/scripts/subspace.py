"""Rule subspace (§4.2 eq. 6, §7.3): ISE or language-specific pruning scores under GPS."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.io import read_json
    from lslo.jobs import run_processes
    from lslo.languages import row_codes
    from lslo.subspace import run_subspace

    inp, params = snakemake.input, snakemake.params
    run_processes(run_subspace, getattr(snakemake.resources, "gpu", 1), log_path=snakemake.log[0],
                  threads=snakemake.threads, model_dir=inp.model, train_tsv=inp.train, dev_tsv=inp.dev or None,
                  language_table=params.table, languages=row_codes(params.languages), plan=read_json(inp.plan),
                  rank=params.rank,
                  options=params.options, mode=snakemake.wildcards.mode, target_ratio=params.target_ratio,
                  gps=params.gps, out_scores=snakemake.output.scores, checkpoint_dir=params.checkpoint_dir)
