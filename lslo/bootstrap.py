"""Error bars for Table 1: bootstrap confidence intervals and paired bootstrap tests on spBLEU.

The paper reports no intervals; these follow Koehn (2004) as sacrebleu implements them (sacrebleu.significance):

- Sufficient statistics. Corpus BLEU is a function of per-sentence counts summed over the corpus
  (hypothesis length, reference length, matching and total n-grams for n = 1..4). `lslo.metrics.sentence_stats`
  keeps those counts for every test sentence of every direction (sacrebleu's own extraction), so the BLEU of any
  resample is `bleu_from_stats` of a weighted sum: exactly corpus spBLEU of the resampled sentences, without
  re-scoring text.
- Resample. One bootstrap replicate draws n sentence ids with replacement from the n test sentences (numpy
  `default_rng(seed).choice`, as sacrebleu draws them). The test set is multi-parallel (line i is the same
  sentence in every language), so the same draw is used for every direction, and for every system: a hard sentence
  stays hard in all directions of a replicate, and systems are compared on the same resample (paired).
- Cells. A cell (group pair such as V2V, or AVG) of one replicate = mean over the cell's directions of corpus
  spBLEU of that direction on the resampled sentences, the same definition as the cell itself
  (lslo.metrics.aggregate). The 95% interval is the 2.5th-97.5th percentile of the replicates. A percentile
  interval need not contain the point estimate: the cell of the full test set is not a replicate, and when
  (nearly) every replicate scores the same, a bound can lie on the wrong side of it by a rounding error (dev
  H2H 2.8e-17 above its upper bound, seen in a run) or, with a skewed replicate distribution, by more. Users
  of the bounds must not assume low <= score <= high (lslo.figures clamps its error bars to the point).
- Paired test (sacrebleu's paired bootstrap, `_paired_bs_test`): the observed difference d = |X - Y| of the cell
  is compared with the replicate differences |X_b - Y_b| centred on their mean; p = (#{centred > d} + 1) / (B + 1)
  (`sacrebleu.significance._compute_p_value`).

Files: `results/evaluate/{variant}/sentence_stats.npz` (docs/formats.md): `stats` int32 (directions, sentences, 10),
`src`, `tgt`, `pair` (per direction), `ids` (sentence ids, test-table order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sacrebleu.significance import _compute_p_value
from scipy.stats import t as student_t

from lslo.errors import LsloError
from lslo.io import atomic_write
from lslo.metrics import pair_order

BLEU_ORDER = 4  # sacrebleu's default max n-gram order
N_STATS = 2 + 2 * BLEU_ORDER  # sys_len, ref_len, correct_1..4, total_1..4 (sacrebleu's layout)
RESAMPLES = 1000  # sacrebleu's default number of bootstrap resamples
SEED = 12345  # sacrebleu's default SACREBLEU_SEED
ALPHA = 0.05


def bleu_from_stats(sums: np.ndarray) -> np.ndarray:
    """Corpus BLEU of summed statistics (..., 10), vectorized; equals sacrebleu BLEU._compute_score_from_stats
    with its defaults (exp smoothing: the k-th n-gram order without a match counts 1 / (2^k · total))."""
    sums = np.asarray(sums, dtype=np.float64)
    sys_len, ref_len = sums[..., 0], sums[..., 1]
    correct, total = sums[..., 2 : 2 + BLEU_ORDER], sums[..., 2 + BLEU_ORDER :]
    with np.errstate(divide="ignore", invalid="ignore"):
        brevity = np.where(sys_len >= ref_len, 1.0,
                           np.where(sys_len > 0, np.exp(1 - ref_len / np.where(sys_len > 0, sys_len, 1)), 0.0))
        unmatched = correct == 0
        halvings = np.cumsum(unmatched, axis=-1)
        precision = np.where(unmatched, 100.0 / (2.0 ** halvings * total), 100.0 * correct / total)
        log_mean = np.log(np.where(total > 0, precision, 1.0)).mean(axis=-1)
    # no match at all, or an n-gram order with no n-grams (sacrebleu's log(0) = -1e10): BLEU 0
    zero = (~unmatched).sum(axis=-1) == 0
    zero |= (total == 0).any(axis=-1)
    return np.where(zero, 0.0, brevity * np.exp(log_mean))


def resample_counts(n_sentences: int, n_resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(B, n) how often each sentence occurs in each replicate; the draws are sacrebleu's
    (`default_rng(seed).choice(n, size=(B, n), replace=True)`)."""
    if n_sentences < 1:
        raise LsloError("bootstrap: no test sentences to resample")
    draws = np.random.default_rng(seed).choice(n_sentences, size=(n_resamples, n_sentences), replace=True)
    counts = np.zeros((n_resamples, n_sentences), dtype=np.float64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    return counts


@dataclass
class SentenceStats:
    """One system's per-sentence BLEU statistics for every direction of the test set."""

    stats: np.ndarray  # (directions, sentences, 10)
    src: list[str]
    tgt: list[str]
    pair: list[str]  # resource-group pair of each direction, e.g. "H2V"
    ids: list[str]  # sentence ids, the same order in every direction

    def direction_scores(self) -> np.ndarray:
        """Corpus spBLEU per direction (the directions TSV's spbleu)."""
        return bleu_from_stats(self.stats.sum(axis=1))

    def replicate_scores(self, counts: np.ndarray) -> np.ndarray:
        """(B, directions) corpus spBLEU of every direction on every replicate (counts from resample_counts)."""
        if counts.shape[1] != self.stats.shape[1]:
            raise LsloError(f"bootstrap: {counts.shape[1]} resampled sentences for {self.stats.shape[1]} "
                            "test sentences")
        directions, sentences, n_stats = self.stats.shape
        by_sentence = self.stats.transpose(1, 0, 2).reshape(sentences, directions * n_stats).astype(np.float64)
        sums = counts @ by_sentence  # one matrix product: (B, n) x (n, directions * 10)
        return bleu_from_stats(sums.reshape(len(counts), directions, n_stats))

    def cells(self) -> dict[str, np.ndarray]:
        """Cell name (group pair, then AVG) -> mask over directions (lslo.metrics.aggregate's cells)."""
        pairs = np.asarray(self.pair)
        groups = {g for p in self.pair for g in p.split("2")}
        cells = {p: pairs == p for p in pair_order(groups) if (pairs == p).any()}
        cells["AVG"] = np.ones(len(pairs), dtype=bool)
        return cells

    def same_test_set(self, other: "SentenceStats") -> bool:
        return (self.src, self.tgt, self.ids) == (other.src, other.tgt, other.ids)


def write_sentence_stats(stats: SentenceStats, path) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, stats=stats.stats.astype(np.int32), src=np.asarray(stats.src),
                                tgt=np.asarray(stats.tgt), pair=np.asarray(stats.pair), ids=np.asarray(stats.ids))


def read_sentence_stats(path) -> SentenceStats:
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: sentence statistics not found (written by the score stage)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("stats", "src", "tgt", "pair", "ids") if k not in data.files]
        if missing:
            raise LsloError(f"{path}: sentence statistics lack array(s) {missing}")
        stats = SentenceStats(data["stats"].astype(np.int64), data["src"].tolist(), data["tgt"].tolist(),
                              data["pair"].tolist(), data["ids"].tolist())
    if stats.stats.ndim != 3 or stats.stats.shape[2] != N_STATS or stats.stats.shape[0] != len(stats.src):
        raise LsloError(f"{path}: stats array of shape {stats.stats.shape}, expected "
                        f"({len(stats.src)}, sentences, {N_STATS})")
    return stats


def cell_replicates(stats: SentenceStats, counts: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Observed cell scores and their (B,) bootstrap replicates: a cell = mean over its directions of corpus spBLEU."""
    observed, replicates = stats.direction_scores(), stats.replicate_scores(counts)
    cells = stats.cells()
    return ({c: float(observed[mask].mean()) for c, mask in cells.items()},
            {c: replicates[:, mask].mean(axis=1) for c, mask in cells.items()})


def paired_p_value(observed_x: float, observed_y: float, replicates_x: np.ndarray, replicates_y: np.ndarray) -> float:
    """sacrebleu's paired bootstrap p-value (two-sided) of the difference between systems X and Y on one cell."""
    sample_diffs = np.abs(replicates_x - replicates_y)
    if not sample_diffs.any() and observed_x == observed_y:
        return 1.0  # the same translations on every resample: no difference to test (sacrebleu would give 1/(B+1))
    return float(_compute_p_value(sample_diffs - sample_diffs.mean(), abs(observed_x - observed_y)))


def check_systems(runs: dict[str, list[SentenceStats]], baselines: dict[str, str]) -> SentenceStats:
    """Every run of every system on the first one's directions and sentences, and every baseline a system; returns
    that first run (its sentences set the resample size)."""
    labels = list(runs)
    first = runs[labels[0]][0]
    for label in labels:
        if not all(run.same_test_set(first) for run in runs[label]):
            raise LsloError(f"bootstrap: '{label}' was scored on other directions or sentences than '{labels[0]}'")
    for name, label in baselines.items():
        if label not in runs:
            raise LsloError(f"bootstrap: baseline '{label}' ({name}) is not among the systems {labels}")
    return first


def compare_systems(systems: dict[str, SentenceStats], baselines: dict[str, str], n_resamples: int = RESAMPLES,
                    seed: int = SEED):
    """Intervals and paired tests for every system and cell.

    systems: {label: SentenceStats}, all on the same directions and sentences; baselines: {column name: label}
    (e.g. {"pretrain": "Pretrain", "ft_all": "Ft-all"}). Returns a DataFrame with one row per (system, cell):
    method, pair, spbleu, ci_low, ci_high, then p_<name> per baseline (NaN for the baseline's own row).
    """
    if not systems:
        raise LsloError("bootstrap: no systems to compare")
    labels = list(systems)
    first = check_systems({label: [stats] for label, stats in systems.items()}, baselines)
    counts = resample_counts(first.stats.shape[1], n_resamples, seed)
    results = {label: cell_replicates(systems[label], counts) for label in labels}
    rows = []
    for label in labels:
        observed, replicates = results[label]
        for cell, value in observed.items():
            low, high = np.percentile(replicates[cell], [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
            row = {"method": label, "pair": cell, "spbleu": value, "ci_low": float(low), "ci_high": float(high)}
            for name, base in baselines.items():
                base_observed, base_replicates = results[base]
                row[f"p_{name}"] = np.nan if base == label else paired_p_value(
                    value, base_observed[cell], replicates[cell], base_replicates[cell])
            rows.append(row)
    return pd.DataFrame(rows)



# Seeds. Fine-tuning the same variant with another seed moves spBLEU too (optimizer instability, Clark et al. 2011,
# "Better Hypothesis Testing for Statistical Machine Translation: Controlling for Optimizer Instability"). With
# several seeds per system, a cell's score is the mean over seeds, and its variance has two parts:
# - seeds: the sample variance of the per-seed cell scores over k seeds, / k (on the fixed test set, this is all the
#   run-to-run variation, including each run's own sentence-level idiosyncrasies);
# - test sentences: what a new test set would move, which is what the runs share. The sentence bootstrap of one run
#   also moves that run's idiosyncrasies, which the seed part already counts, so the shared part is estimated from
#   the covariance of the replicates of two different runs: the bootstrap covariance matrix C over all runs, with
#   each diagonal entry replaced by the mean covariance of that run with the other runs of its own system (with one
#   run, its own variance: nothing else estimates it).
# The statistic (difference of seed means) / sqrt(seed part + sentence part) is referred to Student's t with the
# Welch-Satterthwaite degrees of freedom of the seed part (the sentence part, from 1000 resamples, counts as known).
# A system with one run (Pretrain: not fine-tuned) has no seed part.


@dataclass
class SeedCell:
    """One cell of one system over its runs (one per seed)."""

    scores: np.ndarray  # (k,) the cell of each run
    replicates: np.ndarray  # (k, B) the cell of each run on each shared sentence resample

    @property
    def mean(self) -> float:
        return float(self.scores.mean())

    def spread(self) -> tuple[float, float, float]:
        """(sample sd, min, max) of the per-seed scores; sd is NaN for one run."""
        sd = float(self.scores.std(ddof=1)) if len(self.scores) > 1 else float("nan")
        return sd, float(self.scores.min()), float(self.scores.max())

    def seed_variance(self) -> float:
        """Variance of the seed mean from the seeds: s^2 / k (0 for one run)."""
        k = len(self.scores)
        return float(self.scores.var(ddof=1) / k) if k > 1 else 0.0


def shared_covariance(cells: list[SeedCell]) -> np.ndarray:
    """The runs' bootstrap covariance matrix with every diagonal entry replaced by the run's shared part (the mean
    covariance with the other runs of its own system; its own variance when it is the only one)."""
    runs = np.concatenate([c.replicates for c in cells])
    cov = np.atleast_2d(np.cov(runs))
    start = 0
    for cell in cells:
        k = len(cell.scores)
        block = cov[start : start + k, start : start + k]
        if k > 1:
            shared = (block.sum() - np.trace(block)) / (k * (k - 1))
            cov[np.arange(start, start + k), np.arange(start, start + k)] = shared
        start += k
    return cov


def seed_aware_test(x: SeedCell, y: SeedCell) -> tuple[float, float, float]:
    """(difference of seed means, its standard error, two-sided p) of systems x and y on one cell (see above)."""
    weights = np.concatenate([np.full(len(x.scores), 1 / len(x.scores)), np.full(len(y.scores), -1 / len(y.scores))])
    sentence_part = max(float(weights @ shared_covariance([x, y]) @ weights), 0.0)
    seed_parts = [c.seed_variance() for c in (x, y)]
    variance = sum(seed_parts) + sentence_part
    difference = x.mean - y.mean
    if variance == 0:
        return difference, 0.0, 1.0 if difference == 0 else 0.0
    dof_terms = sum(v**2 / (len(c.scores) - 1) for v, c in zip(seed_parts, (x, y)) if len(c.scores) > 1)
    dof = variance**2 / dof_terms if dof_terms > 0 else np.inf
    se = variance**0.5
    return difference, se, float(2 * student_t.sf(abs(difference) / se, dof))


def seed_interval(cell: SeedCell, level: float = 1 - ALPHA) -> tuple[float, float]:
    """Interval of a system's seed mean on one cell: mean -+ t * se, with the variance and degrees of freedom of
    seed_aware_test. With one run it is the percentile interval of compare_systems."""
    if len(cell.scores) == 1:
        low, high = np.percentile(cell.replicates[0], [100 * (1 - level) / 2, 100 * (1 + level) / 2])
        return float(low), float(high)
    k = len(cell.scores)
    seed_part = cell.seed_variance()
    variance = seed_part + max(float(shared_covariance([cell]).mean()), 0.0)  # weights 1/k: the mean of C / 1
    dof = variance**2 / (seed_part**2 / (k - 1)) if seed_part > 0 else np.inf
    half = float(student_t.ppf((1 + level) / 2, dof)) * variance**0.5
    return cell.mean - half, cell.mean + half


def seed_cells(runs: list[SentenceStats], counts: np.ndarray) -> dict[str, SeedCell]:
    """Cell name -> SeedCell of one system's runs (all on the same test set), on the shared resamples `counts`."""
    per_run = [cell_replicates(run, counts) for run in runs]
    return {cell: SeedCell(np.array([observed[cell] for observed, _ in per_run]),
                           np.stack([replicates[cell] for _, replicates in per_run]))
            for cell in per_run[0][0]}
