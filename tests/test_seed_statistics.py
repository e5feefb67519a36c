"""The seed-aware test of lslo.bootstrap (seeds and test sentences): written out another way, and calibrated on
synthetic per-sentence BLEU statistics whose seed variance is known."""

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lslo import bootstrap

DIRECTIONS = [("h1", "v1", "H2V"), ("v1", "h1", "V2H"), ("h1", "h2", "H2H")]


def synthetic_runs(rng, difficulty, ref_len, k: int, quality: float, seed_sd: float, noise_sd: float = 0.08):
    """k runs of one system on one test set: n-gram precision = quality + sentence difficulty + the run's seed
    effect (sd seed_sd, the known seed variance) + the run's own per-sentence noise; matches are binomial."""
    runs = []
    for _ in range(k):
        seed_effect = rng.normal(0, seed_sd)
        stats = np.zeros((len(DIRECTIONS), len(ref_len), bootstrap.N_STATS), dtype=np.int64)
        for d in range(len(DIRECTIONS)):
            p1 = np.clip(quality + difficulty[d] + seed_effect + rng.normal(0, noise_sd, len(ref_len)), 0.05, 0.95)
            stats[d, :, 0] = stats[d, :, 1] = ref_len
            for order in range(1, bootstrap.BLEU_ORDER + 1):
                total = np.maximum(ref_len - order + 1, 0)
                stats[d, :, 1 + order] = rng.binomial(total, p1**order)
                stats[d, :, 1 + bootstrap.BLEU_ORDER + order] = total
        runs.append(bootstrap.SentenceStats(stats, [s for s, _, _ in DIRECTIONS], [t for _, t, _ in DIRECTIONS],
                                            [p for _, _, p in DIRECTIONS], [str(i) for i in range(len(ref_len))]))
    return runs


def draw_test_set(rng, n: int = 80):
    return rng.normal(0, 0.1, (len(DIRECTIONS), n)), rng.integers(8, 30, n)


def test_the_test_equals_the_variance_decomposition_written_out():
    rng = np.random.default_rng(3)
    difficulty, ref_len = draw_test_set(rng)
    counts = bootstrap.resample_counts(len(ref_len), n_resamples=200, seed=5)
    x = bootstrap.seed_cells(synthetic_runs(rng, difficulty, ref_len, 3, 0.55, 0.03), counts)["AVG"]
    y = bootstrap.seed_cells(synthetic_runs(rng, difficulty, ref_len, 2, 0.50, 0.03), counts)["AVG"]
    difference, se, p = bootstrap.seed_aware_test(x, y)

    def cov(a, b):  # bootstrap covariance of two runs' replicates, by hand
        return sum((a[i] - a.mean()) * (b[i] - b.mean()) for i in range(len(a))) / (len(a) - 1)

    runs = [(1 / 3, r, "x") for r in x.replicates] + [(-1 / 2, r, "y") for r in y.replicates]
    sentence = 0.0
    for (wi, ri, si), (wj, rj, sj) in itertools.product(runs, runs):
        if ri is not rj:
            sentence += wi * wj * cov(ri, rj)
        else:  # a run's own variance stands for what it shares with the other runs of its system
            others = [r for _, r, s in runs if s == si and r is not ri]
            sentence += wi * wj * np.mean([cov(ri, r) for r in others])
    seed_x, seed_y = np.var(x.scores, ddof=1) / 3, np.var(y.scores, ddof=1) / 2
    variance = seed_x + seed_y + max(sentence, 0)
    dof = variance**2 / (seed_x**2 / 2 + seed_y**2 / 1)
    assert difference == pytest.approx(x.scores.mean() - y.scores.mean(), abs=1e-12)
    assert se == pytest.approx(variance**0.5, rel=1e-9)
    assert p == pytest.approx(2 * scipy_stats.t.sf(abs(difference) / variance**0.5, dof), rel=1e-9)


def test_without_a_shared_sentence_part_it_is_welchs_t_test():
    # replicates with no covariance between runs, and a run's own variance replaced by that (0): Welch on the seeds
    rng = np.random.default_rng(0)
    x = bootstrap.SeedCell(np.array([30.1, 31.4, 29.8]), rng.normal(0, 1e-9, (3, 50)))
    y = bootstrap.SeedCell(np.array([28.0, 29.9, 28.7, 29.0]), rng.normal(0, 1e-9, (4, 50)))
    _, _, p = bootstrap.seed_aware_test(x, y)
    welch = scipy_stats.ttest_ind(x.scores, y.scores, equal_var=False)
    assert p == pytest.approx(welch.pvalue, rel=1e-5)


def rejection_rate(shift: float, k: int, simulations: int = 200, seed: int = 11) -> float:
    rng = np.random.default_rng(seed)
    rejected = 0
    for sim in range(simulations):
        difficulty, ref_len = draw_test_set(rng)
        counts = bootstrap.resample_counts(len(ref_len), n_resamples=200, seed=sim)
        x = bootstrap.seed_cells(synthetic_runs(rng, difficulty, ref_len, k, 0.5 + shift, 0.03), counts)["AVG"]
        y = bootstrap.seed_cells(synthetic_runs(rng, difficulty, ref_len, k, 0.5, 0.03), counts)["AVG"]
        rejected += bootstrap.seed_aware_test(x, y)[2] < 0.05
    return rejected / simulations


def test_false_positive_rate_over_200_null_simulations_is_near_alpha():
    # Equal systems, seed sd 0.03 on the precision scale (about 3 spBLEU): the test rejects in about 5%.
    assert 0.02 <= rejection_rate(0.0, k=3) <= 0.08


def test_a_difference_larger_than_the_seed_noise_is_found():
    assert rejection_rate(0.15, k=3, simulations=40) >= 0.8


def test_a_single_seed_sentence_only_test_is_fooled_by_seed_noise():
    # Why seeds matter: with one run each, the sentence bootstrap alone rejects equal systems far more than 5%.
    rng = np.random.default_rng(11)
    rejected = 0
    for sim in range(100):
        difficulty, ref_len = draw_test_set(rng)
        counts = bootstrap.resample_counts(len(ref_len), n_resamples=200, seed=sim)
        x, y = (bootstrap.seed_cells(synthetic_runs(rng, difficulty, ref_len, 1, 0.5, 0.03), counts)["AVG"]
                for _ in range(2))
        rejected += bootstrap.seed_aware_test(x, y)[2] < 0.05
    assert rejected / 100 > 0.15


def test_seed_interval_excludes_a_value_exactly_when_the_test_against_it_rejects():
    rng = np.random.default_rng(2)
    difficulty, ref_len = draw_test_set(rng)
    counts = bootstrap.resample_counts(len(ref_len), n_resamples=200, seed=1)
    cell = bootstrap.seed_cells(synthetic_runs(rng, difficulty, ref_len, 3, 0.5, 0.03), counts)["AVG"]
    low, high = bootstrap.seed_interval(cell)
    assert low < cell.mean < high
    for value in np.linspace(low - 2, high + 2, 41):  # a fixed system: one run, the same score on every resample
        fixed = bootstrap.SeedCell(np.array([value]), np.full((1, counts.shape[0]), value))
        p = bootstrap.seed_aware_test(cell, fixed)[2]
        if abs(value - low) > 1e-6 and abs(value - high) > 1e-6:
            assert (p < 0.05) == (not low < value < high), value
