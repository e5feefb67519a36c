"""Figures 1-6 and Tables 1-4/8/9/10 from small synthetic stage TSVs."""

import numpy as np
import pandas as pd
import pytest

from lslo import figures, tables
from lslo.errors import LsloError

LANGS = {"en": "H", "fr": "H", "zh": "M", "nl": "M", "oc": "V", "wo": "V"}
BITEXT = {"en": None, "fr": 289_000_000, "zh": 37_900_000, "nl": 82_400_000, "oc": 5_110, "wo": 86_900}
N_LAYERS = 3


def language_table():
    return pd.DataFrame({"code": list(LANGS), "resource": list(LANGS.values()),
                         "bitext": pd.array(list(BITEXT.values()), dtype="Int64")}).set_index("code", drop=False)


def write_scores(path, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for language, group in LANGS.items():
        for side, modules in figures.MODULES.items():
            for layer in range(1, N_LAYERS + 1):
                for module in modules:
                    n_params = 8 * 16
                    n_pruned = int(rng.integers(0, n_params))
                    rows.append((language, group, side, layer, module, n_params, n_pruned, n_pruned - 0.7 * n_params))
    pd.DataFrame(rows, columns=figures.SCORE_COLUMNS).to_csv(path, sep="\t", index=False)
    return pd.read_csv(path, sep="\t")


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure1(tmp_path):
    rows = [(side, layer, w, 1 - w) for side in ("enc", "dec") for layer, w in zip(range(1, 4), (0.7, 0.5, 0.3))]
    pd.DataFrame(rows, columns=["side", "layer", "w_src", "w_tgt"]).to_csv(tmp_path / "w.tsv", sep="\t", index=False)
    figures.figure1_weights(tmp_path / "w.tsv", tmp_path / "fig1.png")
    assert_png(tmp_path / "fig1.png")


def test_subspace_figures(tmp_path):
    write_scores(tmp_path / "scores.tsv")
    for name, draw in (("fig2", figures.figure2_subspace), ("fig5", figures.figure5_subspace_layers),
                       ("fig4", figures.figure4_lsp), ("fig6", figures.figure6_lsp_languages)):
        draw(tmp_path / "scores.tsv", tmp_path / f"{name}.png")
        assert_png(tmp_path / f"{name}.png")


def test_heatmap_values_are_demand_averaged_over_layers(tmp_path):
    scores = write_scores(tmp_path / "scores.tsv")
    read = figures.read_scores(tmp_path / "scores.tsv")
    order = figures.language_order(read)
    assert order == ["en", "fr", "zh", "nl", "oc", "wo"]
    matrix = figures.demand_matrix(read, "dec", "language", order)
    assert list(matrix.columns) == figures.MODULES["dec"]
    expected = -scores[(scores.language == "oc") & (scores.side == "dec") & (scores.module == "c-k")].score.mean()
    assert matrix.loc["oc", "c-k"] == pytest.approx(expected)


def test_figure3(tmp_path):
    for label, slope in (("8;8;8+WL", 0.2), ("2;2;8+WL+GPS(0.9)", 0.5)):
        rows = [(epoch, epoch * 10 + step, 3.0, 0.0, 100, 100,
                 30 + slope * epoch if step == 1 else None, 1 + slope * epoch if step == 1 else None)
                for epoch in range(1, 6) for step in (0, 1)]
        pd.DataFrame(rows, columns=["epoch", "step", "loss", "pruning_ratio", "trainable_params", "effective_params",
                                    "dev_H2H", "dev_V2V"]).to_csv(tmp_path / f"{slope}.tsv", sep="\t", index=False)
    curve = figures.dev_curve(tmp_path / "0.5.tsv", "dev_V2V")
    assert list(curve.index) == [1, 2, 3, 4, 5] and curve.iloc[-1] == pytest.approx(3.5)
    figures.figure3_dev_curves({"8;8;8+WL": tmp_path / "0.2.tsv", "2;2;8+WL+GPS(0.9)": tmp_path / "0.5.tsv"},
                               tmp_path / "fig3.png", baselines={"Pretrain": tmp_path / "0.2.tsv"})
    assert_png(tmp_path / "fig3.png")
    assert figures.dev_interval(tmp_path / "0.5.tsv", "dev_V2V", curve.index) == (None, None)  # no bounds logged
    metrics = pd.read_csv(tmp_path / "0.5.tsv", sep="\t")
    metrics["dev_V2V_low"], metrics["dev_V2V_high"] = metrics["dev_V2V"] - 1, metrics["dev_V2V"] + 2
    metrics.to_csv(tmp_path / "ci.tsv", sep="\t", index=False)
    low, high = figures.dev_interval(tmp_path / "ci.tsv", "dev_V2V", curve.index)
    assert list(curve - low) == pytest.approx([1] * 5) and list(high - curve) == pytest.approx([2] * 5)
    figures.figure3_dev_curves({"x": tmp_path / "ci.tsv"}, tmp_path / "fig3ci.png")
    assert_png(tmp_path / "fig3ci.png")


def test_figure3_with_several_seeds_draws_the_mean_and_the_range(tmp_path):
    runs = []
    for seed, offset in enumerate((0.0, 1.5, -0.7)):
        rows = [(epoch, epoch * 10, 3.0, 30 + 0.2 * epoch + offset * epoch, 1 + 0.5 * epoch - offset)
                for epoch in range(1, 5)]
        path = tmp_path / f"seed{seed}.tsv"
        pd.DataFrame(rows, columns=["epoch", "step", "loss", "dev_H2H", "dev_V2V"]).to_csv(path, sep="\t",
                                                                                            index=False)
        runs.append(path)
    per_run = np.array([[30 + 0.2 * e + o * e for e in range(1, 5)] for o in (0.0, 1.5, -0.7)])
    curve = figures.seed_curve(runs, "dev_H2H")
    assert list(curve.index) == [1, 2, 3, 4]
    np.testing.assert_allclose(curve["mean"], per_run.mean(axis=0))
    np.testing.assert_allclose(curve["min"], per_run.min(axis=0))
    np.testing.assert_allclose(curve["max"], per_run.max(axis=0))
    figures.figure3_dev_curves({"8;8;8+WL": runs, "one run": [runs[0]], "path": runs[1]}, tmp_path / "fig3.png",
                               baselines={"Pretrain": [runs[2]]})
    assert_png(tmp_path / "fig3.png")
    pd.read_csv(runs[2], sep="\t").iloc[:3].to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    with pytest.raises(LsloError, match=r"short\.tsv: dev dev_H2H logged at epochs \[1, 2, 3\]"):
        figures.figure3_dev_curves({"x": [runs[0], tmp_path / "short.tsv"]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_correlation_table_matches_numpy(tmp_path):
    scores = write_scores(tmp_path / "scores.tsv", seed=3)
    result = tables.correlation_table(tmp_path / "scores.tsv", language_table(), "enc", tmp_path / "t9.tsv",
                                      tmp_path / "t9.md").set_index("module")
    kept = [l for l, b in BITEXT.items() if b is not None]
    x = np.array([BITEXT[l] for l in kept], dtype=float)
    for module in figures.MODULES["enc"]:
        sub = scores[(scores.side == "enc") & (scores.module == module)].groupby("language").score.mean()
        assert result.loc[module, "r"] == pytest.approx(np.corrcoef(x, sub[kept].to_numpy())[0, 1])
    assert result.loc["AVG", "r"] == pytest.approx(result.drop("AVG")["r"].mean())
    assert (result["n_languages"] == 5).all()
    md = (tmp_path / "t9.md").read_text()
    assert "Left out (no bitext with English): en" in md and "| AVG |" in md
    written = pd.read_csv(tmp_path / "t9.tsv", sep="\t")
    assert list(written.columns) == ["module", "r", "p_value", "n_languages"]
    dec = tables.correlation_table(tmp_path / "scores.tsv", language_table(), "dec", tmp_path / "t10.tsv",
                                   tmp_path / "t10.md")
    assert list(dec["module"]) == [*figures.MODULES["dec"], "AVG"]


def test_make_table(tmp_path):
    cells = {"Pretrain": {"H2H": 31.76, "H2V": 5.56, "V2H": 9.24, "V2V": 0.52, "AVG": 12.26},
             "2;2;8+WL+GPS(0.9)": {"H2H": 33.13, "H2V": 12.93, "V2H": 16.59, "V2V": 7.04, "AVG": 16.73}}
    paths = {}
    for label, row in cells.items():
        path = tmp_path / f"{len(paths)}.tsv"
        pd.DataFrame({"pair": list(row), "spbleu": list(row.values()), "chrf": 1.0, "n_directions": 4}).to_csv(
            path, sep="\t", index=False)
        paths[label] = path
    table = figures.make_table(paths, {"Pretrain": None, "2;2;8+WL+GPS(0.9)": 15_335_424}, tmp_path / "t1.tsv",
                               tmp_path / "t1.md", "Table 1", "spm: demo.model (the demo's own SentencePiece)")
    assert list(table.columns) == ["method", "params", "H2H", "H2V", "V2H", "V2V", "AVG"]
    written = pd.read_csv(tmp_path / "t1.tsv", sep="\t")
    assert written.loc[1, "params"] == 15_335_424 and written.loc[1, "AVG"] == pytest.approx(16.73)
    md = (tmp_path / "t1.md").read_text()
    assert "| Pretrain | - | 31.76 | 5.56 | 9.24 | 0.52 | 12.26 |" in md
    assert "15,335,424" in md and "demo.model" in md


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(LsloError, match="nope.tsv"):
        figures.figure2_subspace(tmp_path / "nope.tsv", tmp_path / "x.png")
    pd.DataFrame({"side": ["enc"], "layer": [1]}).to_csv(tmp_path / "w.tsv", sep="\t", index=False)
    with pytest.raises(LsloError, match="w_src"):
        figures.figure1_weights(tmp_path / "w.tsv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_table_markdown_escapes_a_pipe_in_a_label(tmp_path):
    """A '|' in a variant label stays inside its cell: every row has the header's number of cells."""
    import re

    paths = {}
    for label in ("Pretrain", "LSLo | WL"):
        path = tmp_path / f"{len(paths)}.tsv"
        pd.DataFrame({"pair": ["H2H", "H2V", "V2H", "V2V", "AVG"], "spbleu": [1.0, 2.0, 3.0, 4.0, 2.5],
                      "chrf": 1.0, "n_directions": 4}).to_csv(path, sep="\t", index=False)
        paths[label] = path
    tables.make_table(paths, {"Pretrain": None, "LSLo | WL": 1234}, tmp_path / "t.tsv", tmp_path / "t.md",
                      "Table 1", "spm")
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("|")]
    cells = [re.split(r"(?<!\\)\|", row.strip())[1:-1] for row in rows]  # a GFM reader's cell split
    assert [len(c) for c in cells] == [7] * len(rows)
    assert cells[-1][:2] == [r" LSLo \| WL ", " 1,234 "]


def test_table_rows_by_label_refuse_a_repeated_label():
    """workflow/scripts/table.py pairs labels with inputs: a repeated label would drop a row and put one
    variant's numbers under the other's name."""
    assert tables.by_label(["A", "B"], [1, 2], "Table 1") == {"A": 1, "B": 2}
    with pytest.raises(LsloError, match=r"Table 1: variant label\(s\) \['A'\] given to more than one row"):
        tables.by_label(["A", "B", "A"], [1, 2, 3], "Table 1")


def test_figure3_draws_a_bound_on_the_wrong_side_of_its_point(tmp_path):
    """The recorded case: epoch 2's dev_H2H lay 2.8e-17 above dev_H2H_high (a percentile bootstrap bound need not
    contain the point, lslo.bootstrap); matplotlib stopped the figure3 rule with "'yerr' must not contain negative
    values". The bar is clamped to end at the point."""
    h2h = [0.15, 0.2, 0.22]
    high = [0.3, np.nextafter(0.2, 0.0), 0.4]  # one unit in the last place below the point
    metrics = pd.DataFrame({"epoch": [1, 2, 3], "step": [10, 20, 30], "dev_H2H": h2h, "dev_H2H_low": [0.1, 0.1, 0.1],
                            "dev_H2H_high": high, "dev_V2V": [1.0, 2.0, 3.0], "dev_V2V_low": [0.5, 1.5, 2.5],
                            "dev_V2V_high": [1.5, 2.5, 3.5]})
    metrics.to_csv(tmp_path / "metrics.tsv", sep="\t", index=False)
    curve = figures.dev_curve(tmp_path / "metrics.tsv", "dev_H2H")
    low, high = figures.dev_interval(tmp_path / "metrics.tsv", "dev_H2H", curve.index)
    assert curve[2] - high[2] == pytest.approx(2.8e-17, rel=0.01)  # what the figure reads back
    figures.figure3_dev_curves({"x": tmp_path / "metrics.tsv"}, tmp_path / "fig3.png")
    assert_png(tmp_path / "fig3.png")
    below, above = figures.error_bar_lengths(curve, low, high)
    assert list(above) == pytest.approx([0.15, 0.0, 0.18]) and above[1] == 0.0
    assert list(below) == pytest.approx([0.05, 0.1, 0.12])
