"""Rule table: a results table (Tables 1-4, 8): spBLEU per group pair + AVG and #Params, one row per variant."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    import pandas as pd

    from lslo.tables import by_label, make_table

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    # #Params: the trainable count of the last logged epoch (metrics.tsv); "-" for pretrain (nothing trained)
    trainable = [int(pd.read_csv(path, sep="\t")["trainable_params"].iloc[-1]) if trained else None
                 for path, trained in zip(inp.metrics, params.trained)]
    labels, what = list(params.labels), params.title
    make_table(groups_tsvs=by_label(labels, list(inp.groups), what), params=by_label(labels, trainable, what),
               out_tsv=out.tsv, out_md=out.md, title=params.title, spm_note=params.spm_note,
               stats_npzs=by_label(labels, list(inp.stats), what),
               methods=by_label(labels, list(params.methods), what), out_intervals=out.intervals,
               index_plan=inp.plan or None)  # Table 3: the learned plan against the paper's
