"""What a finished run reproduces of the paper: its findings as measured targets with pass/miss, in Markdown.

    demo_targets(stats, labels, weights_tsv, table9_tsv)  -> DataFrame: target, measured, needed, result
    write_summary(..., out_md)                             the summary file (results/summary.md, `make report`)
    update_readme(summary_md, readme, assets_dir)           README's demo section and its figures, from a run

Roles name the Table 1 rows the findings are about (config `summary`): pretrain (zero-shot), ft_all (full
fine-tuning), full_rank (8;8;8+WL), low_rank (2;2;8+WL), pruned (2;2;8+WL+GPS(0.9)). The thresholds are the demo's
targets; the paper's own numbers (Table 1, Table 9) are quoted next to them.

A role may have several runs (one per seed, config `seeds`): its scores are then the means over seeds, and the
comparisons use the seed-aware test (lslo.bootstrap.seed_aware_test, via lslo.tables.seed_compare_systems) instead
of the paired bootstrap of one run per system; the measured text says so.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from lslo.bootstrap import compare_systems, read_sentence_stats
from lslo.cost import COST_FIELDS
from lslo.errors import LsloError
from lslo.index_plans import describe_plan, paper_reference, plan_comparison, read_index_plan
from lslo.io import atomic_write, markdown_cell, read_tsv
from lslo.tables import COST_HEADERS, cost_cell, cost_note, runs_of, seed_compare_systems
from lslo.variant import SUMMARY_ROLES

ROLES = SUMMARY_ROLES
PRETRAIN_H2H_MIN = 25.0  # a competent pretrained model on high-resource directions
V2V_RATIO_MAX = 1 / 3  # ... and a weak one on very-low-resource directions (paper Table 1: H2H 31.76, V2V 0.52)
V2V_GAIN_MIN = 5.0  # 8;8;8+WL over Pretrain on V2V (paper Table 1: +6.5)
WEIGHT_GAP_MIN = 0.2  # weight learning picks an index: |w_src - w_tgt| in at least one layer per side (Figure 1)
ISE_R_MIN = 0.5  # Table 9 encoder AVG r (paper: 0.64)
ALPHA = 0.05
README_START, README_END = "<!-- demo-summary:start -->", "<!-- demo-summary:end -->"


def _result(passed: bool) -> str:
    return "pass" if passed else "miss"


def _significance(p: float) -> str:
    # The seed-aware t test's p can be far below the 3 decimals shown; "p = 0.000" would read as impossible.
    shown = "p < 0.001" if p < 0.0005 else f"p = {p:.3f}"
    return f"{shown}, {'significant' if p < ALPHA else 'not significant'}"


def demo_targets(stats: dict, labels: dict, weights_tsv, table9_tsv, plan_json=None) -> pd.DataFrame:
    """The targets, measured. stats: {role: sentence_stats.npz, or a list of them, one per seed run}; labels:
    {role: Table 1 label}; plan_json: the weight-learning plan, reported against the paper's (lslo.index_plans)."""

    missing = [role for role in ROLES if role not in stats or role not in labels]
    if missing:
        raise LsloError(f"summary: no variant for role(s) {missing} (config summary: {', '.join(ROLES)})")
    runs = {role: [read_sentence_stats(path) for path in runs_of(stats[role], role, "summary")] for role in ROLES}
    baselines = {role: labels[role] for role in ("pretrain", "ft_all", "low_rank")}
    seeded = any(len(r) > 1 for r in runs.values())
    if seeded:
        frame = seed_compare_systems({labels[role]: runs[role] for role in ROLES}, baselines)
    else:
        frame = compare_systems({labels[role]: runs[role][0] for role in ROLES}, baselines)
    cell = frame.set_index(["method", "pair"])
    for pair in ("H2H", "V2V", "AVG"):
        if (labels["pretrain"], pair) not in cell.index:
            raise LsloError(f"summary: no {pair} directions in {runs_of(stats['pretrain'], 'pretrain')[0]}; "
                            "the targets need H and V languages")

    def at(role, pair, column="spbleu"):
        return float(cell.loc[(labels[role], pair), column])

    def test(role, versus, p):
        """The comparison's p, and with several seeds which test gave it."""
        if not seeded:
            return _significance(p)
        k, k_versus = len(runs[role]), len(runs[versus])
        seeds = f"{k} seeds" if k == k_versus else f"{k} vs {k_versus} seeds"
        return f"{_significance(p)}; seed-aware, {seeds}"

    rows = []
    h2h, v2v = at("pretrain", "H2H"), at("pretrain", "V2V")
    rows.append(("Pretrain H2H spBLEU", f"{h2h:.2f} [{at('pretrain', 'H2H', 'ci_low'):.2f}, "
                 f"{at('pretrain', 'H2H', 'ci_high'):.2f}]", f">= {PRETRAIN_H2H_MIN:g}",
                 _result(h2h >= PRETRAIN_H2H_MIN)))
    rows.append(("Pretrain V2V / H2H", f"{v2v:.2f} / {h2h:.2f} = {v2v / h2h if h2h else np.nan:.2f}",
                 "<= 1/3", _result(v2v <= V2V_RATIO_MAX * h2h)))
    gain, p_gain = at("full_rank", "V2V") - v2v, at("full_rank", "V2V", "p_pretrain")
    rows.append((f"{labels['full_rank']} V2V gain over Pretrain",
                 f"{gain:+.2f} ({test('full_rank', 'pretrain', p_gain)})",
                 f">= +{V2V_GAIN_MIN:g}, significant", _result(gain >= V2V_GAIN_MIN and p_gain < ALPHA)))
    weights = read_tsv(weights_tsv, ["side", "layer", "w_src", "w_tgt"], "weight-learning table", allow_empty=False)
    for side, name in (("enc", "encoder"), ("dec", "decoder")):
        sub = weights[weights["side"] == side]
        if sub.empty:
            raise LsloError(f"{weights_tsv}: no {side} layers")
        gaps = (sub["w_src"] - sub["w_tgt"]).abs()
        layer = int(sub.loc[gaps.idxmax(), "layer"])
        rows.append((f"Weight learning, {name}: max |w_src - w_tgt|", f"{gaps.max():.3f} (layer {layer})",
                     f">= {WEIGHT_GAP_MIN:g}", _result(gaps.max() >= WEIGHT_GAP_MIN)))
    if plan_json is not None:
        plan = read_index_plan(plan_json)
        reference, scaled = paper_reference(plan)
        needed = (f"report (the paper's rule at this depth: {describe_plan(reference)})" if scaled
                  else f"report (paper §6.1: {describe_plan(reference)})")
        rows.append(("Weight learning: learned index plan vs the paper's", plan_comparison(plan), needed, "report"))
    table9 = read_tsv(table9_tsv, ["module", "r", "p_value"], "Table 9", allow_empty=False).set_index("module")
    if "AVG" not in table9.index:
        raise LsloError(f"{table9_tsv}: no AVG row")
    r, p = float(table9.loc["AVG", "r"]), float(table9.loc["AVG", "p_value"])
    rows.append(("ISE: Pearson r, bitext vs eq. 6 score, encoder AVG (Table 9)", f"{r:.2f} (mean p {p:.3f})",
                 f">= {ISE_R_MIN:g} (paper 0.64)", _result(r >= ISE_R_MIN)))
    for versus in ("low_rank", "ft_all"):
        diff = at("pruned", "AVG") - at(versus, "AVG")
        p_diff = at("pruned", "AVG", f"p_{versus}")
        rows.append((f"{labels['pruned']} vs {labels[versus]}, AVG", f"{diff:+.2f} ({test('pruned', versus, p_diff)})",
                     "report (paper: -0.06)" if versus == "low_rank" else "> 0 (paper: +0.69)",
                     "report" if versus == "low_rank" else _result(diff > 0)))
    return pd.DataFrame(rows, columns=["target", "measured", "needed", "result"])


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ("| " + " | ".join(map(markdown_cell, row)) + " |" for row in frame.itertuples(index=False))
    return "\n".join([header, rule, *rows])


def _demote_title(markdown: str) -> str:
    """A table file's bold title line becomes a level-4 heading inside the summary."""
    return re.sub(r"^\*\*(.+)\*\*$", r"#### \1", markdown.strip(), count=1, flags=re.M)


def write_summary(stats: dict, labels: dict, weights_tsv, table9_tsv, table_mds: list, figures: dict,
                  out_md, plan_json=None, cost: dict | None = None) -> pd.DataFrame:
    """results/summary.md: the targets with measured values, then the given tables and figures (paths relative
    to the summary file's directory). stats: as demo_targets'; cost: {Table 1 label: lslo.cost.variant_cost},
    shown as a small table after the targets."""
    targets = demo_targets(stats, labels, weights_tsv, table9_tsv, plan_json)
    out_md = Path(out_md)
    passed = (targets["result"] == "pass").sum()
    judged = targets["result"].isin(["pass", "miss"]).sum()
    seeds = {role: len(runs_of(stats[role], role, "summary")) for role in ROLES}
    if max(seeds.values()) > 1:
        how = ("Several seeds per variant (" + ", ".join(f"{labels[role]}: {k}" for role, k in seeds.items())
               + "): scores are means over seeds. Intervals: 95%, of the seed mean; p: seed-aware test over seeds "
               "and test sentences (lslo.bootstrap.seed_aware_test).")
    else:
        how = "Intervals: 95% bootstrap over test sentences; p: paired bootstrap test (lslo.bootstrap)."
    parts = ["### The paper's findings in this run", "", f"{passed} of {judged} targets met. {how}", "",
             _markdown_table(targets), ""]
    if cost is not None:
        parts += ["#### Training cost", "", _markdown_table(_cost_table(cost)), "", f"- {cost_note()}", ""]
    for md in table_mds:
        parts += [_demote_title(Path(md).read_text(encoding="utf-8")), ""]
    for caption, path in figures.items():
        relative = Path(path).resolve().relative_to(out_md.resolve().parent) if Path(path).is_absolute() else path
        parts += [f"![{caption}]({Path(relative).as_posix()})", ""]
    with atomic_write(out_md) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return targets


def _cost_table(cost: dict) -> pd.DataFrame:
    rows = [[label, *(cost_cell((fields or {}).get(field), field) for field in COST_FIELDS)]
            for label, fields in cost.items()]
    return pd.DataFrame(rows, columns=["Variant", *(COST_HEADERS[field] for field in COST_FIELDS)])


def update_readme(summary_md, readme, assets_dir) -> list[Path]:
    """Replace README's block between the demo-summary markers with a run's summary; copy the figures the
    summary shows into assets_dir (committed with the README) and point its image links there."""
    summary_md, readme, assets_dir = Path(summary_md), Path(readme), Path(assets_dir)
    if not summary_md.is_file():
        raise LsloError(f"{summary_md}: no summary; run the workflow first (make demo)")
    text = readme.read_text(encoding="utf-8")
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise LsloError(f"{readme}: expected one '{README_START}' and one '{README_END}' marker")
    body = summary_md.read_text(encoding="utf-8")
    copied = []
    for link in dict.fromkeys(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body)):
        figure = summary_md.parent / link
        if not figure.is_file():
            raise LsloError(f"{summary_md}: figure {link} not found at {figure}")
        assets_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, assets_dir / figure.name)
        copied.append(assets_dir / figure.name)
        relative = (assets_dir / figure.name).resolve().relative_to(readme.resolve().parent).as_posix()
        body = body.replace(f"]({link})", f"]({relative})")
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    with atomic_write(readme) as tmp:
        tmp.write_text(f"{head}{README_START}\n{body.strip()}\n{README_END}{tail}", encoding="utf-8")
    return copied
