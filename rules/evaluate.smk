# Stage 6, evaluate (§5): beam decoding of every direction, split round-robin into `eval.shards` jobs per
# run (lslo.evaluate.shard_directions), then spBLEU / chrF++ per direction and per group pair (+ AVG), a CPU
# job of its own. The decoding options are recorded next to each variant (decoding.json): the decode jobs read
# them from there, and so does `lslo translate --variant results/finetune/<v>/variant.json`.


rule decoding_options:
    output:
        **rehearsal_clock("decoding_options/{variant}"),
        options=result_path("finetune/{variant}/decoding.json"),
    params:
        **rehearsal_params("decoding_options"),
        options={key: EVAL[key] for key in ("beam", "max_len_a", "max_len_b", "max_tokens", "search", "dtype")},
        code=CODE["decoding_options"],
    log:
        log_path("decoding_options/{variant}.log"),
    localrule: True
    script:
        stage_script("decoding_options")


rule decode:
    input:
        unpack(get_decode_input),
        decoding=result_path("finetune/{variant}/decoding.json"),
        test=result_path("data/test.tsv"),
        table=table_input(),
    output:
        **rehearsal_clock("decode/{variant}/{shard}"),
        hyps=result_path("evaluate/{variant}/hyps/{shard}.tsv"),
    params:
        **rehearsal_params("decode", timed=True),
        model_identity=MODEL_IDENTITY,
        table=path_of(get_language_table),
        languages=table_rows("decode"),
        shard=lambda wildcards: int(wildcards.shard),
        n_shards=config["eval"]["shards"],
        code=CODE["decode"],
    log:
        log_path("decode/{variant}/{shard}.log"),
    benchmark:
        result_path("benchmarks/decode/{variant}/{shard}.tsv")
    threads: 4
    resources:
        gpu=1,
        runtime=240,
        mem_mb=16000,
    script:
        stage_script("decode")


rule score:
    input:
        hyps=get_hyps,
        test=result_path("data/test.tsv"),
        table=table_input(),
        spm=get_spm(),
        spm_stamp=SPM_STAMP,
    output:
        **rehearsal_clock("score/{variant}"),
        directions=result_path("evaluate/{variant}/directions.tsv"),
        groups=result_path("evaluate/{variant}/groups.tsv"),
        signature=result_path("evaluate/{variant}/groups.signature.json"),
        stats=result_path("evaluate/{variant}/sentence_stats.npz"),
    params:
        **rehearsal_params("score"),
        label=run_param("label"),
        spm_identity=SPM_IDENTITY,  # the spm's content: a replaced file that kept its mtime rescores
        table=path_of(get_language_table),
        languages=table_rows("score"),
        code=CODE["score"],
    log:
        log_path("score/{variant}.log"),
    threads: 1
    resources:  # a CPU job on the cluster: about 0.7 s per 1,012-sentence direction, 10 min for lang30
        runtime=60,
        mem_mb=4000,
    script:
        stage_script("score")
