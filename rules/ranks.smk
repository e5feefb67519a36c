# Stage 4, ranks: per-language rank and GPS target of one LSLo variant (lslo.ranks: policy resource = the
# paper's {H;M;V} ranks with GPS on H and M; policy subspace = derived from the ISE scores).


rule ranks:
    input:
        table=table_input(),
        scores=get_rank_scores,
    output:
        **rehearsal_clock("ranks/{variant}"),
        plan=result_path("ranks/{variant}.json"),
    params:
        **rehearsal_params("ranks"),
        policy=variant_param("rank_policy"),
        table=path_of(get_language_table),
        languages=table_rows("ranks"),
        group_ranks=variant_param("ranks"),
        gps=variant_param("gps"),
        subspace_options=variant_param("subspace_policy"),
        epochs=lambda wildcards: variant_options(wildcards)["epochs"],
        code=CODE["ranks"],
    log:
        log_path("ranks/{variant}.log"),
    localrule: True
    script:
        stage_script("ranks")
