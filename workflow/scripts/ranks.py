"""Rule ranks: per-language ranks and GPS targets of one LSLo variant (lslo.ranks)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.languages import row_codes
    from lslo.ranks import assign_ranks

    inp, params = snakemake.input, snakemake.params
    assign_ranks(policy=params.policy, language_table=params.table, languages=row_codes(params.languages),
                 group_ranks=params.group_ranks, gps=params.gps, scores_tsv=inp.scores or None,
                 subspace_options=params.subspace_options, out_json=snakemake.output.plan, epochs=params.epochs)
