# Stage 2, weight learning (§4.1, eq. 5): source- and target-indexed LSLo on every chosen module, one learned
# softmax pair (w_src, w_tgt) per layer -> per-layer weights (Figure 1) and the index plan (WL).


rule weight_learning:
    input:
        model=get_model(),
        model_stamp=MODEL_STAMP,
        train=result_path("data/train.tsv"),
        dev=dev_file(stage_options()["weight_learning"]),
        table=table_input(),
    output:
        **rehearsal_clock("weight_learning"),
        weights=result_path("weight_learning/weights.tsv"),
        plan=result_path("weight_learning/plan.json"),
    params:
        **rehearsal_params("weight_learning", timed=True),
        model_identity=MODEL_IDENTITY,
        table=path_of(get_language_table),
        languages=table_rows("train"),
        modules=config["weight_learning"]["modules"],
        rank=config["weight_learning"]["rank"],
        options=train_options(config["weight_learning"]["train"]),
        checkpoint_dir=result_path("checkpoints/weight_learning/wl"),  # outside outputs: a rerun resumes
        code=CODE["weight_learning"],
    log:
        log_path("weight_learning.log"),
    benchmark:
        result_path("benchmarks/weight_learning.tsv")
    threads: 4
    resources:
        gpu=1,
        runtime=720,
        mem_mb=32000,
    script:
        stage_script("weight_learning")
