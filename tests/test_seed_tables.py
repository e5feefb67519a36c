"""Table 1 and the summary with several seeds per variant (lslo.tables, lslo.summary): cells are seed means with
their spread, intervals and p-values are lslo.bootstrap's seed-aware ones, one run per row is today's table."""

import random

import numpy as np
import pandas as pd
import pytest

from lslo import bootstrap, metrics
from lslo.cost import variant_cost
from lslo.errors import LsloError
from lslo.tables import make_table

WORDS = "a b c d e f g h i j k l m n o p".split()
PAIRS = ["H2H", "H2H", "V2H"]
METHODS = {"Pretrain": "pretrain", "Ft-all": "full", "8;8;8+WL": "lslo", "2;2;8+WL": "lslo"}
NOISE = {"Pretrain": [0.7], "Ft-all": [0.45, 0.35, 0.4], "8;8;8+WL": [0.1, 0.2], "2;2;8+WL": [0.3, 0.25, 0.35]}


def corpus(n, seed, p, refs=None):
    """Reference lines (refs=None) or hypotheses that replace each reference word with probability p."""
    rng = random.Random(seed)
    if refs is None:
        return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]
    return [" ".join(w if rng.random() > p else rng.choice(WORDS) for w in ref.split()) for ref in refs]


def run_stats(refs, pairs, p, seed) -> bootstrap.SentenceStats:
    stats = np.stack([metrics.sentence_stats(corpus(0, seed + k, p, r), r) for k, r in enumerate(refs.values())])
    return bootstrap.SentenceStats(stats, [d[0] for d in refs], [d[1] for d in refs], pairs,
                                   [str(i) for i in range(stats.shape[1])])


def write_run(stats: bootstrap.SentenceStats, stem) -> tuple:
    """(groups.tsv, sentence_stats.npz) of one run, the groups as evaluate.score_variant computes them."""
    scores = stats.direction_scores()
    pairs = np.asarray(stats.pair)
    cells = {p: scores[pairs == p].mean() for p in dict.fromkeys(stats.pair)}
    groups = pd.DataFrame({"pair": [*cells, "AVG"], "spbleu": [*cells.values(), scores.mean()], "chrf": 0.0,
                           "n_directions": [int((pairs == p).sum()) for p in cells] + [len(pairs)]})
    groups.to_csv(f"{stem}.groups.tsv", sep="\t", index=False)
    bootstrap.write_sentence_stats(stats, f"{stem}.npz")
    return f"{stem}.groups.tsv", f"{stem}.npz"


@pytest.fixture(scope="module")
def refs():
    return {("h1", "h2"): corpus(40, 1, 0), ("h2", "h1"): corpus(40, 2, 0), ("v1", "h1"): corpus(40, 3, 0)}


@pytest.fixture(scope="module")
def seeded(refs, tmp_path_factory):
    """{label: [groups.tsv per run]}, {label: [npz per run]}, {label: [SentenceStats per run]}."""
    root = tmp_path_factory.mktemp("seeds")
    groups, npzs, runs = {}, {}, {}
    for n, (label, noises) in enumerate(NOISE.items()):
        runs[label] = [run_stats(refs, PAIRS, p, seed=100 * n + 10 * k) for k, p in enumerate(noises)]
        written = [write_run(stats, root / f"{n}-{k}") for k, stats in enumerate(runs[label])]
        groups[label], npzs[label] = [g for g, _ in written], [s for _, s in written]
    return groups, npzs, runs


def seeded_table(seeded, out, **kwargs):
    groups, npzs, _ = seeded
    return make_table(groups, {label: None for label in groups}, out / "t.tsv", out / "t.md", "Table 1", "spm",
                      stats_npzs=npzs, methods=METHODS, out_intervals=out / "t.intervals.tsv", **kwargs)


def test_cells_are_seed_means_with_their_spread(seeded, tmp_path):
    groups, _, _ = seeded
    table = seeded_table(seeded, tmp_path).set_index("method")
    written = pd.read_csv(tmp_path / "t.tsv", sep="\t").set_index("method")
    intervals = pd.read_csv(tmp_path / "t.intervals.tsv", sep="\t").set_index(["method", "pair"])
    md = (tmp_path / "t.md").read_text()
    assert list(written.columns) == ["params", "seeds", "H2H", "V2H", "AVG"]
    assert list(intervals.columns) == ["spbleu", "ci_low", "ci_high", "p_pretrain", "p_ft_all", "seeds", "sd",
                                       "min", "max"]
    for label, paths in groups.items():
        per_run = pd.concat([pd.read_csv(p, sep="\t").set_index("pair")["spbleu"] for p in paths], axis=1)
        assert written.loc[label, "seeds"] == len(paths)
        for pair in ("H2H", "V2H", "AVG"):
            values = per_run.loc[pair].to_numpy()
            assert table.loc[label, pair] == pytest.approx(values.mean(), abs=1e-12)
            assert written.loc[label, pair] == pytest.approx(values.mean(), abs=0.005)
            row = intervals.loc[(label, pair)]
            assert (row.seeds, row["min"], row["max"]) == (len(values), pytest.approx(values.min(), rel=1e-5),
                                                           pytest.approx(values.max(), rel=1e-5))
            if len(values) > 1:
                assert row.sd == pytest.approx(np.std(values, ddof=1), rel=1e-5)
            else:
                assert np.isnan(row.sd)
            spread = ("" if len(values) == 1 else f" ({values.min():.2f}–{values.max():.2f})" if len(values) == 2
                      else f" ±{np.std(values, ddof=1):.2f}")
            assert f"| {values.mean():.2f}{spread} [{row.ci_low:.2f}, {row.ci_high:.2f}]" in md
    assert "± is the sample sd" in md and "(min–max) the lowest and highest of the 2 seeds" in md
    assert "Koehn 2004" in md and "Clark et al. 2011" in md and "Optimizer Instability" in md and "Welch" in md


def test_intervals_and_p_values_are_the_seed_aware_ones(seeded, tmp_path):
    _, _, runs = seeded
    seeded_table(seeded, tmp_path)
    intervals = pd.read_csv(tmp_path / "t.intervals.tsv", sep="\t").set_index(["method", "pair"])
    counts = bootstrap.resample_counts(40)  # the shared resamples: sacrebleu's draws, its default seed
    cells = {label: bootstrap.seed_cells(r, counts) for label, r in runs.items()}
    md = (tmp_path / "t.md").read_text()
    marks_seen = set()
    for label in runs:
        for pair in ("H2H", "V2H", "AVG"):
            row, cell = intervals.loc[(label, pair)], cells[label][pair]
            low, high = bootstrap.seed_interval(cell)
            assert (row.ci_low, row.ci_high) == (pytest.approx(low, rel=1e-5), pytest.approx(high, rel=1e-5))
            for name, base in (("pretrain", "Pretrain"), ("ft_all", "Ft-all")):
                if base == label:
                    assert np.isnan(row[f"p_{name}"])
                    continue
                p = bootstrap.seed_aware_test(cell, cells[base][pair])[2]
                assert row[f"p_{name}"] == pytest.approx(p, rel=1e-5, abs=1e-300)
            marks = ("*" if row.p_pretrain < 0.05 else "") + ("†" if row.p_ft_all < 0.05 else "")
            marks_seen.add(marks)
            assert f"[{row.ci_low:.2f}, {row.ci_high:.2f}]{marks} |" in md
    assert "" in marks_seen and len(marks_seen) > 1  # marked and unmarked cells: the marks were really tested
    # Pretrain, one run (not fine-tuned): no seed part; its interval is compare_systems' percentile interval
    single = bootstrap.compare_systems({"Pretrain": runs["Pretrain"][0]}, {}).set_index(["method", "pair"])
    assert intervals.loc[("Pretrain", "AVG"), "ci_low"] == pytest.approx(single.loc[("Pretrain", "AVG"), "ci_low"],
                                                                         rel=1e-5)


def test_one_element_lists_are_todays_single_run_table(seeded, tmp_path):
    groups, npzs, _ = seeded
    one = {label: paths[0] for label, paths in groups.items()}
    one_npz = {label: paths[0] for label, paths in npzs.items()}
    params = {"Pretrain": None, "Ft-all": 1_234_567, "8;8;8+WL": 2048, "2;2;8+WL": 512}
    for name, (g, s) in {"path": (one, one_npz), "list": ({k: [v] for k, v in one.items()},
                                                        {k: [v] for k, v in one_npz.items()})}.items():
        (tmp_path / name).mkdir()
        make_table(g, params, tmp_path / name / "t.tsv", tmp_path / name / "t.md", "Table 1", "spm",
                   stats_npzs=s, methods=METHODS, out_intervals=tmp_path / name / "t.intervals.tsv")
    for file in ("t.tsv", "t.md", "t.intervals.tsv"):
        assert (tmp_path / "path" / file).read_bytes() == (tmp_path / "list" / file).read_bytes(), file
    assert "seeds" not in (tmp_path / "list" / "t.tsv").read_text()
    assert "paired bootstrap test" in (tmp_path / "list" / "t.md").read_text()


def benchmark(path, seconds, rss="2048.00"):
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                    f"{seconds:.4f}\t1:00:00\t{rss}\t1.00\t1.00\t1.00\t1.00\t1.00\t100.00\t10.00\n")
    return path


def test_cost_columns(seeded, tmp_path):
    groups, _, _ = seeded
    pd.DataFrame({"epoch": [1, 2], "gpus": [2, 2], "peak_gpu_mib": [3000.0, 3500.0]}).to_csv(
        tmp_path / "m.tsv", sep="\t", index=False)
    seeds = [{"benchmarks": [benchmark(tmp_path / f"wl{k}.tsv", 600.0 + k), benchmark(tmp_path / f"ft{k}.tsv",
                                                                                       5400.0 * k)],
              "metrics": [tmp_path / "m.tsv", tmp_path / "m.tsv"]} for k in (1, 2, 3)]
    cost = {"Ft-all": variant_cost(seeds),
            "8;8;8+WL": variant_cost([{"benchmarks": [tmp_path / "gone.tsv"], "metrics": [tmp_path / "gone.m.tsv"]}])}
    table = make_table(groups, {}, tmp_path / "t.tsv", tmp_path / "t.md", "Table 1", "spm", cost=cost)
    written = pd.read_csv(tmp_path / "t.tsv", sep="\t").set_index("method")
    hours = np.mean([(600.0 + k + 5400.0 * k) / 3600 for k in (1, 2, 3)])
    assert list(written.columns) == ["params", "train_hours", "gpu_hours", "peak_rss_mb", "peak_gpu_mb", "seeds",
                                     "H2H", "V2H", "AVG"]
    assert table.set_index("method").loc["Ft-all", "train_hours"] == pytest.approx(hours, rel=1e-12)
    assert written.loc["Ft-all", "train_hours"] == pytest.approx(hours, abs=1e-4)
    assert written.loc["Ft-all", "gpu_hours"] == pytest.approx(2 * hours, abs=1e-4)
    assert (written.loc["Ft-all", "peak_rss_mb"], written.loc["Ft-all", "peak_gpu_mb"]) == (2048.0, 3500.0)
    assert written.loc[["8;8;8+WL", "Pretrain"], "train_hours"].isna().all()  # missing file; no cost given
    md = (tmp_path / "t.md").read_text()
    assert "| Methods | #Params | Train h | GPU·h | Peak RSS | Peak GPU | Seeds | H2H | V2H | AVG |" in md
    assert f"| Ft-all | - | {hours:.2f} | {2 * hours:.2f} | 2,048 MiB | 3,500 MiB | 3 |" in md
    assert "| 8;8;8+WL | - | – | – | – | – | 2 |" in md
    # without cost: today's columns
    make_table(groups, {}, tmp_path / "u.tsv", tmp_path / "u.md", "Table 1", "spm")
    assert "train_hours" not in (tmp_path / "u.tsv").read_text() and "Train h" not in (tmp_path / "u.md").read_text()
    with pytest.raises(LsloError, match=r"cost given for \['Ft-al'\]"):
        make_table(groups, {}, tmp_path / "v.tsv", tmp_path / "v.md", "Table 1", "spm", cost={"Ft-al": {}})


def test_runs_that_do_not_match_stop_the_table(seeded, tmp_path):
    groups, npzs, _ = seeded
    with pytest.raises(LsloError, match=r"Ft-all: 3 groups table\(s\) but 2 sentence statistics file\(s\)"):
        make_table(groups, {}, tmp_path / "t.tsv", tmp_path / "t.md", "Table 1", "spm",
                   stats_npzs={**npzs, "Ft-all": npzs["Ft-all"][:2]}, methods=METHODS,
                   out_intervals=tmp_path / "t.intervals.tsv")
    lacking = tmp_path / "lacking.groups.tsv"
    pd.read_csv(groups["Ft-all"][1], sep="\t").query("pair != 'V2H'").to_csv(lacking, sep="\t", index=False)
    with pytest.raises(LsloError, match="Ft-all: V2H is missing from"):
        make_table({**groups, "Ft-all": [groups["Ft-all"][0], lacking]}, {}, tmp_path / "t.tsv", tmp_path / "t.md",
                   "Table 1", "spm")
    assert not any((tmp_path / f"t.{s}").exists() for s in ("tsv", "md", "intervals.tsv"))


ROLE_NOISE = {"pretrain": [0.8], "ft_all": [0.5, 0.45], "full_rank": [0.1, 0.15], "low_rank": [0.3, 0.25],
              "pruned": [0.3, 0.35]}


@pytest.fixture(scope="module")
def summary_inputs(refs, tmp_path_factory):
    """{role: [npz per seed]}, {role: label}, {role: [SentenceStats]}, and the weights / Table 9 files."""
    from lslo.io import write_json

    root = tmp_path_factory.mktemp("summary")
    refs_v2v = {**refs, ("v1", "v2"): corpus(40, 4, 0)}
    stats, labels, runs = {}, {}, {}
    for n, (role, noises) in enumerate(ROLE_NOISE.items()):
        labels[role] = role.replace("_", "-")
        runs[role] = [run_stats(refs_v2v, [*PAIRS, "V2V"], p, seed=1000 + 100 * n + 10 * k)
                      for k, p in enumerate(noises)]
        stats[role] = [write_run(r, root / f"{role}{k}")[1] for k, r in enumerate(runs[role])]
    pd.DataFrame({"side": ["enc", "dec"], "layer": [1, 1], "w_src": [0.9, 0.4], "w_tgt": [0.1, 0.6]}).to_csv(
        root / "w.tsv", sep="\t", index=False)
    pd.DataFrame({"module": ["q", "AVG"], "r": [0.7, 0.7], "p_value": [0.01, 0.01], "n_languages": 11}).to_csv(
        root / "t9.tsv", sep="\t", index=False)
    write_json({"enc": ["src"], "dec": ["tgt"]}, root / "plan.json")
    return root, stats, labels, runs


def test_summary_with_two_seeds_uses_the_seed_aware_test(summary_inputs, tmp_path):
    from lslo import summary

    root, stats, labels, runs = summary_inputs
    cost = {"full-rank": {"train_hours": 1.5, "gpu_hours": 6.0, "peak_rss_mb": 4096.0, "peak_gpu_mb": None}}
    targets = summary.write_summary(stats, labels, root / "w.tsv", root / "t9.tsv", [], {}, tmp_path / "s.md",
                                    plan_json=root / "plan.json", cost=cost).set_index("target")
    counts = bootstrap.resample_counts(40)
    cells = {role: bootstrap.seed_cells(r, counts) for role, r in runs.items()}
    difference, _, p = bootstrap.seed_aware_test(cells["full_rank"]["V2V"], cells["pretrain"]["V2V"])
    gain = cells["full_rank"]["V2V"].mean - cells["pretrain"]["V2V"].mean
    assert difference == pytest.approx(gain, abs=1e-12)
    significance = "significant" if p < 0.05 else "not significant"
    shown = "p < 0.001" if round(p, 3) == 0 else f"p = {p:.3f}"
    assert targets.loc["full-rank V2V gain over Pretrain", "measured"] == (
        f"{gain:+.2f} ({shown}, {significance}; seed-aware, 2 vs 1 seeds)")
    paired = bootstrap.compare_systems({r: runs[r][0] for r in ("full_rank", "pretrain")}, {"p": "pretrain"})
    assert f"p = {paired.set_index(['method', 'pair']).loc[('full_rank', 'V2V'), 'p_p']:.3f}" != f"p = {p:.3f}"
    _, _, p_low = bootstrap.seed_aware_test(cells["pruned"]["AVG"], cells["low_rank"]["AVG"])
    assert f"p = {p_low:.3f}" in targets.loc["pruned vs low-rank, AVG", "measured"]
    assert targets.loc["pruned vs low-rank, AVG", "measured"].endswith("; seed-aware, 2 seeds)")
    text = (tmp_path / "s.md").read_text()
    assert "Several seeds per variant (pretrain: 1, ft-all: 2," in text
    assert "| Variant | Train h | GPU·h | Peak RSS | Peak GPU |\n|---|---|---|---|---|\n" \
           "| full-rank | 1.50 | 6.00 | 4,096 MiB | – |" in text


def test_summary_with_one_run_per_role_is_unchanged(summary_inputs, tmp_path):
    from lslo import summary

    root, stats, labels, _ = summary_inputs
    first = {role: paths[0] for role, paths in stats.items()}
    for name, given in (("path", first), ("list", {role: [path] for role, path in first.items()})):
        summary.write_summary(given, labels, root / "w.tsv", root / "t9.tsv", [], {}, tmp_path / f"{name}.md",
                              plan_json=root / "plan.json")
    assert (tmp_path / "path.md").read_bytes() == (tmp_path / "list.md").read_bytes()
    assert "seed-aware" not in (tmp_path / "list.md").read_text()


@pytest.mark.parametrize("p, shown", [(0.0, "p < 0.001, significant"), (3e-7, "p < 0.001, significant"),
                                      (0.0006, "p = 0.001, significant"), (0.0312, "p = 0.031, significant"),
                                      (0.05, "p = 0.050, not significant"), (0.52, "p = 0.520, not significant")])
def test_summary_never_prints_a_p_of_zero(p, shown):
    """The seed-aware t test's p can be 1e-7; three decimals of it would read "p = 0.000"."""
    from lslo.summary import _significance

    assert _significance(p) == shown
