"""Rule data: FLORES dev/devtest of the run languages -> results/data/{train,devtest}.tsv."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.data import prepare_data
    from lslo.languages import row_codes

    out, params = snakemake.output, snakemake.params
    prepare_data(flores_root=params.flores_root, layout=params.layout, language_table_path=params.table,
                 languages=row_codes(params.languages), out_train=out.train, out_test=out.devtest)
