"""Rule summary: the paper's findings as targets with measured values, Table 1, Table 9, Figures 1-3; with
`seeds`, each value the mean over the variant's runs with its spread, and what training each variant took."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.cost import variant_cost
    from lslo.summary import ROLES, write_summary
    from lslo.tables import runs_per_row

    inp, params = snakemake.input, snakemake.params
    stats = dict(zip(ROLES, runs_per_row(inp.stats, params.run_counts)))
    labels = dict(params.labels)
    cost_runs = dict(params.cost_runs)  # None for a role that does not train (Pretrain): its row reads "-"
    cost = {labels[role]: None if cost_runs[role] is None else variant_cost(cost_runs[role]) for role in ROLES}
    captions = ["Figure 1: learned weights per layer", "Figure 2: subspace demand per language (ISE)",
                "Figure 3: dev spBLEU per epoch"]
    write_summary(stats=stats, labels=labels, weights_tsv=inp.weights,
                  plan_json=inp.plan, table9_tsv=inp.table9, table_mds=list(inp.table_mds),
                  figures={caption: f"figures/{path.rsplit('/', 1)[1]}"
                           for caption, path in zip(captions, inp.figures)},
                  out_md=snakemake.output.md, cost=cost)
