"""Rule figure3: dev spBLEU per epoch, H2H and V2V (Figure 3, §7.2); pretrain drawn as a baseline line; with
`seeds`, each curve the mean over the variant's runs with its spread."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.figures import figure3_dev_curves
    from lslo.tables import runs_per_row

    params = snakemake.params
    rows = list(zip(params.labels, runs_per_row(snakemake.input.metrics, params.run_counts), params.baselines))
    figure3_dev_curves(metrics_tsvs={label: path for label, path, baseline in rows if not baseline},
                       baselines={label: path for label, path, baseline in rows if baseline}, out=snakemake.output.png)
