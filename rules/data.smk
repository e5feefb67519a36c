# Stage 1, data (paper §5): FLORES dev -> train table, devtest -> test table. Demo mode first builds its own
# world: the synthetic benchmark (FLORES-101 layout) and a tiny M2M100 pretrained on its bitext.


rule demo_benchmark:
    output:
        benchmark=directory("results/demo/benchmark"),
        table="results/demo/languages.tsv",
    params:
        n_languages=config["demo"]["n_languages"],
        seed=config["demo"]["seed"],
        code=CODE["demo_benchmark"],
    log:
        "logs/demo_benchmark.log",
    localrule: True
    script:
        "../workflow/scripts/demo_benchmark.py"


rule demo_pretrain:
    input:
        benchmark="results/demo/benchmark",
    output:
        model=directory("results/demo/model"),
        spm="results/demo/spm.model",
    params:
        seed=config["demo"]["seed"],
        max_steps=config["demo"]["pretrain_steps"],
        model={key: config["demo"][key] for key in ("d_model", "layers", "ffn_dim")},
        max_tokens=config["demo"]["pretrain_tokens"],
        lr=config["demo"]["pretrain_lr"],
        warmup=config["demo"]["pretrain_warmup"],
        temperature=config["demo"]["pretrain_temperature"],
        code=CODE["demo_pretrain"],
    log:
        "logs/demo_pretrain.log",
    benchmark:
        "results/benchmarks/demo_pretrain.tsv"
    threads: 4
    resources:
        gpu=1,
        runtime=60,
        mem_mb=8000,
    script:
        "../workflow/scripts/demo_pretrain.py"


rule input_identity:
    output:
        stamp="results/inputs/{kind}-{identity}.json",
    params:
        path=lambda wildcards: {"flores": get_flores_root, "model": get_model, "spm": get_spm}[wildcards.kind](),
        identity=lambda wildcards: STAMPS[wildcards.kind],
        code=CODE["input_identity"],
    wildcard_constraints:
        kind="flores|model|spm",
        identity="[0-9a-f]{16}",
    log:
        "logs/input_identity/{kind}-{identity}.log",
    localrule: True
    script:
        "../workflow/scripts/input_identity.py"


rule data:
    input:
        flores=FLORES_FILES or get_flores_root(),  # flores mode: the files read; demo: rule demo_benchmark's
        flores_stamp=FLORES_STAMP,
        table=table_input(),
    output:
        train="results/data/train.tsv",
        devtest="results/data/devtest.tsv",  # every devtest sentence; test.tsv and the dev subsets are cut from it
    params:
        flores_root=path_of(get_flores_root),
        flores=FLORES_IDENTITY,  # the files' content (an edit that keeps the mtime reruns too)
        layout=config["data"]["layout"],
        table=path_of(get_language_table),
        languages=table_rows("data"),
        code=CODE["data"],
    log:
        "logs/data.log",
    localrule: True
    script:
        "../workflow/scripts/data.py"


# The test table and each training stage's dev subset are rules of their own, each reading only the sentences it
# keeps: eval.max_sentences reruns decoding and scoring only, and a stage's dev_sentences only that stage.


rule test_set:
    input:
        devtest="results/data/devtest.tsv",
    output:
        rows="results/data/test.tsv",
    params:
        n=config["eval"]["max_sentences"],  # the first N devtest sentences (null: all)
        key="eval.max_sentences",
        code=CODE["first_sentences"],
    log:
        "logs/test_set.log",
    localrule: True
    script:
        "../workflow/scripts/first_sentences.py"


rule dev_set:
    input:
        devtest="results/data/devtest.tsv",
    output:
        rows="results/data/dev/{n}.tsv",
    params:
        n=lambda wildcards: None if wildcards.n == "all" else int(wildcards.n),  # all: dev_sentences null
        key="dev_sentences (train options)",
        code=CODE["first_sentences"],
    wildcard_constraints:
        n=r"[1-9]\d*|all",
    log:
        "logs/dev_set/{n}.log",
    localrule: True
    script:
        "../workflow/scripts/first_sentences.py"
