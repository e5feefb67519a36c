"""Rule rehearsal_report: every job's clock -> results/rehearsal/report.md (lslo.rehearsal.rehearsal_report)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.languages import row_codes
    from lslo.rehearsal import rehearsal_report

    inp, params = snakemake.input, snakemake.params
    rehearsal_report(clock_jsons=inp.clocks, plans=params.plans, train_tsv=inp.train, devtest_tsv=inp.devtest,
                     model_dir=inp.model, language_table=params.table, languages=row_codes(params.languages),
                     rehearsal=params.rehearsal, out_md=snakemake.output.md)
