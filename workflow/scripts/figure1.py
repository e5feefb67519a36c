"""Rule figure1: learned index weights per layer (Figure 1, §6.1)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.figures import figure1_weights

    figure1_weights(weights_tsv=snakemake.input.weights, out=snakemake.output.png)
