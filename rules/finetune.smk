# Stage 5, finetune (§5, §6.3): one job per run (a variant once per seed of `seeds`; rules/common.smk), one rule
# per method, because each method writes different files and every file a later job reads is a declared output (a
# deleted adapter file reruns its finetune):
#   finetune           LSLo: adapters.safetensors (the base model stays where it is)
#   finetune_full      Ft-all: the whole fine-tuned HF model directory, model/
#   finetune_pretrain  the untrained base model: variant.json and the epoch-0 dev scores only; no GPU, no training
# variant.json names those files by paths relative to itself. Epoch checkpoints live under results/checkpoints/,
# which are not outputs, so Snakemake never deletes them and a rerun resumes from the last epoch.
# resources gpu=N (N > 1) trains in N DDP processes inside the job (lslo.jobs.run_processes).


rule finetune:
    input:
        unpack(get_finetune_input),
    output:
        **artifact_output("lslo"),
        **rehearsal_clock("finetune/{variant}"),
        variant=result_path("finetune/{variant}/variant.json"),
        metrics=result_path("finetune/{variant}/metrics.tsv"),
    params:
        **rehearsal_params("finetune", timed=True),
        method=run_param("method"),
        model_identity=MODEL_IDENTITY,
        table=path_of(get_language_table),
        languages=table_rows("train"),
        index=run_param("index"),
        modules=run_param("modules"),
        options=lambda wildcards: finetune_options(wildcards.variant),  # pretrain: its dev options only
        out_dir=result_path("finetune/{variant}"),
        checkpoint_dir=result_path("checkpoints/finetune/{variant}"),
        code=CODE["finetune"],
    wildcard_constraints:
        variant=variants_pattern("lslo"),
    log:
        log_path("finetune/{variant}.log"),
    benchmark:
        result_path("benchmarks/finetune/{variant}.tsv")
    threads: 4
    resources:
        gpu=1,
        runtime=1440,
        mem_mb=32000,
    script:
        stage_script("finetune")


use rule finetune as finetune_full with:
    output:
        **{key: directory(path) for key, path in artifact_output("full").items()},
        **rehearsal_clock("finetune/{variant}"),
        variant=result_path("finetune/{variant}/variant.json"),
        metrics=result_path("finetune/{variant}/metrics.tsv"),
    wildcard_constraints:
        variant=variants_pattern("full"),


use rule finetune as finetune_pretrain with:
    output:
        **rehearsal_clock("finetune/{variant}"),
        variant=result_path("finetune/{variant}/variant.json"),
        metrics=result_path("finetune/{variant}/metrics.tsv"),
    wildcard_constraints:
        variant=variants_pattern("pretrain"),
    threads: 4
    resources:
        runtime=240,
        mem_mb=16000,
