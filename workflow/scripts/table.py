"""Rule table: a results table (Tables 1-4, 8): spBLEU per group pair + AVG and #Params, one row per variant."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    import pandas as pd

    from lslo.tables import make_table

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    # #Params: the trainable count of the last logged epoch (metrics.tsv); "-" for pretrain (nothing trained)
    trainable = [int(pd.read_csv(path, sep="\t")["trainable_params"].iloc[-1]) if trained else None
                 for path, trained in zip(inp.metrics, params.trained)]
    make_table(groups_tsvs=dict(zip(params.labels, inp.groups)), params=dict(zip(params.labels, trainable)),
               out_tsv=out.tsv, out_md=out.md, title=params.title, spm_note=params.spm_note,
               stats_npzs=dict(zip(params.labels, inp.stats)), methods=dict(zip(params.labels, params.methods)),
               out_intervals=out.intervals)
