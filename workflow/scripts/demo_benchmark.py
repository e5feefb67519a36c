"""Rule demo_benchmark: the synthetic multi-parallel benchmark (FLORES-101 layout) and its language table."""

import shutil

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.demo_benchmark import make_benchmark

    out = snakemake.output
    make_benchmark(out.benchmark, n_languages=snakemake.params.n_languages, seed=snakemake.params.seed)
    # The table is its own output so rules can depend on it (a file inside a directory() output cannot be an input).
    shutil.copyfile(f"{out.benchmark}/languages.tsv", out.table)
