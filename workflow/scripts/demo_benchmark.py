"""Rule demo_benchmark: the synthetic multi-parallel benchmark (FLORES-101 layout) and its language table."""

import logging
import shutil
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

from lslo.demo import make_benchmark  # noqa: E402

out = snakemake.output
make_benchmark(out.benchmark, n_languages=snakemake.params.n_languages, seed=snakemake.params.seed)
# The table is its own output so rules can depend on it (a file inside a directory() output cannot be an input).
shutil.copyfile(f"{out.benchmark}/languages.tsv", out.table)
