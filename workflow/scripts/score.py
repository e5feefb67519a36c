"""Rule score: spBLEU and chrF++ per direction, aggregated per resource-group pair and AVG (over directions)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.evaluate import score_variant

    inp, out = snakemake.input, snakemake.output
    score_variant(hyp_tsvs=list(inp.hyps), test_tsv=inp.test, language_table=snakemake.params.table,
                  spm_model=inp.spm, out_directions=out.directions, out_groups=out.groups, label=snakemake.params.label,
                  out_stats=out.stats)
