"""Rule decoding_options: the evaluate stage's decoding options (config eval), recorded next to the variant."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.inference import DecodingOptions, write_decoding_options

    write_decoding_options(DecodingOptions(**snakemake.params.options), snakemake.output.options)
