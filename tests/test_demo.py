"""The embedded demo: synthetic benchmark (determinism, FLORES layout, groups, relatedness, imbalance) and the
tiny pretrained checkpoint (loads through the same code path as a real one, generates)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lslo.demo import pretrain_demo_model, zero_shot_report
from lslo.demo_benchmark import (
    DEV_LINES,
    DEVTEST_LINES,
    build_languages,
    make_benchmark,
    read_bitext,
    render,
    sample_frames,
    _rng,
)
from lslo.errors import LsloError
from lslo.languages import read_language_table, select


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_benchmark(tmp_path_factory.mktemp("demo") / "bench", n_languages=12, seed=1)


def test_same_seed_same_files_other_seed_other_files(bench, tmp_path):
    again = make_benchmark(tmp_path / "again", seed=1)
    other = make_benchmark(tmp_path / "other", seed=2)
    assert _digest(again) == _digest(bench)
    other_digest = _digest(other)
    assert other_digest.keys() == _digest(bench).keys()
    changed = [name for name, digest in other_digest.items() if digest != _digest(bench)[name]]
    # every text file differs; the table and the marker of an lslo output directory do not
    assert set(changed) == set(other_digest) - {"languages.tsv", ".lslo-output"}


def test_flores101_layout_and_multiparallel_line_counts(bench):
    table = read_language_table(bench / "languages.tsv")
    for code in table["code"]:
        dev = (bench / "dev" / f"{code}.dev").read_text(encoding="utf-8").splitlines()
        devtest = (bench / "devtest" / f"{code}.devtest").read_text(encoding="utf-8").splitlines()
        assert (len(dev), len(devtest)) == (DEV_LINES, DEVTEST_LINES) == (997, 1012)
        assert all(line.strip() for line in dev + devtest)
        assert len(set(dev)) > 0.95 * len(dev)  # frames are distinct; a language may merge a few (no plural, ...)


def test_line_i_is_the_same_frame_in_every_language(bench):
    languages = build_languages(12, seed=1)
    frames = sample_frames(_rng(1, "flores"), DEV_LINES + DEVTEST_LINES)
    for lang in languages:
        devtest = (bench / "devtest" / f"{lang.code}.devtest").read_text(encoding="utf-8").splitlines()
        assert devtest[::100] == [render(lang, f) for f in frames[DEV_LINES::100]]
    lang = languages[1]
    # change only the subject's number: every language whose grammar marks number must render it differently
    a = frames[0]
    b = type(a)(**{**a.__dict__, "subj_num": "pl" if a.subj_num == "sg" else "sg"})
    assert render(lang, a) != render(lang, b)
    assert [render(lang, f) for f in frames] == [render(lang, f) for f in frames]


def test_language_groups_are_lang12_shaped(bench):
    table = read_language_table(bench / "languages.tsv")
    codes = select(table, "demo12")
    assert len(codes) == 12
    assert table.loc[codes, "resource"].value_counts().to_dict() == {"H": 4, "M": 4, "V": 4}
    assert table["bitext"].isna().sum() == 1  # the pivot has no bitext "with itself", as en in Table 5


def test_thirty_languages_contain_the_twelve(tmp_path):
    root = make_benchmark(tmp_path / "b30", n_languages=30, seed=1)
    table = read_language_table(root / "languages.tsv")
    assert len(select(table, "demo30")) == 30 and len(select(table, "demo12")) == 12
    assert table["resource"].value_counts().to_dict() == {"H": 7, "M": 9, "L": 8, "V": 6}  # Table 6's shape
    with pytest.raises(LsloError, match="n_languages"):
        make_benchmark(tmp_path / "b31", n_languages=31)


def _types(root: Path, code: str) -> set[str]:
    return set((root / "dev" / f"{code}.dev").read_text(encoding="utf-8").split())


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)  # Jaccard ratio of word types


def test_occitan_like_language_shares_vocabulary_with_its_relatives(bench):
    table = read_language_table(bench / "languages.tsv")
    v1 = table.loc["v1"]
    relatives = [c for c in table["code"] if c != "v1" and table.loc[c, "family"] == v1["family"]]
    assert set(relatives) >= {"h2", "h4"} and v1["resource"] == "V"
    unrelated = [c for c in table["code"] if table.loc[c, "family"] != v1["family"]]
    related_overlap = min(_overlap(_types(bench, "v1"), _types(bench, c)) for c in relatives)
    unrelated_overlap = max(_overlap(_types(bench, "v1"), _types(bench, c)) for c in unrelated)
    assert related_overlap > 0.2, related_overlap
    assert related_overlap > 5 * unrelated_overlap


def test_languages_differ_in_word_order_and_morphology():
    languages = build_languages(12, seed=1)
    grammars = [lang.grammar for lang in languages]
    assert len({g.order for g in grammars}) >= 2
    assert len({g.adj_after for g in grammars}) == 2
    assert any(g.plural_particle for g in grammars) and any(g.plural for g in grammars)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pivot_is_svo_and_most_languages_align_monotonically_with_it(seed):
    languages = build_languages(12, seed=seed)
    orders = [lang.grammar.order for lang in languages]
    assert orders[0] == "SVO"  # h1, the English-like pivot
    assert orders.count("SVO") >= 6  # mostly monotone alignments: learnable by a tiny model in minutes
    words = [w for lang in languages for pos in ("noun", "verb", "adj") for w in lang.lexicon[pos]]
    assert sum(len(w) for w in words) / len(words) < 5  # one- or two-syllable stems


def test_bitext_is_imbalanced_h_m_v(bench):
    table = read_language_table(bench / "languages.tsv")
    bitext = read_bitext(bench)
    pivot = table["code"][table["bitext"].isna()].item()
    size = {b: len(bitext[(pivot, b)][0]) for b in table["code"] if b != pivot}
    by_group = {g: [size[c] for c in size if table.loc[c, "resource"] == g] for g in "HMV"}
    assert min(by_group["H"]) > max(by_group["M"]) > 0
    assert min(by_group["M"]) > max(by_group["V"]) > 0
    assert all(size[c] == table.loc[c, "bitext"] for c in size)
    # bitext never repeats an evaluation sentence (the test set stays unseen)
    devtest = set((bench / "devtest" / f"{pivot}.devtest").read_text(encoding="utf-8").splitlines())
    assert not devtest & set(bitext[(pivot, "h2")][0])


def test_demo_spm_is_the_same_file_wherever_it_is_trained(bench, tmp_path):
    """Its sha256 is part of the sacrebleu signature of every demo score: two runs must agree on it."""
    from lslo.demo import train_demo_spm

    first = train_demo_spm(bench, tmp_path / "a" / "spm.model", vocab_size=300)
    second = train_demo_spm(bench, tmp_path / "elsewhere" / "b.model", vocab_size=300)
    assert first.read_bytes() == second.read_bytes()
    assert not list((tmp_path / "a").glob(".*"))  # no temporaries left behind


def test_fast_tokenize_matches_the_tokenizer(bench, tmp_path):
    from lslo.data import tokenize_column
    from lslo.demo import fast_tokenize, train_demo_spm
    from lslo.tokenizer import build_tokenizer

    spm_file = train_demo_spm(bench, tmp_path / "spm.model", vocab_size=300)
    tokenizer = build_tokenizer(spm_file, ["h1", "m1", "v2"], tmp_path / "tok")
    for code in ("h1", "m1", "v2"):
        lines = (bench / "dev" / f"{code}.dev").read_text(encoding="utf-8").splitlines()[:50] + ["xq zz", ""]
        assert fast_tokenize(lines, tokenizer) == tokenize_column(lines, tokenizer)


def test_short_pretraining_gives_a_loadable_checkpoint_that_generates(tmp_path, monkeypatch):
    from transformers import M2M100ForConditionalGeneration

    import lslo.data
    import lslo.demo
    from lslo.io import read_json
    from lslo.tokenizer import load_tokenizer

    samplers = []

    class RecordedSampler(lslo.data.TemperatureSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    monkeypatch.setattr(lslo.demo, "TemperatureSampler", RecordedSampler)  # where pretraining draws from
    bench = make_benchmark(tmp_path / "small", seed=3, bitext_scale=0.02)
    assert len(read_bitext(bench)[("h1", "v1")][0]) == 4  # 200 * 0.02
    out = pretrain_demo_model(bench, tmp_path / "model", max_steps=2, vocab_size=600,
                              d_model=32, layers=1, ffn_dim=64, max_tokens=512, temperature=2.0)
    # Directions are drawn with p ~ size^(1/2), not in proportion to size: h1-v1 (4 pairs) against h1-h2 (400).
    (sampler,) = samplers
    probs = sampler.probs
    assert probs[("h1", "v1")] / probs[("h1", "h2")] == pytest.approx((4 / 400) ** 0.5)
    assert read_json(out / "pretrain.json")["settings"]["temperature"] == 2.0
    assert read_json(out / "pretrain.json")["steps"] == 2  # train.max_updates, the demo's pretrain_steps
    assert read_json(out / "pretrain.json")["stopped"] == "max_updates"
    model = M2M100ForConditionalGeneration.from_pretrained(out).eval()
    tokenizer = load_tokenizer(out)
    assert tokenizer.languages == read_language_table(bench / "languages.tsv")["code"].tolist()
    assert model.generation_config.decoder_start_token_id == tokenizer.eos_token_id
    tokenizer.src_lang = "h2"
    batch = tokenizer(["sor zagaw", "ci"], return_tensors="pt", padding=True)
    prefix = torch.tensor([[tokenizer.eos_token_id, tokenizer.get_lang_id("v1")]] * 2)
    out_ids = model.generate(**batch, decoder_input_ids=prefix, max_new_tokens=5, num_beams=2)
    assert out_ids.shape[0] == 2 and (out_ids[:, 1] == tokenizer.get_lang_id("v1")).all()
    directions, groups = zero_shot_report(out, bench, n_sentences=2, languages=["h1", "m1", "v1"])
    assert len(directions) == 6
    assert list(groups["pair"]) == ["H2M", "H2V", "M2H", "M2V", "V2H", "V2M", "AVG"]


def test_pretraining_loss_is_torchs_label_smoothing_through_the_one_loss():
    """Demo pretraining runs the stages' loss (fairseq's ε over the V - 1 non-gold tokens, summed, divided by the
    target tokens); the ε it passes makes it torch's cross_entropy(label_smoothing=0.1), the demo's loss."""
    import torch.nn.functional as F

    from lslo.demo import demo_model_config, pretrain_options
    from lslo.train import label_smoothed_nll_loss

    config = demo_model_config(vocab_size=37, pad_id=1, bos_id=0, eos_id=2, d_model=16, layers=1, ffn_dim=32, heads=2)
    options = pretrain_options(config, seed=1, max_tokens=64, lr=1e-3, warmup=4, label_smoothing=0.1,
                               temperature=2.0, max_steps=3)
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 37, dtype=torch.float64)
    target = torch.randint(0, 37, (4, 6))
    target[1, 4:] = -100
    loss, _ = label_smoothed_nll_loss(logits, target, options.label_smoothing)
    expected = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, label_smoothing=0.1)
    assert (loss / (target != -100).sum()).item() == pytest.approx(expected.item(), rel=1e-12)
    # the model's own dropout, no AMP, the demo's clipping
    assert (options.dropout, options.attention_dropout, options.activation_dropout) == (0.1, 0.0, 0.0)
    assert options.clip_norm == 1.0 and options.amp is False
