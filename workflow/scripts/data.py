"""Rule data: FLORES dev/devtest of the run languages -> results/data/{train,devtest}.tsv."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.data import prepare_data

    out, params = snakemake.output, snakemake.params
    prepare_data(flores_root=params.flores_root, layout=params.layout, language_table_path=params.table,
                 languages=[row["code"] for row in params.languages], out_train=out.train, out_test=out.devtest)
