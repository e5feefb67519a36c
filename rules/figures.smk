# Stage 7, figures: the paper's Figures 1-6 and Tables 1-4, 8, 9, 10 from the TSVs of the earlier stages,
# each wrapped in report() for `snakemake --report`. All local: plotting and aggregation take seconds.

from lslo.variant import SUMMARY_ROLES

# figure -> (scores it plots, lslo.figures function)
SCORE_FIGURES = {
    "figure2": ("ise", "figure2_subspace"),
    "figure4": ("lsp", "figure4_lsp"),
    "figure5": ("ise", "figure5_subspace_layers"),
    "figure6": ("lsp", "figure6_lsp_languages"),
}
LANGUAGES_NAME = (
    config["data"]["languages"]
    if isinstance(config["data"]["languages"], str)
    else " ".join(config["data"]["languages"])
)
TABLE_TITLES = {
    "table1": f"Table 1: spBLEU by resource-group pair ({LANGUAGES_NAME})",
    "table2": f"Table 2: spBLEU by resource-group pair ({LANGUAGES_NAME})",
    "table3": f"Table 3: index strategies WL, SRC, TGT ({LANGUAGES_NAME})",
    "table4": f"Table 4: LSLo on all modules, attention only, fc only ({LANGUAGES_NAME})",
    "table8": f"Table 8: GPS start epoch E and duration k ({LANGUAGES_NAME})",
    "table9": f"Table 9: correlation of bitext size and ISE score, encoder ({LANGUAGES_NAME})",
    "table10": f"Table 10: correlation of bitext size and ISE score, decoder ({LANGUAGES_NAME})",
}
SPM_NOTE = (
    "SentencePiece of spBLEU: the demo's own model (results/demo/spm.model), not FLORES'"
    if DEMO
    else f"SentencePiece of spBLEU: {config['eval']['spm']}"
)


rule figure1:
    input:
        weights=result_path("weight_learning/weights.tsv"),
    output:
        **rehearsal_clock("figure1"),
        png=report(result_path("figures/figure1.png"), caption="../workflow/report/figure1.rst", category="Figures"),
    params:
        **rehearsal_params("figure1"),
        code=CODE["figure1"],
    log:
        log_path("figure1.log"),
    localrule: True
    script:
        stage_script("figure1")


rule score_figure:
    input:
        scores=lambda wildcards: result_path(f"subspace/{SCORE_FIGURES[wildcards.figure][0]}/scores.tsv"),
    output:
        **rehearsal_clock("score_figure/{figure}"),
        png=report(
            result_path("figures/{figure}.png"),
            caption="../workflow/report/score_figure.rst",
            category="Figures",
        ),
    params:
        **rehearsal_params("score_figure"),
        function=lambda wildcards: SCORE_FIGURES[wildcards.figure][1],
        code=CODE["score_figure"],
    wildcard_constraints:
        figure="|".join(SCORE_FIGURES),
    log:
        log_path("score_figure/{figure}.log"),
    localrule: True
    script:
        stage_script("score_figure")


rule figure3:
    input:
        metrics=metrics_of(rows_runs(config["figure3"])),  # every run (seed) of each variant
    output:
        **rehearsal_clock("figure3"),
        png=report(result_path("figures/figure3.png"), caption="../workflow/report/figure3.rst", category="Figures"),
    params:
        **rehearsal_params("figure3"),
        labels=table_labels(config["figure3"]),
        run_counts=run_counts(config["figure3"]),
        baselines=[not METHODS[VARIANTS[v]["method"]].trains for v in config["figure3"]],  # a dashed line
        code=CODE["figure3"],
    log:
        log_path("figure3.log"),
    localrule: True
    script:
        stage_script("figure3")


rule table:
    input:
        groups=lambda wildcards: groups_of(rows_runs(config["tables"][wildcards.table])),
        metrics=lambda wildcards: metrics_of(rows_runs(config["tables"][wildcards.table])),
        stats=lambda wildcards: stats_of(rows_runs(config["tables"][wildcards.table])),
        plan=lambda wildcards: learned_plan_of(wildcards.table),
    output:
        **rehearsal_clock("table/{table}"),
        tsv=report(result_path("tables/{table}.tsv"), caption="../workflow/report/tables.rst", category="Tables"),
        md=result_path("tables/{table}.md"),
        intervals=result_path("tables/{table}.intervals.tsv"),
    params:
        **rehearsal_params("table"),
        labels=lambda wildcards: table_labels(config["tables"][wildcards.table]),
        run_counts=lambda wildcards: run_counts(config["tables"][wildcards.table]),
        cost_runs=lambda wildcards: [variant_cost_runs(v) for v in config["tables"][wildcards.table]],
        trained=lambda wildcards: [METHODS[VARIANTS[v]["method"]].trains for v in config["tables"][wildcards.table]],
        methods=lambda wildcards: [VARIANTS[v]["method"] for v in config["tables"][wildcards.table]],
        title=lambda wildcards: TABLE_TITLES[wildcards.table],
        spm_note=SPM_NOTE,
        code=CODE["table"],
    wildcard_constraints:
        table="table[12348]",
    log:
        log_path("table/{table}.log"),
    localrule: True
    script:
        stage_script("table")


rule score_table:
    input:
        scores=result_path("subspace/ise/scores.tsv"),
        table=table_input(),
    output:
        **rehearsal_clock("score_table/{table}"),
        tsv=report(
            result_path("tables/{table}.tsv"),
            caption="../workflow/report/score_tables.rst",
            category="Tables",
        ),
        md=result_path("tables/{table}.md"),
    params:
        **rehearsal_params("score_table"),
        side=lambda wildcards: {"table9": "enc", "table10": "dec"}[wildcards.table],
        title=lambda wildcards: TABLE_TITLES[wildcards.table],
        table=path_of(get_language_table),
        languages=table_rows("score_table"),
        code=CODE["score_table"],
    wildcard_constraints:
        table="table9|table10",
    log:
        log_path("score_table/{table}.log"),
    localrule: True
    script:
        stage_script("score_table")


rule summary:
    input:
        stats=lambda wildcards: stats_of(rows_runs([config["summary"][role] for role in SUMMARY_ROLES])),
        weights=result_path("weight_learning/weights.tsv"),
        plan=result_path("weight_learning/plan.json"),
        table9=result_path("tables/table9.tsv"),
        table_mds=[result_path("tables/table1.md"), result_path("tables/table9.md")],
        figures=expand(result_path("figures/figure{i}.png"), i=[1, 2, 3]),
    output:
        **rehearsal_clock("summary"),
        md=report(result_path("summary.md"), caption="../workflow/report/summary.rst", category="Summary"),
    params:
        **rehearsal_params("summary"),
        labels={role: VARIANTS[v]["label"] for role, v in (config.get("summary") or {}).items()},
        run_counts=run_counts([(config.get("summary") or {}).get(role) for role in SUMMARY_ROLES]),
        cost_runs={role: variant_cost_runs(v) for role, v in (config.get("summary") or {}).items()},
        code=CODE["summary"],
    log:
        log_path("summary.log"),
    localrule: True
    script:
        stage_script("summary")
