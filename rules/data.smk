# Stage 1, data (paper §5): FLORES dev -> train table, devtest -> test table. Demo mode first builds its own
# world: the synthetic benchmark (FLORES-101 layout) and a tiny M2M100 pretrained on its bitext.


rule demo_benchmark:
    output:
        **rehearsal_clock("demo_benchmark"),
        benchmark=directory(result_path("demo/benchmark")),
        table=result_path("demo/languages.tsv"),
    params:
        **rehearsal_params("demo_benchmark"),
        n_languages=config["demo"]["n_languages"],
        seed=config["demo"]["seed"],
        code=CODE["demo_benchmark"],
    log:
        log_path("demo_benchmark.log"),
    localrule: True
    script:
        stage_script("demo_benchmark")


rule demo_pretrain:
    input:
        benchmark=result_path("demo/benchmark"),
    output:
        **rehearsal_clock("demo_pretrain"),
        model=directory(result_path("demo/model")),
        spm=result_path("demo/spm.model"),
    params:
        **rehearsal_params("demo_pretrain", timed=True),
        seed=config["demo"]["seed"],
        max_steps=demo_pretrain_steps(),
        model={key: config["demo"][key] for key in ("d_model", "layers", "ffn_dim")},
        max_tokens=config["demo"]["pretrain_tokens"],
        lr=config["demo"]["pretrain_lr"],
        warmup=config["demo"]["pretrain_warmup"],
        temperature=config["demo"]["pretrain_temperature"],
        code=CODE["demo_pretrain"],
    log:
        log_path("demo_pretrain.log"),
    benchmark:
        result_path("benchmarks/demo_pretrain.tsv")
    threads: 4
    resources:
        gpu=1,
        runtime=60,
        mem_mb=8000,
    script:
        stage_script("demo_pretrain")


rule input_identity:
    output:
        **rehearsal_clock("input_identity/{kind}-{identity}"),
        stamp=result_path("inputs/{kind}-{identity}.json"),
    params:
        **rehearsal_params("input_identity"),
        path=lambda wildcards: {"flores": get_flores_root, "model": get_model, "spm": get_spm}[wildcards.kind](),
        identity=lambda wildcards: STAMPS[wildcards.kind],
        code=CODE["input_identity"],
    wildcard_constraints:
        kind="flores|model|spm",
        identity="[0-9a-f]{16}",
    log:
        log_path("input_identity/{kind}-{identity}.log"),
    localrule: True
    script:
        stage_script("input_identity")


rule data:
    input:
        flores=FLORES_FILES or get_flores_root(),  # flores mode: the files read; demo: rule demo_benchmark's
        flores_stamp=FLORES_STAMP,
        table=table_input(),
    output:
        **rehearsal_clock("data"),
        train=result_path("data/train.tsv"),
        devtest=result_path("data/devtest.tsv"),  # every devtest sentence; test.tsv and the dev subsets are cut from it
    params:
        **rehearsal_params("data"),
        flores_root=path_of(get_flores_root),
        flores=FLORES_IDENTITY,  # the files' content (an edit that keeps the mtime reruns too)
        layout=config["data"]["layout"],
        table=path_of(get_language_table),
        languages=table_rows("data"),
        code=CODE["data"],
    log:
        log_path("data.log"),
    localrule: True
    script:
        stage_script("data")


# The test table and each training stage's dev subset are rules of their own, each reading only the sentences it
# keeps: eval.max_sentences reruns decoding and scoring only, and a stage's dev_sentences only that stage.


rule test_set:
    input:
        devtest=result_path("data/devtest.tsv"),
    output:
        **rehearsal_clock("test_set"),
        rows=result_path("data/test.tsv"),
    params:
        **rehearsal_params("first_sentences"),
        n=EVAL["max_sentences"],  # the first N devtest sentences (null: all)
        key="eval.max_sentences",
        code=CODE["first_sentences"],
    log:
        log_path("test_set.log"),
    localrule: True
    script:
        stage_script("first_sentences")


rule dev_set:
    input:
        devtest=result_path("data/devtest.tsv"),
    output:
        **rehearsal_clock("dev_set/{n}"),
        rows=result_path("data/dev/{n}.tsv"),
    params:
        **rehearsal_params("first_sentences"),
        n=lambda wildcards: None if wildcards.n == "all" else int(wildcards.n),  # all: dev_sentences null
        key="dev_sentences (train options)",
        code=CODE["first_sentences"],
    wildcard_constraints:
        n=r"[1-9]\d*|all",
    log:
        log_path("dev_set/{n}.log"),
    localrule: True
    script:
        stage_script("first_sentences")
