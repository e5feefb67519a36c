# Stage 5, finetune (§5, §6.3): one job per variant: pretrain (no training), full (Ft-all) or LSLo.
# Adapters / the HF model dir land next to variant.json; epoch checkpoints live under results/checkpoints/,
# which are not outputs, so Snakemake never deletes them and a rerun resumes from the last epoch.


rule finetune:
    input:
        unpack(get_finetune_input),
    output:
        variant="results/finetune/{variant}/variant.json",
        metrics="results/finetune/{variant}/metrics.tsv",
    params:
        method=variant_param("method"),
        languages=config["data"]["languages"],
        index=variant_param("index"),
        modules=variant_param("modules"),
        options=variant_options,
        out_dir="results/finetune/{variant}",
        checkpoint_dir="results/checkpoints/finetune/{variant}",
        lslo_version=LSLO_VERSION,
    log:
        "logs/finetune/{variant}.log",
    benchmark:
        "results/benchmarks/finetune/{variant}.tsv"
    threads: 4
    resources:
        gpu=1,
        runtime=1440,
        mem_mb=32000,
    script:
        "../workflow/scripts/finetune.py"
