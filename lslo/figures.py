"""Stage 7, figures: the paper's Figures 1-6 from the stage TSVs (docs/formats.md); tables live in lslo.tables.

    figure1_weights(weights_tsv, out)                 §6.1  learned src/tgt weights per layer
    figure2_subspace(scores_tsv, out)                 §6.2  ISE demand per language, averaged over layers
    figure5_subspace_layers(scores_tsv, out)          App C the same per layer
    figure3_dev_curves(metrics_tsvs, out, baselines)  §7.2  per-epoch dev spBLEU, H2H and V2V
    figure4_lsp(lsp_scores_tsv, out)                  §7.3  language-specific pruning demand, averaged over languages
    figure6_lsp_languages(lsp_scores_tsv, out)        App D the same per language

"Demand" is −Score(B) of eq. 6: Score > 0 means B was pruned beyond the target ratio (a smaller subspace
suffices), so −Score > 0 (red) means a language/module needs more parameters than the target leaves.
The output format follows the file suffix (.png, .pdf, .svg).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (cluster nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from lslo.errors import LsloError  # noqa: E402
from lslo.io import atomic_write, read_tsv  # noqa: E402
from lslo.tables import correlation_table, make_table  # noqa: E402,F401  (lslo.figures.* is the stage API)

MODULES = {"enc": ["q", "k", "v", "fc1", "fc2"], "dec": ["q", "k", "v", "c-q", "c-k", "c-v", "fc1", "fc2"]}
SIDE_TITLES = {"enc": "Encoder", "dec": "Decoder"}
GROUP_ORDER = ["H", "M", "L", "V"]
GROUP_COLORS = {"H": "tab:green", "M": "tab:blue", "L": "tab:orange", "V": "tab:red"}  # Figure 2's row colours
SCORE_COLUMNS = ["language", "group", "side", "layer", "module", "n_params", "n_pruned", "score"]
CMAP = "coolwarm"  # blue = low demand, red = high demand (as the paper's Figures 2, 4-6)

CAPTIONS = {
    "figure1": "Learned source (src) and target (tgt) weights per layer in encoder (enc) and decoder (dec) "
               "(weight learning, §4.1, eq. 5); the larger weight picks each layer's index.",
    "figure2": "Parameter space demand (−Score of eq. 6, intrinsic subspace estimation) per language and module, "
               "averaged over layers; red = higher demand. Row labels coloured by resource group "
               "(H green, M blue, L orange, V red).",
    "figure3": "Dev spBLEU per epoch of H2H (left) and V2V (right) directions for each variant; dashed lines: "
               "baselines without per-epoch training curves (pretrain); a variant with several seeds: the mean over "
               "seeds, shaded from the lowest to the highest seed.",
    "figure4": "Parameter space demand (−Score of eq. 6, language-specific pruning, §7.3) per layer and module, "
               "averaged over languages; red = higher demand.",
    "figure5": "Parameter space demand (−Score of eq. 6, intrinsic subspace estimation) per language and module, "
               "one panel per layer; red = higher demand.",
    "figure6": "Parameter space demand (−Score of eq. 6, language-specific pruning) per layer and module, one panel "
               "per language; red = higher demand.",
}


# ---------------------------------------------------------------------------------------------- readers

def read_table(path, columns, what: str) -> pd.DataFrame:
    return read_tsv(path, columns, what, allow_empty=False)


def read_scores(path) -> pd.DataFrame:
    """scores.tsv / lsp_scores.tsv with a `demand` column = −score (eq. 6)."""
    scores = read_table(path, SCORE_COLUMNS, "subspace score table")
    bad_sides = sorted(set(scores["side"]) - set(MODULES))
    if bad_sides:
        raise LsloError(f"{path}: side(s) {bad_sides}, expected enc or dec")
    return scores.assign(demand=-scores["score"])


def language_order(scores: pd.DataFrame) -> list[str]:
    """Languages by resource group (H, M, L, V), file order within a group (Figure 2's rows)."""
    first = scores.drop_duplicates("language")
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    return sorted(first["language"], key=lambda lang: (rank.get(first.set_index("language").loc[lang, "group"], 9),
                                                        list(first["language"]).index(lang)))


def modules_of(scores: pd.DataFrame, side: str) -> list[str]:
    present = set(scores.loc[scores["side"] == side, "module"])
    return [m for m in MODULES[side] if m in present]


def demand_matrix(scores: pd.DataFrame, side: str, rows: str, row_order: list) -> pd.DataFrame:
    """Mean demand per (row key, module) for one side; rows = "language" or "layer"."""
    sub = scores[scores["side"] == side]
    matrix = sub.pivot_table(index=rows, columns="module", values="demand", aggfunc="mean")
    return matrix.reindex(index=row_order, columns=modules_of(scores, side))


# ---------------------------------------------------------------------------------------------- drawing

def _save(fig, out) -> None:
    out = Path(out)
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=150, bbox_inches="tight")
    plt.close(fig)


def _symmetric_norm(values) -> Normalize:
    """Colour limits symmetric about 0, so white = demand exactly at the target pruning ratio."""
    finite = np.asarray([v for v in np.ravel(values) if np.isfinite(v)])
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    return Normalize(-(bound or 1.0), bound or 1.0)


def _draw_sides(container, matrices: dict, row_labels, norm, row_colors=None, row_title=None, title=None):
    """Encoder | decoder heatmaps side by side in a figure or subfigure; returns the last image."""
    sides = [s for s in ("enc", "dec") if s in matrices and matrices[s].shape[1]]
    axes = container.subplots(1, len(sides), squeeze=False,
                              gridspec_kw={"width_ratios": [matrices[s].shape[1] for s in sides]})[0]
    image = None
    for ax, side in zip(axes, sides):
        matrix = matrices[side]
        image = ax.imshow(matrix.to_numpy(dtype=float), cmap=CMAP, norm=norm, aspect="auto")
        ax.set_xticks(range(matrix.shape[1]), matrix.columns)
        ax.set_xlabel(SIDE_TITLES[side])
        ax.set_yticks(range(len(row_labels)), row_labels if ax is axes[0] else [""] * len(row_labels))
        if ax is axes[0] and row_colors:
            for tick, color in zip(ax.get_yticklabels(), row_colors):
                tick.set_color(color)
        if ax is axes[0] and row_title:
            ax.set_ylabel(row_title)
    if title:
        container.suptitle(title, fontsize=9)
    return image


def _colorbar(fig, image, label="demand (−Score, eq. 6)"):
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label=label)


def _panel_grid(n_panels: int, ncols: int, panel_size: tuple[float, float]):
    """A figure with n_panels subfigures (row-major) and a narrow colour-bar subfigure on the right."""
    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = plt.figure(figsize=(panel_size[0] * ncols + 1, panel_size[1] * nrows), layout="constrained")
    grid, bar = fig.subfigures(1, 2, width_ratios=[panel_size[0] * ncols, 1])
    panels = np.ravel(grid.subfigures(nrows, ncols, squeeze=False))[:n_panels]
    return fig, panels, bar


def _panel_colorbar(bar, image, label="demand (−Score, eq. 6)"):
    bar.colorbar(image, cax=bar.add_axes((0.2, 0.15, 0.25, 0.7)), label=label)


# ---------------------------------------------------------------------------------------------- figures

def figure1_weights(weights_tsv, out) -> None:
    """Figure 1: learned w_src / w_tgt per layer, encoder and decoder (weights.tsv: side, layer, w_src, w_tgt)."""
    weights = read_table(weights_tsv, ["side", "layer", "w_src", "w_tgt"], "weight-learning table")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for side in ("enc", "dec"):
        sub = weights[weights["side"] == side].sort_values("layer")
        for column, style in (("w_src", "o-"), ("w_tgt", "s--")):
            ax.plot(sub["layer"], sub[column], style, label=f"{side}_{column[2:]} weights")
    ax.set_xlabel("Layer")
    ax.set_ylabel("Weight")
    ax.legend(fontsize=8)
    _save(fig, out)


def figure2_subspace(scores_tsv, out) -> None:
    """Figure 2: demand per language (rows, coloured by group) and module, averaged over layers."""
    scores = read_scores(scores_tsv)
    languages = language_order(scores)
    groups = scores.drop_duplicates("language").set_index("language")["group"]
    matrices = {side: demand_matrix(scores, side, "language", languages) for side in ("enc", "dec")}
    norm = _symmetric_norm(np.concatenate([m.to_numpy(dtype=float).ravel() for m in matrices.values()]))
    fig = plt.figure(figsize=(7, 0.3 * len(languages) + 1.5), layout="constrained")
    image = _draw_sides(fig, matrices, languages, norm, [GROUP_COLORS.get(groups[l], "black") for l in languages],
                        "Language id")
    _colorbar(fig, image)
    _save(fig, out)


def figure5_subspace_layers(scores_tsv, out, ncols: int = 3) -> None:
    """Figure 5: Figure 2 for each layer separately (one panel per layer, shared colour scale)."""
    scores = read_scores(scores_tsv)
    languages = language_order(scores)
    groups = scores.drop_duplicates("language").set_index("language")["group"]
    colors = [GROUP_COLORS.get(groups[l], "black") for l in languages]
    layers = sorted(scores["layer"].unique())
    norm = _symmetric_norm(scores.groupby(["language", "side", "layer", "module"])["demand"].mean())
    fig, panels, bar = _panel_grid(len(layers), ncols, (6, 0.3 * len(languages) + 1.5))
    image = None
    for subfig, layer in zip(panels, layers):
        at_layer = scores[scores["layer"] == layer]
        matrices = {side: demand_matrix(at_layer, side, "language", languages) for side in ("enc", "dec")}
        image = _draw_sides(subfig, matrices, languages, norm, colors, "Language id", f"Layer {layer}")
    _panel_colorbar(bar, image)
    _save(fig, out)


def figure4_lsp(lsp_scores_tsv, out) -> None:
    """Figure 4: language-specific pruning demand per layer (rows) and module, averaged over languages."""
    scores = read_scores(lsp_scores_tsv)
    layers = sorted(scores["layer"].unique())
    matrices = {side: demand_matrix(scores, side, "layer", layers) for side in ("enc", "dec")}
    norm = _symmetric_norm(np.concatenate([m.to_numpy(dtype=float).ravel() for m in matrices.values()]))
    fig = plt.figure(figsize=(7, 0.3 * len(layers) + 1.5), layout="constrained")
    image = _draw_sides(fig, matrices, [str(l) for l in layers], norm, row_title="Layer id")
    _colorbar(fig, image)
    _save(fig, out)


def figure6_lsp_languages(lsp_scores_tsv, out, ncols: int = 3) -> None:
    """Figure 6: Figure 4 for each language separately (one panel per language, shared colour scale)."""
    scores = read_scores(lsp_scores_tsv)
    layers = sorted(scores["layer"].unique())
    languages = language_order(scores)
    norm = _symmetric_norm(scores.groupby(["language", "side", "layer", "module"])["demand"].mean())
    fig, panels, bar = _panel_grid(len(languages), ncols, (6, 0.3 * len(layers) + 1.5))
    image = None
    for subfig, language in zip(panels, languages):
        of_language = scores[scores["language"] == language]
        matrices = {side: demand_matrix(of_language, side, "layer", layers) for side in ("enc", "dec")}
        image = _draw_sides(subfig, matrices, [str(l) for l in layers], norm, row_title="Layer id", title=language)
    _panel_colorbar(bar, image)
    _save(fig, out)


def dev_curve(metrics_tsv, column: str) -> pd.Series:
    """Last logged dev score of each epoch (metrics.tsv may log several steps per epoch)."""
    metrics = read_table(metrics_tsv, ["epoch", column], "metrics table")
    logged = metrics.dropna(subset=[column])
    return logged.groupby("epoch")[column].last().sort_index()


def dev_interval(metrics_tsv, column: str, epochs) -> tuple[pd.Series | None, pd.Series | None]:
    """The points' interval bounds (<column>_low/_high) at `epochs`, or (None, None) when the file has none."""
    metrics = pd.read_csv(metrics_tsv, sep="\t")
    bounds = [f"{column}_low", f"{column}_high"]
    if not set(bounds) <= set(metrics.columns):
        return None, None
    logged = metrics.dropna(subset=[column, *bounds]).groupby("epoch")[bounds].last().reindex(epochs)
    if logged.isna().any().any():
        return None, None
    return logged[bounds[0]], logged[bounds[1]]


def error_bar_lengths(point: pd.Series, low: pd.Series, high: pd.Series) -> list[np.ndarray]:
    """[below, above] lengths of error bars from `point` to its interval bounds, clamped at 0.

    A percentile bootstrap bound may lie on the wrong side of the point estimate (lslo.bootstrap: a bound equal to
    the score up to rounding came out 2.8e-17 below it); matplotlib refuses negative lengths, and the bar then
    ends at the point, which is what the interval says there."""
    below = (point - low).to_numpy(dtype=float)
    above = (high - point).to_numpy(dtype=float)
    return [np.clip(below, 0.0, None), np.clip(above, 0.0, None)]


def seed_curve(metrics_tsvs: list, column: str) -> pd.DataFrame:
    """Dev curve of one variant over its runs (one per seed): per epoch the `mean`, `min` and `max` of the runs'
    last logged dev scores. Runs of one variant train the same epochs; runs that logged other epochs are an error
    (a run cut short, or runs of different variants), not averaged over what they share."""
    curves = [dev_curve(path, column) for path in metrics_tsvs]
    for path, curve in zip(metrics_tsvs[1:], curves[1:]):
        if list(curve.index) != list(curves[0].index):
            raise LsloError(f"{path}: dev {column} logged at epochs {list(curve.index)}, {metrics_tsvs[0]} at "
                            f"{list(curves[0].index)}; the runs of one variant must train the same epochs")
    runs = pd.concat(curves, axis=1)
    return pd.DataFrame({"mean": runs.mean(axis=1), "min": runs.min(axis=1), "max": runs.max(axis=1)})


def figure3_dev_curves(metrics_tsvs: dict, out, baselines: dict | None = None) -> None:
    """Figure 3: dev spBLEU per epoch, H2H (a) and V2V (b), one line per variant label.

    metrics_tsvs: {label: metrics.tsv, or a list of them, one per seed run}; baselines: {label: metrics.tsv (or a
    one-run list)} drawn as horizontal lines at their last dev score (pretrain has no training curve). A label
    with several runs is drawn as the mean over seeds per epoch with a shaded band from the lowest to the highest
    run (seed_curve); one run is drawn with its points' 95% bootstrap intervals when logged.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, pair in zip(axes, ("H2H", "V2V")):
        column = f"dev_{pair}"
        for label, paths in metrics_tsvs.items():
            paths = paths if isinstance(paths, (list, tuple)) else [paths]
            if not paths:
                raise LsloError(f"figure3: no metrics tables given for '{label}'")
            if len(paths) > 1:
                curve = seed_curve(list(paths), column)
                line, = ax.plot(curve.index, curve["mean"].to_numpy(), marker="o", markersize=3,
                                label=f"{label} (mean of {len(paths)} seeds)")
                ax.fill_between(curve.index, curve["min"].to_numpy(), curve["max"].to_numpy(),
                                color=line.get_color(), alpha=0.2, linewidth=0)
                continue
            path = paths[0]
            curve = dev_curve(path, column)
            low, high = dev_interval(path, column, curve.index)
            if low is None:
                ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3, label=label)
            else:  # 95% bootstrap interval of each point (lslo.train.dev_scores)
                ax.errorbar(curve.index, curve.to_numpy(), yerr=error_bar_lengths(curve, low, high), marker="o",
                            markersize=3, capsize=2, label=label)
        for label, paths in (baselines or {}).items():
            paths = paths if isinstance(paths, (list, tuple)) else [paths]
            last = [curve.iloc[-1] for curve in (dev_curve(path, column) for path in paths) if len(curve)]
            if last:
                ax.axhline(float(np.mean(last)), linestyle="--", color="gray", label=label)
        ax.set_xlabel("Epoch")
        ax.set_ylabel("spBLEU")
        ax.set_title(f"({'ab'[pair == 'V2V']}) {pair} performance per epoch", fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, out)


def write_captions(out_dir: str | os.PathLike) -> None:
    """One-line .rst caption per figure (for `snakemake --report`), written where the caller chooses."""
    for name, text in CAPTIONS.items():
        with atomic_write(Path(out_dir) / f"{name}.rst") as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
