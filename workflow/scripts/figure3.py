"""Rule figure3: dev spBLEU per epoch, H2H and V2V (Figure 3, §7.2); pretrain drawn as a baseline line; with
`seeds`, each curve the mean over the variant's runs with its spread."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.figures import figure3_dev_curves

    params = snakemake.params
    metrics, paths = [], list(snakemake.input.metrics)
    for count in params.run_counts:  # every run of each variant in turn: one path, or the list of its runs'
        metrics.append(paths[0] if count == 1 else paths[:count])
        paths = paths[count:]
    rows = list(zip(params.labels, metrics, params.baselines))
    figure3_dev_curves(metrics_tsvs={label: path for label, path, baseline in rows if not baseline},
                       baselines={label: path for label, path, baseline in rows if baseline}, out=snakemake.output.png)
