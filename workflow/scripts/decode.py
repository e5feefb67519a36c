"""Rule decode: beam search over one shard of the test directions (round-robin split of all n(n-1))."""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

import torch  # noqa: E402

from lslo.data import directions  # noqa: E402
from lslo.evaluate import decode_shard, shard_directions  # noqa: E402
from lslo.languages import read_language_table, select  # noqa: E402

torch.set_num_threads(snakemake.threads)
inp, params = snakemake.input, snakemake.params
languages = select(read_language_table(inp.table), params.languages)
shard = shard_directions(directions(languages), params.n_shards)[params.shard]
decode_shard(variant_json=inp.variant, test_tsv=inp.test, directions=shard, out_hyps=snakemake.output.hyps,
             beam=params.beam, max_tokens=params.max_tokens, max_len_a=params.max_len_a, max_len_b=params.max_len_b)
