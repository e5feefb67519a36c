"""Table 1's error bars (lslo.bootstrap): resampled sufficient statistics are exactly sacrebleu's corpus BLEU of the
resampled text; the paired test is sacrebleu's paired bootstrap; the table carries intervals and marks."""

import random

import numpy as np
import pandas as pd
import pytest
import sacrebleu
from sacrebleu.significance import _paired_bs_test

from lslo import bootstrap, evaluate, metrics
from lslo.errors import LsloError
from lslo.io import write_json
from lslo.tables import make_table

WORDS = "a b c d e f g h i j k l m n o p".split()


def corpus(n, seed, p, refs=None):
    """Reference lines (refs=None) or hypotheses that replace each reference word with probability p."""
    rng = random.Random(seed)
    if refs is None:
        return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]
    return [" ".join(w if rng.random() > p else rng.choice(WORDS) for w in ref.split()[: rng.randint(1, 9)])
            for ref in refs]


def system(refs_by_direction, pairs, p, seed):
    """SentenceStats of a system whose hypotheses are the references with word noise p."""
    hyps = {d: corpus(0, seed + k, p, refs) for k, (d, refs) in enumerate(refs_by_direction.items())}
    stats = np.stack([metrics.sentence_stats(hyps[d], refs) for d, refs in refs_by_direction.items()])
    directions = list(refs_by_direction)
    return hyps, bootstrap.SentenceStats(stats, [d[0] for d in directions], [d[1] for d in directions], pairs,
                                         [str(i) for i in range(stats.shape[1])])


@pytest.fixture(scope="module")
def refs():
    return {("h1", "h2"): corpus(30, 1, 0), ("h2", "h1"): corpus(30, 2, 0), ("v1", "h1"): corpus(30, 3, 0)}


def test_bleu_from_stats_equals_sacrebleu_on_random_statistics():
    rng = np.random.default_rng(0)
    metric = sacrebleu.BLEU(tokenize="none")
    totals = rng.integers(0, 30, size=(400, 4))
    stats = np.concatenate([rng.integers(0, 40, size=(400, 2)),  # sys_len < ref_len half the time
                            (totals * rng.choice([0.0, 0.3, 1.0], size=(400, 4))).astype(int), totals], axis=1)
    stats[:20, 2:6] = 0  # no match at all
    stats[20:40, 9] = 0  # no 4-grams
    ours = bootstrap.bleu_from_stats(stats)
    theirs = [metric._compute_score_from_stats(list(row)).score for row in stats]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_replicates_are_corpus_bleu_of_the_resampled_sentences(refs):
    hyps, stats = system(refs, ["H2H", "H2H", "V2H"], 0.4, seed=10)
    counts = bootstrap.resample_counts(30, n_resamples=6, seed=7)
    draws = np.random.default_rng(7).choice(30, size=(6, 30), replace=True)  # the same draws, written out
    replicates = stats.replicate_scores(counts)
    for b in range(6):
        for d, direction in enumerate(refs):
            hyp = [hyps[direction][i] for i in draws[b]]
            ref = [refs[direction][i] for i in draws[b]]
            expected = sacrebleu.corpus_bleu(hyp, [ref], tokenize="none").score
            assert replicates[b, d] == pytest.approx(expected, abs=1e-9)
    observed, cells = bootstrap.cell_replicates(stats, counts)
    assert list(observed) == ["H2H", "V2H", "AVG"]
    np.testing.assert_allclose(cells["H2H"], replicates[:, :2].mean(axis=1))
    np.testing.assert_allclose(cells["AVG"], replicates.mean(axis=1))
    full = [sacrebleu.corpus_bleu(hyps[d], [r], tokenize="none").score for d, r in refs.items()]
    assert observed["H2H"] == pytest.approx(np.mean(full[:2])) and observed["AVG"] == pytest.approx(np.mean(full))


def test_paired_test_is_sacrebleus_paired_bootstrap(refs):
    direction = ("h1", "h2")
    one = {direction: refs[direction]}
    base_hyps, base = system(one, ["H2H"], 0.5, seed=20)
    sys_hyps, better = system(one, ["H2H"], 0.2, seed=30)
    metric = sacrebleu.BLEU(tokenize="none")
    base_stats = metric._extract_corpus_statistics(base_hyps[direction], [refs[direction]])
    _, results = _paired_bs_test({"BLEU": (base_stats, metric._aggregate_and_compute(base_stats))}, "sys",
                                 sys_hyps[direction], [refs[direction]], {"BLEU": metric}, n_samples=300, seed=5)
    frame = bootstrap.compare_systems({"Pretrain": base, "X": better}, {"pretrain": "Pretrain"}, n_resamples=300,
                                      seed=5).set_index(["method", "pair"])
    assert frame.loc[("X", "AVG"), "spbleu"] == pytest.approx(results["BLEU"].score)
    assert frame.loc[("X", "AVG"), "p_pretrain"] == pytest.approx(results["BLEU"].p_value)
    assert np.isnan(frame.loc[("Pretrain", "AVG"), "p_pretrain"])
    low, high = frame.loc[("X", "AVG"), ["ci_low", "ci_high"]]
    assert low < results["BLEU"].score < high
    # sacrebleu's interval is mean ± half the width between the same order statistics
    assert (high - low) / 2 == pytest.approx(results["BLEU"].ci, rel=0.1)


def test_clear_difference_is_significant_and_noise_is_not(refs):
    _, noisy = system(refs, ["H2H", "H2H", "V2H"], 0.6, seed=40)
    _, good = system(refs, ["H2H", "H2H", "V2H"], 0.05, seed=50)
    _, same_quality = system(refs, ["H2H", "H2H", "V2H"], 0.6, seed=60)
    frame = bootstrap.compare_systems({"Pretrain": noisy, "good": good, "twin": same_quality, "copy": noisy},
                                      {"pretrain": "Pretrain"}).set_index(["method", "pair"])
    assert frame.loc[("good", "AVG"), "p_pretrain"] < 0.05
    assert frame.loc[("twin", "AVG"), "p_pretrain"] > 0.05
    assert frame.loc[("copy", "AVG"), "p_pretrain"] == 1.0  # identical translations: nothing to test
    width = frame["ci_high"] - frame["ci_low"]
    assert (width > 0).all()
    assert (frame["ci_low"] <= frame["spbleu"]).all() and (frame["spbleu"] <= frame["ci_high"]).all()


def test_systems_on_other_sentences_are_refused(refs):
    _, a = system(refs, ["H2H", "H2H", "V2H"], 0.3, seed=1)
    b = bootstrap.SentenceStats(a.stats[:, :-1], a.src, a.tgt, a.pair, a.ids[:-1])
    with pytest.raises(LsloError, match="'b' was scored on other directions or sentences"):
        bootstrap.compare_systems({"a": a, "b": b}, {})
    with pytest.raises(LsloError, match="baseline 'Ft-all'"):
        bootstrap.compare_systems({"a": a}, {"ft_all": "Ft-all"})


def test_stats_file_round_trip_and_errors(refs, tmp_path):
    _, stats = system(refs, ["H2H", "H2H", "V2H"], 0.3, seed=1)
    bootstrap.write_sentence_stats(stats, tmp_path / "s.npz")
    back = bootstrap.read_sentence_stats(tmp_path / "s.npz")
    assert back.same_test_set(stats) and back.pair == stats.pair
    np.testing.assert_array_equal(back.stats, stats.stats)
    with pytest.raises(LsloError, match="missing.npz: sentence statistics not found"):
        bootstrap.read_sentence_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", stats=stats.stats)
    with pytest.raises(LsloError, match=r"bad.npz: sentence statistics lack array\(s\) \['src'"):
        bootstrap.read_sentence_stats(tmp_path / "bad.npz")


def test_score_variant_stats_reproduce_the_directions_table(tmp_path):
    import sentencepiece

    lines = corpus(400, 9, 0)
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "m"),
                                             vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    test = pd.DataFrame({"id": range(12), "h1": lines[:12], "v1": lines[12:24]})
    test.to_csv(tmp_path / "test.tsv", sep="\t", index=False)
    rows = [(s, t, i, h) for s, t in (("h1", "v1"), ("v1", "h1"))
            for i, h in reversed(list(enumerate(corpus(0, len(s), 0.4, test[t].tolist()))))]  # ids out of order
    pd.DataFrame(rows, columns=evaluate.HYP_COLUMNS).to_csv(tmp_path / "hyps.tsv", sep="\t", index=False)
    table = pd.DataFrame({"code": ["h1", "v1"], "resource": ["H", "V"]}).set_index("code", drop=False)
    evaluate.score_variant([tmp_path / "hyps.tsv"], tmp_path / "test.tsv", table, tmp_path / "m.model",
                           tmp_path / "d.tsv", tmp_path / "g.tsv", out_stats=tmp_path / "s.npz")
    scored = pd.read_csv(tmp_path / "d.tsv", sep="\t")
    stats = bootstrap.read_sentence_stats(tmp_path / "s.npz")
    assert stats.src == scored.src.tolist() and stats.ids == [str(i) for i in range(12)]
    np.testing.assert_allclose(stats.direction_scores(), scored.spbleu, atol=1e-4)
    first = metrics.sentence_stats(metrics.spm_pieces([rows[11][3]], tmp_path / "m.model"),
                                   metrics.spm_pieces([test.loc[0, "v1"]], tmp_path / "m.model"))
    np.testing.assert_array_equal(stats.stats[0, 0], first[0])  # sentence 0 is the first row, whatever the hyps order


def test_table_shows_intervals_and_marks(refs, tmp_path):
    pairs = ["H2H", "H2H", "V2H"]
    systems = {"Pretrain": system(refs, pairs, 0.7, seed=70)[1], "Ft-all": system(refs, pairs, 0.3, seed=80)[1],
               "8;8;8+WL": system(refs, pairs, 0.0, seed=90)[1]}
    groups, npzs = {}, {}
    for label, stats in systems.items():
        scores = stats.direction_scores()
        groups[label] = tmp_path / f"{len(groups)}.groups.tsv"
        pd.DataFrame({"pair": ["H2H", "V2H", "AVG"], "spbleu": [scores[:2].mean(), scores[2], scores.mean()],
                      "chrf": 0.0, "n_directions": [2, 1, 3]}).to_csv(groups[label], sep="\t", index=False)
        npzs[label] = tmp_path / f"{len(npzs)}.npz"
        bootstrap.write_sentence_stats(stats, npzs[label])
    methods = {"Pretrain": "pretrain", "Ft-all": "full", "8;8;8+WL": "lslo"}
    make_table(groups, {}, tmp_path / "t.tsv", tmp_path / "t.md", "Table 1", "spm", stats_npzs=npzs,
               methods=methods, out_intervals=tmp_path / "t.intervals.tsv")
    intervals = pd.read_csv(tmp_path / "t.intervals.tsv", sep="\t")
    assert list(intervals.columns) == ["method", "pair", "spbleu", "ci_low", "ci_high", "p_pretrain", "p_ft_all"]
    row = intervals.set_index(["method", "pair"]).loc[("8;8;8+WL", "AVG")]
    assert row.p_pretrain < 0.05 and row.p_ft_all < 0.05
    md = (tmp_path / "t.md").read_text()
    assert f"{row.spbleu:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]*†" in md
    assert "95% bootstrap interval" in md
    # groups that disagree with the statistics (e.g. rescored hypotheses) stop the table, nothing written
    pd.DataFrame({"pair": ["H2H", "V2H", "AVG"], "spbleu": [1.0, 2.0, 3.0], "chrf": 0.0,
                  "n_directions": [2, 1, 3]}).to_csv(groups["Ft-all"], sep="\t", index=False)
    with pytest.raises(LsloError, match="Ft-all H2H: sentence statistics give spBLEU"):
        make_table(groups, {}, tmp_path / "u.tsv", tmp_path / "u.md", "Table 1", "spm", stats_npzs=npzs,
                   methods=methods, out_intervals=tmp_path / "u.intervals.tsv")
    assert not any((tmp_path / f"u.{s}").exists() for s in ("tsv", "md", "intervals.tsv"))


def test_summary_targets_and_readme(refs, tmp_path):
    from lslo import summary

    refs_v2v = {**refs, ("v1", "v2"): corpus(30, 4, 0)}
    pairs = ["H2H", "H2H", "V2H", "V2V"]
    noise = {"pretrain": 0.8, "ft_all": 0.5, "full_rank": 0.1, "low_rank": 0.3, "pruned": 0.3}
    stats, labels = {}, {}
    for k, (role, p) in enumerate(noise.items()):
        stats[role] = tmp_path / f"{role}.npz"
        labels[role] = role.replace("_", "-")
        bootstrap.write_sentence_stats(system(refs_v2v, pairs, p, seed=100 * k)[1], stats[role])
    pd.DataFrame({"side": ["enc", "enc", "dec"], "layer": [1, 2, 1], "w_src": [0.5, 0.9, 0.45],
                  "w_tgt": [0.5, 0.1, 0.55]}).to_csv(tmp_path / "w.tsv", sep="\t", index=False)
    pd.DataFrame({"module": ["q", "AVG"], "r": [0.7, 0.7], "p_value": [0.01, 0.01], "n_languages": 11}).to_csv(
        tmp_path / "t9.tsv", sep="\t", index=False)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "figure1.png").write_bytes(b"png")
    (tmp_path / "t1.md").write_text("**Table 1: spBLEU**\n\n| a |\n|---|\n| 1 |\n")
    # the demo's 2 + 2 layers, encoder layer 2 target-indexed: one layer off the paper's rule scaled to 2 layers
    write_json({"enc": ["src", "tgt"], "dec": ["tgt", "tgt"]}, tmp_path / "plan.json")
    targets = summary.write_summary(stats, labels, tmp_path / "w.tsv", tmp_path / "t9.tsv", [tmp_path / "t1.md"],
                                    {"Figure 1": "figures/figure1.png"}, tmp_path / "summary.md",
                                    plan_json=tmp_path / "plan.json").set_index("target")
    frame = bootstrap.compare_systems({labels[r]: bootstrap.read_sentence_stats(stats[r]) for r in noise},
                                      {"pretrain": "pretrain"}).set_index(["method", "pair"])
    h2h, v2v = frame.loc[("pretrain", "H2H"), "spbleu"], frame.loc[("pretrain", "V2V"), "spbleu"]
    assert targets.loc["Pretrain H2H spBLEU", "result"] == ("pass" if h2h >= 25 else "miss")
    assert targets.loc["Pretrain H2H spBLEU", "measured"].startswith(f"{h2h:.2f} [")
    gain = frame.loc[("full-rank", "V2V"), "spbleu"] - v2v
    assert targets.loc["full-rank V2V gain over Pretrain", "measured"].startswith(f"{gain:+.2f}")
    assert targets.loc["Weight learning, encoder: max |w_src - w_tgt|", "measured"] == "0.800 (layer 2)"
    assert targets.loc["Weight learning, decoder: max |w_src - w_tgt|", "result"] == "miss"  # 0.1 < 0.2
    assert targets.loc["ISE: Pearson r, bitext vs eq. 6 score, encoder AVG (Table 9)", "result"] == "pass"
    plan_row = targets.loc["Weight learning: learned index plan vs the paper's"]
    assert plan_row["result"] == "report" and plan_row["needed"] == (
        "report (the paper's rule at this depth: encoder src×2, decoder tgt×2)")
    assert plan_row["measured"].startswith("The learned index plan (encoder src×1 tgt×1, decoder tgt×2) differs "
                                           "from the paper's rule scaled to this model's 2 + 2 layers")
    assert plan_row["measured"].endswith("in 1 of 4 layers: encoder layer 2: tgt (scaled rule src).")
    text = (tmp_path / "summary.md").read_text()
    assert plan_row["measured"] in text
    assert "#### Table 1: spBLEU" in text and "![Figure 1](figures/figure1.png)" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{summary.README_START}\nold\n{summary.README_END}\n\nrest\n")
    summary.update_readme(tmp_path / "summary.md", readme, tmp_path / "docs" / "demo")
    updated = readme.read_text()
    assert "old" not in updated and "![Figure 1](docs/demo/figure1.png)" in updated and updated.endswith("rest\n")
    assert (tmp_path / "docs" / "demo" / "figure1.png").read_bytes() == b"png"
    with pytest.raises(LsloError, match="no variant for role"):
        summary.demo_targets({"pretrain": stats["pretrain"]}, labels, tmp_path / "w.tsv", tmp_path / "t9.tsv")
