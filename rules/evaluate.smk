# Stage 6, evaluate (§5): beam decoding of every direction, split round-robin into `eval.shards` jobs per
# variant (lslo.evaluate.shard_directions), then spBLEU / chrF++ per direction and per group pair (+ AVG), a CPU
# job of its own. The decoding options are recorded next to each variant (decoding.json): the decode jobs read
# them from there, and so does `lslo translate --variant results/finetune/<v>/variant.json`.


rule decoding_options:
    output:
        options="results/finetune/{variant}/decoding.json",
    params:
        options={
            key: config["eval"][key] for key in ("beam", "max_len_a", "max_len_b", "max_tokens", "search", "dtype")
        },
        code=CODE["decoding_options"],
    log:
        "logs/decoding_options/{variant}.log",
    localrule: True
    script:
        "../workflow/scripts/decoding_options.py"


rule decode:
    input:
        unpack(get_decode_input),
        decoding="results/finetune/{variant}/decoding.json",
        test="results/data/test.tsv",
        table=table_input(),
    output:
        hyps="results/evaluate/{variant}/hyps/{shard}.tsv",
    params:
        model_identity=MODEL_IDENTITY,
        table=path_of(get_language_table),
        languages=table_rows("decode"),
        shard=lambda wildcards: int(wildcards.shard),
        n_shards=config["eval"]["shards"],
        code=CODE["decode"],
    log:
        "logs/decode/{variant}/{shard}.log",
    benchmark:
        "results/benchmarks/decode/{variant}/{shard}.tsv"
    threads: 4
    resources:
        gpu=1,
        runtime=240,
        mem_mb=16000,
    script:
        "../workflow/scripts/decode.py"


rule score:
    input:
        hyps=get_hyps,
        test="results/data/test.tsv",
        table=table_input(),
        spm=get_spm(),
        spm_stamp=SPM_STAMP,
    output:
        directions="results/evaluate/{variant}/directions.tsv",
        groups="results/evaluate/{variant}/groups.tsv",
        signature="results/evaluate/{variant}/groups.signature.json",
        stats="results/evaluate/{variant}/sentence_stats.npz",
    params:
        label=variant_param("label"),
        spm_identity=SPM_IDENTITY,  # the spm's content: a replaced file that kept its mtime rescores
        table=path_of(get_language_table),
        languages=table_rows("score"),
        code=CODE["score"],
    log:
        "logs/score/{variant}.log",
    threads: 1
    resources:  # a CPU job on the cluster: about 0.7 s per 1,012-sentence direction, 10 min for lang30
        runtime=60,
        mem_mb=4000,
    script:
        "../workflow/scripts/score.py"
