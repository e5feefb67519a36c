"""Stage 7, tables: Tables 1-4/8 (scores by group pair) and Tables 9/10 (bitext vs. subspace score correlation).

    make_table(groups_tsvs, params, out_tsv, out_md, title, spm_note)      rows = variants, as Table 1
    interval_table(stats_npzs, methods)                                     its intervals and tests
    seed_compare_systems(systems, baselines)                                the same over several seeds
    runs_per_row(paths, counts)                                             a rule's run inputs, back in rows
    correlation_table(scores_tsv, language_table, side, out_tsv, out_md)    Table 9 (enc) / Table 10 (dec)

Each table is written twice: a TSV for machines (exact numbers) and a Markdown file for people (paper layout).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy.stats import pearsonr

from lslo.bootstrap import (RESAMPLES, SEED, check_systems, compare_systems, read_sentence_stats, resample_counts,
                            seed_aware_test, seed_cells, seed_interval)
from lslo.cost import COST_FIELDS
from lslo.errors import LsloError
from lslo.index_plans import plan_comparison, read_index_plan
from lslo.io import atomic_write, markdown_cell, read_tsv, write_tsv
from lslo.languages import read_language_table
from lslo.metrics import GROUP_COLUMNS, GROUP_ORDER, pair_order, signature_path

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


def runs_per_row(paths, counts) -> list:
    """A rule's inputs listed every run of each row in turn (rules/common.smk run_counts), split back into rows: a
    row of one run is its path, a row of several (seeds) the list of its runs' paths."""
    paths, counts = list(paths), list(counts)
    if len(paths) != sum(counts):
        raise LsloError(f"{len(paths)} input(s) for rows of {counts} runs ({sum(counts)} in all)")
    rows = []
    for count in counts:
        rows.append(paths[0] if count == 1 else paths[:count])
        paths = paths[count:]
    return rows


def _write_text(text: str, path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


SIGNIFICANCE_MARKS = {"pretrain": "*", "ft_all": "†"}  # p < 0.05 against Pretrain / against Ft-all
INTERVAL_COLUMNS = ["method", "pair", "spbleu", "ci_low", "ci_high", "p_pretrain", "p_ft_all"]
SEED_COLUMNS = ["seeds", "sd", "min", "max"]  # .intervals.tsv of a table with several runs in a row
COST_HEADERS = {"train_hours": "Train h", "gpu_hours": "GPU·h", "peak_rss_mb": "Peak RSS", "peak_gpu_mb": "Peak GPU"}


def runs_of(value, label, what: str = "table") -> list:
    """A row's runs: one path (one run) or a list of paths (one run per seed, the same variant and test set)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise LsloError(f"{what}: no runs given for '{label}'")
        return list(value)
    return [value]


def seed_compare_systems(systems: dict, baselines: dict, n_resamples: int = RESAMPLES, seed: int = SEED
                         ) -> pd.DataFrame:
    """compare_systems over several runs per system (lslo.bootstrap's comment above SeedCell).

    systems: {label: [SentenceStats, one per seed]}, every run on the same directions and sentences; baselines:
    {column name: label}. One row per (system, cell): method, pair, spbleu (the mean over runs), ci_low, ci_high
    (seed_interval), p_<name> per baseline (seed_aware_test; NaN on the baseline's own row), seeds (runs), sd, min,
    max (of the per-run cells; sd NaN for one run). Every run is resampled with the same sentence draws.
    """
    if not systems:
        raise LsloError("bootstrap: no systems to compare")
    labels = list(systems)
    first = check_systems(systems, baselines)
    counts = resample_counts(first.stats.shape[1], n_resamples, seed)
    cells = {label: seed_cells(systems[label], counts) for label in labels}
    rows = []
    for label in labels:
        for pair, cell in cells[label].items():
            low, high = seed_interval(cell)
            row = {"method": label, "pair": pair, "spbleu": cell.mean, "ci_low": low, "ci_high": high}
            for name, base in baselines.items():
                row[f"p_{name}"] = np.nan if base == label else seed_aware_test(cell, cells[base][pair])[2]
            sd, least, most = cell.spread()
            rows.append({**row, "seeds": len(cell.scores), "sd": sd, "min": least, "max": most})
    return pd.DataFrame(rows)


def interval_table(stats_npzs: dict, methods: dict) -> pd.DataFrame:
    """95% bootstrap intervals of every cell and paired tests against the Pretrain and Ft-all rows (lslo.bootstrap).

    stats_npzs: {label: sentence_stats.npz, or a list of them, one per seed run}; methods: {label: pretrain | full
    | lslo}. The first label of method pretrain is the Pretrain baseline and the first of method full the Ft-all
    one; p_pretrain / p_ft_all are NaN without that row (and on the baseline's own row). Columns: INTERVAL_COLUMNS
    (docs/formats.md). With more than one run in any row, the intervals and tests are the seed-aware ones
    (seed_compare_systems) and SEED_COLUMNS follow.
    """
    runs = {label: [read_sentence_stats(path) for path in runs_of(paths, label, "intervals")]
            for label, paths in stats_npzs.items()}
    seeded = any(len(r) > 1 for r in runs.values())
    baselines = {}
    for name, method in (("pretrain", "pretrain"), ("ft_all", "full")):
        first = next((label for label in runs if methods.get(label) == method), None)
        if first is not None:
            baselines[name] = first
    if seeded:
        intervals = seed_compare_systems(runs, baselines)
    else:
        intervals = compare_systems({label: r[0] for label, r in runs.items()}, baselines)
    for name in SIGNIFICANCE_MARKS:
        if f"p_{name}" not in intervals:
            intervals[f"p_{name}"] = np.nan
    return intervals[INTERVAL_COLUMNS + (SEED_COLUMNS if seeded else [])]


def _spread_text(values: list[float]) -> str:
    """The spread across seeds: ' ±sd' (sample sd) for 3+ runs, ' (min–max)' for 2, nothing for 1."""
    if len(values) >= 3:
        return f" ±{np.std(values, ddof=1):.2f}"
    if len(values) == 2:
        return f" ({min(values):.2f}–{max(values):.2f})"
    return ""


def _cell_text(value: float, interval: pd.Series | None, per_run: list[float] | None = None) -> str:
    """'12.34 [11.02, 13.71]*†': the score, its 95% interval, and the significance marks; with per_run (a table
    with several seeds), the mean with the spread across seeds: '12.34 ±0.41 [11.02, 13.71]*†'."""
    if pd.isna(value):
        return ""
    spread = "" if per_run is None else _spread_text(per_run)
    if interval is None:
        return f"{value:.2f}{spread}"
    marks = "".join(mark for name, mark in SIGNIFICANCE_MARKS.items() if interval[f"p_{name}"] < 0.05)
    return f"{value:.2f}{spread} [{interval.ci_low:.2f}, {interval.ci_high:.2f}]{marks}"


def make_table(groups_tsvs: dict, params: dict, out_tsv, out_md, title: str, spm_note: str,
               metric: str = "spbleu", stats_npzs: dict | None = None, methods: dict | None = None,
               out_intervals=None, index_plan=None, cost: dict | None = None) -> pd.DataFrame:
    """One row per variant (dict order): Method, #Params (exact trainable count; None -> "-"), pairs, AVG.

    groups_tsvs: {label: groups.tsv of evaluate.score_variant, or a list of them, one per seed run of the
    variant}; params: {label: trainable parameters or None}. Pair columns are the union present, in the paper's
    order (H2H H2M ... V2V). With more than one run in any row, a cell is the mean over the row's runs, the TSV
    gains `seeds` and the Markdown shows the spread across seeds; a one-element list is the single run.
    With stats_npzs ({label: sentence_stats.npz, or a list in the order of groups_tsvs'}), methods ({label:
    method}) and out_intervals, spBLEU cells carry their 95% interval and significance marks in the Markdown
    (interval_table: the paired bootstrap, or the seed-aware test with several runs).
    With index_plan (a weight-learning plan.json; Table 3, the index strategies) a note says whether the learned
    plan is the paper's, and where it differs (lslo.index_plans.plan_comparison).
    With cost ({label: lslo.cost.variant_cost}), the columns train_hours, gpu_hours, peak_rss_mb, peak_gpu_mb
    follow params ("–" in the Markdown where not measured).
    """
    if metric not in ("spbleu", "chrf"):
        raise LsloError(f"metric '{metric}', expected spbleu or chrf")
    runs = {label: [_read_groups(path) for path in runs_of(paths, label)] for label, paths in groups_tsvs.items()}
    seeded = any(len(r) > 1 for r in runs.values())
    _check_cost(cost, runs)
    # read before anything is written: a bad plan.json leaves no table behind
    plan_note = None if index_plan is None else f"WL: {plan_comparison(read_index_plan(index_plan))}"
    present = {g for r in runs.values() for f in r for p in f.index if p != "AVG" for g in p.split("2")}
    columns = [p for p in pair_order(present) if any(p in f.index for r in runs.values() for f in r)] + ["AVG"]
    per_run = {label: {p: _run_values(r, p, metric, label, groups_tsvs[label]) for p in columns}
               for label, r in runs.items()}
    extra = ([*COST_FIELDS] if cost is not None else []) + (["seeds"] if seeded else [])
    rows = []
    for label, groups in runs.items():
        n_params = params.get(label)
        row = {"method": label, "params": None if n_params is None else int(n_params)}
        if cost is not None:
            row.update({field: _cost_number(cost.get(label, {}).get(field), field) for field in COST_FIELDS})
        if seeded:
            row["seeds"] = len(groups)
        rows.append({**row, **{p: (np.mean(v) if v else np.nan) for p, v in per_run[label].items()}})
    table = pd.DataFrame(rows, columns=["method", "params", *extra, *columns])
    table["params"] = table["params"].astype("Int64")
    intervals = None
    if stats_npzs is not None:
        if out_intervals is None or metric != "spbleu":
            raise LsloError("make_table: intervals need out_intervals and metric spbleu")
        _check_run_counts(stats_npzs, runs)
        intervals = interval_table(stats_npzs, methods or {})
        _check_intervals(intervals.set_index(["method", "pair"]), table, columns)
        write_tsv(intervals, out_intervals, float_format="%.6g")
        intervals = intervals.set_index(["method", "pair"])
    written = table.copy()
    for field in (COST_FIELDS if cost is not None else []):  # hours of a CPU demo would read 0.00 at %.2f
        written[field] = [_cost_tsv(v, field) for v in table[field]]
    write_tsv(written, out_tsv, float_format="%.2f")
    shown = table[["method", "params", *extra, *columns]].copy()
    shown["params"] = [("-" if pd.isna(p) else f"{int(p):,}") for p in table["params"]]
    for field in (COST_FIELDS if cost is not None else []):
        shown[field] = [cost_cell(v, field) for v in table[field]]
    for column in columns:
        shown[column] = [_cell_text(v, intervals.loc[(label, column)] if intervals is not None
                                    and (label, column) in intervals.index else None,
                                    per_run[label][column] if seeded else None)
                         for label, v in zip(table["method"], table[column])]
    shown.columns = ["Methods", "#Params", *[COST_HEADERS.get(c, "Seeds") for c in extra], *columns]
    notes = [f"Scores: {'spBLEU' if metric == 'spbleu' else 'chrF++'}; {spm_note}",
             "AVG is the mean over all directions, not over the group cells; #Params counts trainable "
             "parameters exactly."]
    if seeded:
        notes.append(_seed_note([len(r) for r in runs.values()], intervals is not None))
    elif intervals is not None:
        notes.append(_interval_note(intervals))
    if cost is not None:
        notes.append(cost_note())
    if plan_note is not None:
        notes.append(plan_note)
    notes += _signature_notes([path for paths in groups_tsvs.values() for path in runs_of(paths, "")])
    _write_text(f"**{title}**\n\n{_markdown(shown)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n", out_md)
    return table


def _run_values(groups: list[pd.DataFrame], pair: str, metric: str, label: str, paths) -> list[float]:
    """The pair's score in each run of a row; a pair that some runs of one variant have and others lack means
    they were not scored on one test set."""
    values = [groups_of_run[metric].get(pair, np.nan) for groups_of_run in groups]
    missing = [i for i, v in enumerate(values) if pd.isna(v)]
    if missing and len(missing) < len(values):
        files = [str(runs_of(paths, label)[i]) for i in missing]
        raise LsloError(f"{label}: {pair} is missing from {files} but present in the other runs of the row; "
                        "every run of a variant must be scored on the same test set")
    return [] if missing else [float(v) for v in values]


def _check_run_counts(stats_npzs: dict, runs: dict) -> None:
    for label, groups in runs.items():
        given = len(runs_of(stats_npzs.get(label, []), label)) if label in stats_npzs else 0
        if given and given != len(groups):
            raise LsloError(f"{label}: {len(groups)} groups table(s) but {given} sentence statistics file(s); "
                            "give one of each per run")


def _check_cost(cost: dict | None, runs: dict) -> None:
    if cost is None:
        return
    unknown = [label for label in cost if label not in runs]
    if unknown:
        raise LsloError(f"make_table: cost given for {unknown}, which are not rows of the table {list(runs)}")
    for label, fields in cost.items():
        extra = sorted(set(fields) - set(COST_FIELDS))
        if extra:
            raise LsloError(f"make_table: cost of '{label}' has field(s) {extra}; expected {COST_FIELDS}")


def _cost_number(value, field: str) -> float:
    if value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LsloError(f"make_table: cost field {field} is {value!r}, not a number") from None


def _cost_tsv(value: float, field: str) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.4f}" if field.endswith("hours") else f"{value:.1f}"


def cost_cell(value, field: str) -> str:
    """A cost field (lslo.cost) as a Markdown cell: hours, or MiB; "–" where not measured."""
    if value is None or pd.isna(value):
        return "–"
    if field.endswith("hours"):
        return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"
    return f"{value:,.0f} MiB"


def cost_note() -> str:
    return ("Train h: wall-clock hours of the variant's training jobs (Snakemake benchmark `s`, summed over its "
            "jobs; the mean over seeds); GPU·h: each job's hours × its processes on GPUs; Peak RSS: the largest "
            "max_rss of those jobs; Peak GPU: the largest torch.cuda.max_memory_allocated of an epoch; – where "
            "not measured (lslo.cost).")


def _seed_note(run_counts: list[int], with_intervals: bool) -> str:
    spreads = []
    if max(run_counts) >= 3:
        spreads.append("± is the sample sd of the per-seed scores (rows with 3 or more runs)")
    if 2 in run_counts:
        spreads.append("(min–max) the lowest and highest of the 2 seeds' scores (rows with 2 runs)")
    text = ("Several seeds: a cell is the mean over the row's runs (one fine-tuning run per seed, `seeds` in "
            f"the TSV); {'; '.join(spreads)}.")
    if not with_intervals:
        return text
    return text + (
        f" [low, high]: 95% interval of the seed mean; * differs from Pretrain, † from Ft-all (p < 0.05), by a "
        "seed-aware test (lslo.bootstrap.seed_aware_test): the variance of a difference of seed means has a sentence "
        f"part, from {RESAMPLES} bootstrap resamples of the test sentences shared by every run and system (paired "
        "bootstrap over sentences, Koehn 2004), and a seed part, the variance of the per-seed scores / k (Clark et "
        "al. 2011, \"Better Hypothesis Testing for Statistical Machine Translation: Controlling for Optimizer "
        "Instability\"); the difference / its standard error is referred to Welch's t (Welch–Satterthwaite degrees "
        "of freedom of the seed part). A row with one run (Pretrain) has no seed part: its interval is the "
        "percentile bootstrap interval. Intervals, sd, min, max and p-values: the .intervals.tsv next to this "
        "table.")


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


def _signature_notes(paths: list) -> list[str]:
    found = {}
    for path in paths:
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


__all__ = ["make_table", "interval_table", "seed_compare_systems", "correlation_table", "module_scores", "GROUP_ORDER"]
