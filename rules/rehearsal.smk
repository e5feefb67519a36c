# The rehearsal's report (config rehearse; lslo.rehearsal): the clock of every job, and the full run's updates and
# sentences of the same config -> results/rehearsal/report.md, what each job took and what the full run will take.


rule rehearsal_report:
    input:
        clocks=list(rehearsal_plans()),
        train=result_path("data/train.tsv"),
        devtest=result_path("data/devtest.tsv"),
        model=get_model(),  # its tokenizer: the full run's batches are counted in its tokens
        model_stamp=MODEL_STAMP,
        table=table_input(),
    output:
        md=result_path("report.md"),
    params:
        plans=rehearsal_plans(),
        table=path_of(get_language_table),
        languages=table_rows("train"),
        rehearsal=vars(REHEARSAL),
        code=CODE["rehearsal_report"],
    log:
        log_path("rehearsal_report.log"),
    localrule: True
    script:
        "../workflow/scripts/rehearsal_report.py"
