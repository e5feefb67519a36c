"""Rule table: a results table (Tables 1-4, 8): spBLEU per group pair + AVG and #Params, one row per variant;
with `seeds`, each cell the mean over the variant's runs with its spread, and what training the variant took."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    import pandas as pd

    from lslo.cost import variant_cost
    from lslo.tables import by_label, make_table, runs_per_row

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    labels, what = list(params.labels), params.title

    def rows(paths):  # every run of each row in turn -> a path per one-run row, the runs' paths per several-run row
        return runs_per_row(paths, params.run_counts)

    # #Params: the trainable count of the last logged epoch (metrics.tsv; every seed trains the same count); "-"
    # for pretrain (nothing trained)
    first_runs = [row if isinstance(row, str) else row[0] for row in rows(inp.metrics)]
    trainable = [int(pd.read_csv(path, sep="\t")["trainable_params"].iloc[-1]) if trained else None
                 for path, trained in zip(first_runs, params.trained)]
    cost = {label: variant_cost(runs) for label, runs in zip(labels, params.cost_runs) if runs is not None}
    make_table(groups_tsvs=by_label(labels, rows(inp.groups), what), params=by_label(labels, trainable, what),
               out_tsv=out.tsv, out_md=out.md, title=params.title, spm_note=params.spm_note,
               stats_npzs=by_label(labels, rows(inp.stats), what),
               methods=by_label(labels, list(params.methods), what), out_intervals=out.intervals,
               index_plan=inp.plan or None,  # Table 3: the learned plan against the paper's
               cost=cost)
