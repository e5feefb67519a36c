"""Stage 7, tables: Tables 1-4/8 (scores by group pair) and Tables 9/10 (bitext vs. subspace score correlation).

    make_table(groups_tsvs, params, out_tsv, out_md, title, spm_note)      rows = variants, as Table 1
    correlation_table(scores_tsv, language_table, side, out_tsv, out_md)    Table 9 (enc) / Table 10 (dec)

Each table is written twice: a TSV for machines (exact numbers) and a Markdown file for people (paper layout).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy.stats import pearsonr

from lslo.bootstrap import RESAMPLES, compare_systems, read_sentence_stats
from lslo.errors import LsloError
from lslo.evaluate import signature_path
from lslo.index_plans import plan_comparison, read_index_plan
from lslo.io import atomic_write, markdown_cell, read_tsv, write_tsv
from lslo.languages import read_language_table
from lslo.metrics import GROUP_COLUMNS, GROUP_ORDER, pair_order

MODULES = {"enc": ["q", "k", "v", "fc1", "fc2"], "dec": ["q", "k", "v", "c-q", "c-k", "c-v", "fc1", "fc2"]}


def _read_groups(path) -> pd.DataFrame:
    return read_tsv(path, GROUP_COLUMNS, "groups table").set_index("pair")


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(markdown_cell, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(map(markdown_cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def by_label(labels: list, values: list, what: str) -> dict:
    """{label: value} of the rows of a table or figure; two rows with one label would silently merge into one
    (a row lost, another's numbers under its name), so that is an error naming the label."""
    twice = sorted({label for label in labels if list(labels).count(label) > 1})
    if twice:
        raise LsloError(f"{what}: variant label(s) {twice} given to more than one row; labels must be unique")
    if len(labels) != len(values):
        raise LsloError(f"{what}: {len(labels)} labels for {len(values)} inputs")
    return dict(zip(labels, values))


def _write_text(text: str, path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


SIGNIFICANCE_MARKS = {"pretrain": "*", "ft_all": "†"}  # p < 0.05 against Pretrain / against Ft-all
INTERVAL_COLUMNS = ["method", "pair", "spbleu", "ci_low", "ci_high", "p_pretrain", "p_ft_all"]


def interval_table(stats_npzs: dict, methods: dict) -> pd.DataFrame:
    """95% bootstrap intervals of every cell and paired tests against the Pretrain and Ft-all rows (lslo.bootstrap).

    stats_npzs: {label: sentence_stats.npz}; methods: {label: pretrain | full | lslo}. The first label of method
    pretrain is the Pretrain baseline and the first of method full the Ft-all one; p_pretrain / p_ft_all are NaN
    without that row (and on the baseline's own row). Columns: INTERVAL_COLUMNS (docs/formats.md).
    """

    systems = {label: read_sentence_stats(path) for label, path in stats_npzs.items()}
    baselines = {}
    for name, method in (("pretrain", "pretrain"), ("ft_all", "full")):
        first = next((label for label in systems if methods.get(label) == method), None)
        if first is not None:
            baselines[name] = first
    intervals = compare_systems(systems, baselines)
    for name in SIGNIFICANCE_MARKS:
        if f"p_{name}" not in intervals:
            intervals[f"p_{name}"] = np.nan
    return intervals[INTERVAL_COLUMNS]


def _cell_text(value: float, interval: pd.Series | None) -> str:
    """'12.34 [11.02, 13.71]*†': the score, its 95% interval, and the significance marks."""
    if pd.isna(value):
        return ""
    if interval is None:
        return f"{value:.2f}"
    marks = "".join(mark for name, mark in SIGNIFICANCE_MARKS.items() if interval[f"p_{name}"] < 0.05)
    return f"{value:.2f} [{interval.ci_low:.2f}, {interval.ci_high:.2f}]{marks}"


def make_table(groups_tsvs: dict, params: dict, out_tsv, out_md, title: str, spm_note: str,
               metric: str = "spbleu", stats_npzs: dict | None = None, methods: dict | None = None,
               out_intervals=None, index_plan=None) -> pd.DataFrame:
    """One row per variant (dict order): Method, #Params (exact trainable count; None -> "-"), pairs, AVG.

    groups_tsvs: {label: groups.tsv of evaluate.score_variant}; params: {label: trainable parameters or None}.
    Pair columns are the union present, in the paper's order (H2H H2M ... V2V).
    With stats_npzs ({label: sentence_stats.npz}), methods ({label: method}) and out_intervals, spBLEU cells carry
    their 95% bootstrap interval and significance marks in the Markdown (interval_table).
    With index_plan (a weight-learning plan.json; Table 3, the index strategies) a note says whether the learned
    plan is the paper's, and where it differs (lslo.index_plans.plan_comparison).
    """
    if metric not in ("spbleu", "chrf"):
        raise LsloError(f"metric '{metric}', expected spbleu or chrf")
    frames = {label: _read_groups(path) for label, path in groups_tsvs.items()}
    # read before anything is written: a bad plan.json leaves no table behind
    plan_note = None if index_plan is None else f"WL: {plan_comparison(read_index_plan(index_plan))}"
    present = {g for f in frames.values() for p in f.index if p != "AVG" for g in p.split("2")}
    columns = [p for p in pair_order(present) if any(p in f.index for f in frames.values())] + ["AVG"]
    rows = []
    for label, groups in frames.items():
        n_params = params.get(label)
        rows.append({"method": label, "params": None if n_params is None else int(n_params),
                     **{p: groups[metric].get(p, np.nan) for p in columns}})
    table = pd.DataFrame(rows, columns=["method", "params", *columns])
    table["params"] = table["params"].astype("Int64")
    intervals = None
    if stats_npzs is not None:
        if out_intervals is None or metric != "spbleu":
            raise LsloError("make_table: intervals need out_intervals and metric spbleu")
        intervals = interval_table(stats_npzs, methods or {})
        _check_intervals(intervals.set_index(["method", "pair"]), table, columns)
        write_tsv(intervals, out_intervals, float_format="%.6g")
        intervals = intervals.set_index(["method", "pair"])
    write_tsv(table, out_tsv, float_format="%.2f")
    shown = table.copy()
    shown["params"] = [("-" if pd.isna(p) else f"{int(p):,}") for p in table["params"]]
    for column in columns:
        shown[column] = [_cell_text(v, intervals.loc[(label, column)] if intervals is not None
                                    and (label, column) in intervals.index else None)
                         for label, v in zip(table["method"], table[column])]
    shown.columns = ["Methods", "#Params", *columns]
    notes = [f"Scores: {'spBLEU' if metric == 'spbleu' else 'chrF++'}; {spm_note}",
             "AVG is the mean over all directions, not over the group cells; #Params counts trainable "
             "parameters exactly."]
    if intervals is not None:
        notes.append(_interval_note(intervals))
    if plan_note is not None:
        notes.append(plan_note)
    notes += _signature_notes(groups_tsvs)
    _write_text(f"**{title}**\n\n{_markdown(shown)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n", out_md)
    return table


def _check_intervals(intervals: pd.DataFrame, table: pd.DataFrame, columns: list[str]) -> None:
    """The bootstrap's observed cells must be the groups TSVs' cells (same hypotheses, same metric)."""
    for label, row in table.set_index("method").iterrows():
        for column in columns:
            value = row[column]
            if pd.isna(value) or (label, column) not in intervals.index:
                continue
            if abs(intervals.loc[(label, column), "spbleu"] - value) > 1e-3:
                raise LsloError(f"{label} {column}: sentence statistics give spBLEU "
                                f"{intervals.loc[(label, column), 'spbleu']:.4f}, the groups table {value:.4f}; "
                                "rescore the variant")


def _interval_note(intervals: pd.DataFrame) -> str:

    return (f"[low, high]: 95% bootstrap interval over {RESAMPLES} resamples of the test sentences (the same "
            "resample in every direction and system; a cell is the mean over its directions of corpus spBLEU). "
            "* differs from Pretrain, † from Ft-all (paired bootstrap test, p < 0.05). Intervals and p-values: "
            "the .intervals.tsv next to this table.")


def _signature_notes(groups_tsvs: dict) -> list[str]:
    found = {}
    for path in groups_tsvs.values():
        sidecar = signature_path(path)
        if sidecar.is_file():
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            found[info.get("spbleu")] = info.get("chrf")
    return [f"sacrebleu signature: spBLEU `{bleu}`; chrF++ `{chrf}`" for bleu, chrf in found.items()]


def module_scores(scores: pd.DataFrame, side: str) -> pd.DataFrame:
    """Mean eq. 6 score over layers, per language (rows) and module (columns) of one side."""
    sub = scores[scores["side"] == side]
    matrix = sub.pivot_table(index="language", columns="module", values="score", aggfunc="mean")
    return matrix[[m for m in MODULES[side] if m in matrix.columns]]


def correlation_table(scores_tsv, language_table, side: str, out_tsv, out_md, title: str | None = None
                      ) -> pd.DataFrame:
    """Tables 9/10: Pearson r (scipy.stats.pearsonr) between bitext with English and each module's score.

    Languages without a bitext count (English, the pivot) are left out, as in the paper's Table 5 ("-").
    AVG = mean of the module rows (r and p), the paper's AVG row (e.g. Table 9: mean r 0.64, mean p 0.033).
    """
    if side not in MODULES:
        raise LsloError(f"side '{side}', expected enc or dec")
    scores = pd.read_csv(scores_tsv, sep="\t")
    for column in ("language", "side", "module", "score"):
        if column not in scores.columns:
            raise LsloError(f"{scores_tsv}: subspace score table lacks column '{column}'")
    table = _language_table(language_table)
    matrix = module_scores(scores, side)
    unknown = sorted(set(matrix.index) - set(table.index))
    if unknown:
        raise LsloError(f"{scores_tsv}: language(s) {unknown} are not in the language table")
    bitext = pd.to_numeric(table.loc[matrix.index, "bitext"], errors="coerce").astype(float)
    excluded = sorted(bitext.index[bitext.isna()])
    kept = bitext.dropna()
    if len(kept) < 3:
        raise LsloError(f"{scores_tsv}: only {len(kept)} languages with a bitext count; Pearson r needs >= 3")
    x = kept.to_numpy()
    rows, undefined = [], []
    for module in matrix.columns:
        y = matrix.loc[kept.index, module].to_numpy(dtype=float)
        if np.all(x == x[0]) or np.all(y == y[0]):  # zero variance: r = cov / (σx σy) is 0/0
            undefined.append(module)
            r, p_value = np.nan, np.nan
        else:
            result = pearsonr(x, y)
            r, p_value = float(result.statistic), float(result.pvalue)
        rows.append({"module": module, "r": r, "p_value": p_value, "n_languages": len(kept)})
    result = pd.DataFrame(rows)
    avg = {"module": "AVG", "r": result["r"].mean(), "p_value": result["p_value"].mean(), "n_languages": len(kept)}
    result = pd.concat([result, pd.DataFrame([avg])], ignore_index=True)
    write_tsv(result, out_tsv, float_format="%.6f")  # an undefined r or p is an empty field
    shown = pd.DataFrame({"Module": result["module"], "Correlation Coefficients": result["r"].map(_number(2)),
                          "P-value": result["p_value"].map(_number(3))})
    side_name = {"enc": "Encoder", "dec": "Decoder"}[side]
    title = title or f"The correlation coefficients in {side_name}."
    notes = [f"Pearson r between bitext with English and the eq. 6 score averaged over {side_name.lower()} "
             f"layers, over {len(kept)} languages.",
             f"Left out (no bitext with English): {', '.join(excluded) if excluded else 'none'}.",
             *_undefined_notes(undefined, list(matrix.columns), constant_bitext=bool(np.all(x == x[0])))]
    _write_text(f"**{title}**\n\n{_markdown(shown)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n", out_md)
    return result


def _number(decimals: int):
    return lambda value: "undefined" if pd.isna(value) else f"{value:.{decimals}f}"


def _undefined_notes(undefined: list, modules: list, constant_bitext: bool) -> list[str]:
    """Why a row reads "undefined": Pearson r needs both variables to vary across the languages."""
    if not undefined:
        return ["AVG is the mean of the module rows."]
    if constant_bitext:
        why = ("Pearson r is undefined for every module: the bitext counts are the same for every language "
               "(zero variance).")
    else:
        why = (f"Pearson r is undefined for {', '.join(undefined)}: the score is the same for every language "
               "(zero variance; ISE pruned that module alike in all languages), so there is nothing to correlate.")
    defined = len(modules) - len(undefined)
    avg = (f"AVG is the mean of the {defined} module rows with a defined r." if defined
           else "AVG is undefined too.")
    return [why, avg]


def _language_table(language_table) -> pd.DataFrame:
    if isinstance(language_table, pd.DataFrame):
        return language_table

    return read_language_table(language_table)


__all__ = ["make_table", "interval_table", "correlation_table", "module_scores", "GROUP_ORDER"]
