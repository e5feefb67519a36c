"""Rules test_set and dev_set: the first N sentences of results/data/devtest.tsv (N null: all of them)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.data import read_parallel, write_parallel
    from lslo.errors import LsloError

    devtest, n = read_parallel(snakemake.input.devtest), snakemake.params.n
    if n and n > len(devtest):  # a cut larger than devtest would silently hold fewer sentences than asked
        raise LsloError(f"{snakemake.input.devtest}: {snakemake.params.key} asks for the first {n} sentences, it "
                        f"has {len(devtest)}")
    write_parallel(devtest.head(n) if n else devtest, snakemake.output.rows)
