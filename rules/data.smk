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
        max_minutes=config["demo"]["pretrain_minutes"],
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


rule data:
    input:
        flores=get_flores_root(),
        table=get_language_table(),
    output:
        train="results/data/train.tsv",
        test="results/data/test.tsv",
    params:
        layout=config["data"]["layout"],
        languages=config["data"]["languages"],
        test_sentences=config["eval"]["max_sentences"],
        code=CODE["data"],
    log:
        "logs/data.log",
    localrule: True
    script:
        "../workflow/scripts/data.py"
