# Stage 3, subspace (§4.2, eq. 6; §7.3): LSLo rank 8 under GPS with global L1 pruning of the B matrices.
#   mode ise: layer-wise cross-language pruning to P_ise -> scores per (language, side, layer, module)
#   mode lsp: language-specific pruning groups to P_lsp -> which modules each language needs (Figures 4, 6)


rule subspace:
    input:
        model=get_model(),
        model_stamp=MODEL_STAMP,
        train=result_path("data/train.tsv"),
        dev=dev_file(stage_options()["subspace"]),
        table=table_input(),
        plan=result_path("weight_learning/plan.json"),
    output:
        **rehearsal_clock("subspace/{mode}"),
        scores=result_path("subspace/{mode}/scores.tsv"),
    params:
        **rehearsal_params("subspace", timed=True),
        model_identity=MODEL_IDENTITY,
        table=path_of(get_language_table),
        languages=table_rows("train"),
        rank=config["subspace"]["rank"],
        target_ratio=lambda wildcards: config["subspace"][f"P_{wildcards.mode}"],
        gps=canonical(config["subspace"]["gps"]),
        options=train_options(config["subspace"]["train"]),
        checkpoint_dir=result_path("checkpoints/subspace/{mode}"),  # outside outputs: a rerun resumes
        code=CODE["subspace"],
    log:
        log_path("subspace/{mode}.log"),
    benchmark:
        result_path("benchmarks/subspace/{mode}.tsv")
    threads: 4
    resources:
        gpu=1,
        runtime=720,
        mem_mb=32000,
    script:
        stage_script("subspace")
