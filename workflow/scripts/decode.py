"""Rule decode: beam search over one shard of the test directions (round-robin split of all n(n-1))."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    import torch

    from lslo.data import directions
    from lslo.evaluate import decode_shard, shard_directions
    from lslo.inference import read_decoding_options
    from lslo.languages import row_codes

    torch.set_num_threads(snakemake.threads)
    inp, params = snakemake.input, snakemake.params
    languages = row_codes(params.languages)
    shard = shard_directions(directions(languages), params.n_shards)[params.shard]
    decode_shard(variant_json=inp.variant, test_tsv=inp.test, directions=shard, out_hyps=snakemake.output.hyps,
                 options=read_decoding_options(inp.decoding))
