"""Rule data: FLORES dev/devtest -> results/data/{train,test}.tsv (test optionally cut to the first N sentences)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.data import prepare_data

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    # eval.max_sentences: evaluate on a subset of devtest (demo, smoke runs)
    prepare_data(flores_root=inp.flores, layout=params.layout, language_table_path=inp.table,
                 languages=params.languages, out_train=out.train, out_test=out.test,
                 test_sentences=params.test_sentences)
