"""Rule table: a results table (Tables 1-4, 8): spBLEU per group pair + AVG and #Params, one row per variant;
with `seeds`, each cell the mean over the variant's runs with its spread, and what training the variant took."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    import logging
    from pathlib import Path

    import pandas as pd

    from lslo.cost import variant_cost
    from lslo.tables import by_label, make_table

    inp, out, params = snakemake.input, snakemake.output, snakemake.params
    labels, what = list(params.labels), params.title
    counts = list(params.run_counts)

    def per_row(paths):
        """The rule's inputs, every run of each row in turn, split back into rows: a path for a one-run row (the
        one-seed table as before), the list of its runs' paths otherwise."""
        paths, rows = list(paths), []
        for count in counts:
            rows.append(paths[0] if count == 1 else paths[:count])
            paths = paths[count:]
        return rows

    def first(row):
        return row if isinstance(row, str) else row[0]

    def cost_of(runs):
        """lslo.cost.variant_cost of a variant's training jobs (None: it does not train). A file it cannot read
        leaves the fields that need it empty ("-"); the log names the file (results copied without their
        benchmarks/, a deleted checkpoint folder)."""
        if runs is None:
            return None
        missing = sorted({path for run in runs for path in run["benchmarks"] + run["metrics"]
                          if not Path(path).is_file()})
        if missing:
            logging.getLogger("table").warning("training cost without %s: not found", ", ".join(missing))
        return variant_cost(runs)

    # #Params: the trainable count of the last logged epoch (metrics.tsv; every seed trains the same count); "-"
    # for pretrain (nothing trained)
    trainable = [int(pd.read_csv(first(row), sep="\t")["trainable_params"].iloc[-1]) if trained else None
                 for row, trained in zip(per_row(inp.metrics), params.trained)]
    cost = {label: value for label, value in zip(labels, map(cost_of, params.cost_runs)) if value is not None}
    make_table(groups_tsvs=by_label(labels, per_row(inp.groups), what), params=by_label(labels, trainable, what),
               out_tsv=out.tsv, out_md=out.md, title=params.title, spm_note=params.spm_note,
               stats_npzs=by_label(labels, per_row(inp.stats), what),
               methods=by_label(labels, list(params.methods), what), out_intervals=out.intervals,
               index_plan=inp.plan or None,  # Table 3: the learned plan against the paper's
               cost=cost)
