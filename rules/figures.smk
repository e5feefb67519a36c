# Stage 7, figures: the paper's Figures 1-6 and Tables 1-4, 8, 9, 10 from the TSVs of the earlier stages,
# each wrapped in report() for `snakemake --report`. All local: plotting and aggregation take seconds.

SCORE_FIGURES = {"figure2": "ise", "figure4": "lsp", "figure5": "ise", "figure6": "lsp"}  # figure -> scores


rule figure1:
    input:
        weights="results/weight_learning/weights.tsv",
    output:
        png=report("results/figures/figure1.png", caption="../workflow/report/figure1.rst", category="Figures"),
    params:
        lslo_version=LSLO_VERSION,
    log:
        "logs/figure1.log",
    localrule: True
    script:
        "../workflow/scripts/figure1.py"


rule score_figure:
    input:
        scores=lambda wildcards: f"results/subspace/{SCORE_FIGURES[wildcards.figure]}/scores.tsv",
        table=get_language_table(),
    output:
        png=report(
            "results/figures/{figure}.png",
            caption="../workflow/report/{figure}.rst",
            category="Figures",
        ),
    params:
        lslo_version=LSLO_VERSION,
    wildcard_constraints:
        figure="|".join(SCORE_FIGURES),
    log:
        "logs/score_figure/{figure}.log",
    localrule: True
    script:
        "../workflow/scripts/score_figure.py"


rule figure3:
    input:
        metrics=metrics_of(config["figure3"]),
        table=get_language_table(),
    output:
        png=report("results/figures/figure3.png", caption="../workflow/report/figure3.rst", category="Figures"),
    params:
        labels=table_labels(config["figure3"]),
        lslo_version=LSLO_VERSION,
    log:
        "logs/figure3.log",
    localrule: True
    script:
        "../workflow/scripts/figure3.py"


rule table:
    input:
        groups=lambda wildcards: groups_of(config["tables"][wildcards.table]),
        metrics=lambda wildcards: metrics_of(config["tables"][wildcards.table]),
    output:
        tsv=report("results/tables/{table}.tsv", caption="../workflow/report/tables.rst", category="Tables"),
        md="results/tables/{table}.md",
    params:
        labels=lambda wildcards: table_labels(config["tables"][wildcards.table]),
        lslo_version=LSLO_VERSION,
    wildcard_constraints:
        table="table[12348]",
    log:
        "logs/table/{table}.log",
    localrule: True
    script:
        "../workflow/scripts/table.py"


rule score_table:
    input:
        scores="results/subspace/ise/scores.tsv",
        table=get_language_table(),
    output:
        tsv=report(
            "results/tables/{table}.tsv",
            caption="../workflow/report/score_tables.rst",
            category="Tables",
        ),
        md="results/tables/{table}.md",
    params:
        side=lambda wildcards: {"table9": "enc", "table10": "dec"}[wildcards.table],
        lslo_version=LSLO_VERSION,
    wildcard_constraints:
        table="table9|table10",
    log:
        "logs/score_table/{table}.log",
    localrule: True
    script:
        "../workflow/scripts/score_table.py"
