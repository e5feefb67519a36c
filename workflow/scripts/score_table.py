"""Rule score_table: Pearson correlation of subspace scores with bitext size per module (Tables 9, 10)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.tables import correlation_table

    inp, out = snakemake.input, snakemake.output
    correlation_table(scores_tsv=inp.scores, language_table=snakemake.params.table, side=snakemake.params.side,
                      out_tsv=out.tsv, out_md=out.md, title=snakemake.params.title)
