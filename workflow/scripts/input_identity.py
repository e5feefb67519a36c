"""Rule input_identity: the stamp of one input the user brings (FLORES files, base model, spm) at one content
identity; the rules that read the input take the stamp as an input (rules/common.smk, identity_stamp)."""

from lslo.jobs import stage_job

with stage_job(snakemake.log[0]):
    from lslo.io import write_json

    params = snakemake.params
    write_json({"kind": snakemake.wildcards.kind, "path": str(params.path), "identity": params.identity},
               snakemake.output.stamp)
