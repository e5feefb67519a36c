"""Rule summary: the paper's findings as targets with measured values, Table 1, Table 9, Figures 1-3."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.summary import ROLES, write_summary

    inp, params = snakemake.input, snakemake.params
    captions = ["Figure 1: learned weights per layer", "Figure 2: subspace demand per language (ISE)",
                "Figure 3: dev spBLEU per epoch"]
    write_summary(stats=dict(zip(ROLES, inp.stats)), labels=dict(params.labels), weights_tsv=inp.weights,
                  plan_json=inp.plan, table9_tsv=inp.table9, table_mds=list(inp.table_mds),
                  figures={caption: f"figures/{path.rsplit('/', 1)[1]}"
                           for caption, path in zip(captions, inp.figures)},
                  out_md=snakemake.output.md)
