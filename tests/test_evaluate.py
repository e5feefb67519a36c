"""Evaluation: spBLEU equals sacrebleu's flores101 tokenizer, AVG over directions (Table 1), decoding."""

import json
import random

import pandas as pd
import pytest
import sacrebleu
import sentencepiece
import torch

from lslo import evaluate, inference, metrics
from lslo.data import write_parallel
from lslo.errors import LsloError

WORDS = ("maison chat chien rouge grand petit mange voit ville rivière arbre soleil lune eau feu terre "
         "Haus Katze Hund rot groß klein isst sieht Stadt Fluss Baum Sonne Mond Wasser Feuer Erde").split()
LANGS = ["en", "fr", "oc"]
TABLE = pd.DataFrame({"code": LANGS, "resource": ["H", "H", "V"]}).set_index("code", drop=False)


def sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", " ?", "!"])
            for _ in range(n)]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A small SentencePiece model trained here (stands in for the FLORES-101 spm, never downloaded)."""
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(sentences(2000, seed=0)) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "flores"), vocab_size=60,
                                             hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
                                             minloglevel=2)
    return root / "flores.model"


@pytest.fixture
def sacrebleu_flores101(spm_model, tmp_path, monkeypatch):
    """Put our spm where sacrebleu's flores101 tokenizer looks for it: $SACREBLEU/models/<url basename>."""
    from sacrebleu.tokenizers import tokenizer_spm

    name = tokenizer_spm.SPM_MODELS["flores101"]["url"].rsplit("/", 1)[1]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / name).write_bytes(spm_model.read_bytes())
    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer_spm, "download_file", lambda *a, **k: pytest.fail("sacrebleu tried to download"))


def noisy(refs, seed, p):
    rng = random.Random(seed)
    out = []
    for ref in refs:
        words = [w if rng.random() > p else rng.choice(WORDS) for w in ref.split()]
        out.append(" ".join(words))
    return out


@pytest.mark.parametrize("seed,p", [(1, 0.0), (2, 0.2), (3, 0.5), (4, 0.9)])
def test_spbleu_equals_sacrebleu_flores101(spm_model, sacrebleu_flores101, seed, p):
    refs = sentences(40, seed=100 + seed)
    hyps = noisy(refs, seed, p)
    reference = sacrebleu.BLEU(tokenize="flores101").corpus_score(hyps, [refs])
    ours = metrics.spbleu(hyps, refs, spm_model)
    assert ours.score == pytest.approx(reference.score, abs=1e-9)
    assert ours.counts == reference.counts and ours.sys_len == reference.sys_len


def test_aggregate_avg_is_mean_over_directions_table1_pretrain():
    """Table 1 Pretrain: group cells over lang12 (4 H, 4 M, 4 V) average to 12.26 over the 132 directions."""
    cells = {"H2H": 31.76, "H2M": 20.06, "H2V": 5.56, "M2H": 20.71, "M2M": 17.12, "M2V": 3.47,
             "V2H": 9.24, "V2M": 5.03, "V2V": 0.52}
    langs = {g: [f"{g.lower()}{i}" for i in range(4)] for g in "HMV"}
    rows, rng = [], random.Random(0)
    for pair, mean in cells.items():
        src_group, tgt_group = pair.split("2")
        dirs = [(s, t) for s in langs[src_group] for t in langs[tgt_group] if s != t]
        noise = [rng.uniform(-1, 1) for _ in dirs]
        noise = [x - sum(noise) / len(noise) for x in noise]  # per-direction scores whose mean is the cell
        rows += [{"src": s, "tgt": t, "src_group": src_group, "tgt_group": tgt_group, "pair": pair,
                  "spbleu": mean + x, "chrf": 2 * mean, "n": 10} for (s, t), x in zip(dirs, noise)]
    groups = metrics.aggregate(pd.DataFrame(rows)).set_index("pair")
    assert list(groups.index) == [*cells, "AVG"]
    assert groups.loc["H2H", "n_directions"] == 12 and groups.loc["H2M", "n_directions"] == 16
    for pair, mean in cells.items():
        assert groups.loc[pair, "spbleu"] == pytest.approx(mean)
    assert groups.loc["AVG", "n_directions"] == 132
    assert round(groups.loc["AVG", "spbleu"], 2) == 12.26
    assert round(sum(cells.values()) / len(cells), 2) != 12.26  # the mean over cells would be wrong


def write_test_table(path, n=12):
    base = sentences(n, seed=7)
    table = pd.DataFrame({"id": range(n), **{lang: [f"{lang} {s}" for s in base] for lang in LANGS}})
    write_parallel(table, path)
    return table


def write_hyps(path, table, directions, p=0.3, drop=0):
    rows = []
    for k, (src, tgt) in enumerate(directions):
        hyps = noisy(table[tgt].tolist(), seed=src + tgt, p=p)
        rows += [(src, tgt, i, h) for i, h in zip(table["id"], hyps)][drop:]
    pd.DataFrame(rows, columns=evaluate.HYP_COLUMNS).to_csv(path, index=False, **evaluate._TSV)


def test_score_variant_matches_sacrebleu(tmp_path, spm_model, sacrebleu_flores101):
    table = write_test_table(tmp_path / "test.tsv")
    directions = [(s, t) for s in LANGS for t in LANGS if s != t]
    write_hyps(tmp_path / "a.tsv", table, directions[:4])
    write_hyps(tmp_path / "b.tsv", table, directions[4:])
    groups = evaluate.score_variant([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "test.tsv", TABLE,
                                    spm_model, tmp_path / "directions.tsv", tmp_path / "groups.tsv", label="x")
    scored = pd.read_csv(tmp_path / "directions.tsv", sep="\t")
    assert list(scored.columns) == evaluate.DIRECTION_COLUMNS and len(scored) == 6
    for k, (src, tgt) in enumerate(directions):
        hyps, refs = noisy(table[tgt].tolist(), seed=src + tgt, p=0.3), table[tgt].tolist()
        row = scored[(scored.src == src) & (scored.tgt == tgt)].iloc[0]
        assert row.spbleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="flores101").score, abs=1e-4)
        assert row.chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score, abs=1e-4)
        assert row.pair == f"{TABLE.loc[src, 'resource']}2{TABLE.loc[tgt, 'resource']}"
    assert list(groups.pair) == ["H2H", "H2V", "V2H", "AVG"]
    assert groups.set_index("pair").loc["AVG", "spbleu"] == pytest.approx(scored.spbleu.mean())
    signature = json.loads((tmp_path / "groups.signature.json").read_text())
    assert "flores.model" in signature["spbleu"] and "nrefs:1" in signature["spbleu"]


def test_score_variant_errors(tmp_path, spm_model):
    table = write_test_table(tmp_path / "test.tsv")
    directions = [(s, t) for s in LANGS for t in LANGS if s != t]
    outs = (tmp_path / "d.tsv", tmp_path / "g.tsv")
    write_hyps(tmp_path / "partial.tsv", table, directions[:-1])
    with pytest.raises(LsloError, match="no hypotheses for direction oc-fr"):
        evaluate.score_variant([tmp_path / "partial.tsv"], tmp_path / "test.tsv", TABLE, spm_model, *outs)
    write_hyps(tmp_path / "short.tsv", table, directions, drop=1)
    with pytest.raises(LsloError, match="11 hypotheses for 12 test sentences"):
        evaluate.score_variant([tmp_path / "short.tsv"], tmp_path / "test.tsv", TABLE, spm_model, *outs)
    with pytest.raises(LsloError, match="missing.model"):
        evaluate.score_variant([tmp_path / "short.tsv"], tmp_path / "test.tsv", TABLE, tmp_path / "missing.model",
                               *outs)
    assert not outs[0].exists() and not outs[1].exists()


def test_shard_directions_is_a_deterministic_partition():
    directions = [(s, t) for s in "abcde" for t in "abcde" if s != t]
    shards = evaluate.shard_directions(list(reversed(directions)), 3)
    assert shards == evaluate.shard_directions(directions, 3)
    assert sorted(d for shard in shards for d in shard) == sorted(directions)
    assert [len(s) for s in shards] == [7, 7, 6]


def test_make_decoding_batches_respects_token_budget():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30]
    batches = inference.make_decoding_batches(lengths, max_tokens=24)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 24
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)


@pytest.fixture(scope="module")
def pretrain_variant(tmp_path_factory, spm_model):
    """A tiny random M2M100 with a real tokenizer, saved as an HF dir, and its variant.json (method pretrain)."""
    from conftest import make_tiny_config
    from transformers import M2M100ForConditionalGeneration

    from lslo.tokenizer import build_tokenizer, model_vocab_size

    root = tmp_path_factory.mktemp("variant")
    tokenizer = build_tokenizer(spm_model, LANGS, root / "base")
    torch.manual_seed(0)
    config = make_tiny_config(vocab_size=model_vocab_size(tokenizer), init_std=0.5)
    M2M100ForConditionalGeneration(config).save_pretrained(root / "base")
    (root / "variant.json").write_text(json.dumps({"method": "pretrain", "base_model": str(root / "base"),
                                                   "adapters": None, "model": None, "languages": LANGS}))
    return root / "variant.json"


def test_decode_shard_mixed_equals_single_direction(tmp_path, pretrain_variant):
    table = write_test_table(tmp_path / "test.tsv", n=4)
    directions = [("en", "fr"), ("fr", "oc"), ("oc", "en")]
    translator = inference.load_variant(pretrain_variant, device="cpu")
    options = dict(options=inference.DecodingOptions(beam=5, max_tokens=150, max_len_b=6), translator=translator)
    mixed = evaluate.decode_shard(pretrain_variant, tmp_path / "test.tsv", directions, tmp_path / "mixed.tsv",
                                  **options)
    written = pd.read_csv(tmp_path / "mixed.tsv", dtype=str, keep_default_na=False, **evaluate._TSV)
    assert list(written.columns) == evaluate.HYP_COLUMNS and len(written) == len(directions) * len(table)
    assert set(zip(written.src, written.tgt, written.id)) == {
        (s, t, str(i)) for s, t in directions for i in table["id"]}
    assert (written.hyp.str.len() > 0).all()
    for src, tgt in directions:
        alone = evaluate.decode_shard(pretrain_variant, tmp_path / "test.tsv", [(src, tgt)],
                                      tmp_path / f"{src}-{tgt}.tsv", **options)
        together = mixed[(mixed.src == src) & (mixed.tgt == tgt)]
        assert dict(zip(alone.id, alone.hyp)) == dict(zip(together.id, together.hyp))
    # the target language really steers decoding (the decoder prefix carries it)
    assert mixed[mixed.src == "en"].hyp.tolist() != \
        evaluate.decode_shard(pretrain_variant, tmp_path / "test.tsv", [("en", "oc")], tmp_path / "x.tsv",
                              **options).hyp.tolist()


@pytest.fixture(scope="module")
def lslo_variant(pretrain_variant):
    """Random (non-zero B) language-specific adapters on the tiny base, saved with save_adapters."""
    from transformers import M2M100ForConditionalGeneration

    from lslo.adapters import save_adapters
    from lslo.model import LSLoSpec, inject_lslo

    root = pretrain_variant.parent
    base = M2M100ForConditionalGeneration.from_pretrained(root / "base")
    model = inject_lslo(base, LSLoSpec(languages=LANGS, ranks={"en": 2, "fr": 2, "oc": 4}))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.normal_(0, 0.5)
    save_adapters(model, root / "adapters.safetensors", base_model=str(root / "base"))
    (root / "lslo.json").write_text(json.dumps({"method": "lslo", "base_model": str(root / "base"),
                                                "adapters": str(root / "adapters.safetensors"), "model": None,
                                                "languages": LANGS}))
    return root / "lslo.json"


def test_decode_shard_lslo_variant(tmp_path, pretrain_variant, lslo_variant):
    write_test_table(tmp_path / "test.tsv", n=4)
    directions = [("en", "oc"), ("oc", "fr")]
    translator = inference.load_variant(lslo_variant, device="cpu")
    assert translator.is_lslo and translator.languages == LANGS
    options = dict(options=inference.DecodingOptions(beam=5, max_tokens=150, max_len_b=6), translator=translator)
    mixed = evaluate.decode_shard(lslo_variant, tmp_path / "test.tsv", directions, tmp_path / "m.tsv", **options)
    for src, tgt in directions:
        alone = evaluate.decode_shard(lslo_variant, tmp_path / "test.tsv", [(src, tgt)], tmp_path / "a.tsv",
                                      **options)
        together = mixed[(mixed.src == src) & (mixed.tgt == tgt)]
        assert dict(zip(alone.id, alone.hyp)) == dict(zip(together.id, together.hyp))
    plain = evaluate.decode_shard(pretrain_variant, tmp_path / "test.tsv", directions, tmp_path / "p.tsv",
                                  inference.DecodingOptions(beam=5, max_tokens=150, max_len_b=6), device="cpu")
    assert plain.hyp.tolist() != mixed.hyp.tolist()  # the adapters change the translations


def test_make_decoding_batches_keeps_keys_apart():
    """With keys (the evaluate stage passes target languages) no batch mixes two keys, every sample is decoded
    once, and within a key the budget and the length order still hold."""
    lengths = [5, 9, 3, 12, 7, 7, 2, 30, 4, 4, 6]
    keys = ["fr", "de", "fr", "de", "oc", "fr", "de", "fr", "oc", "oc", "de"]
    batches = inference.make_decoding_batches(lengths, max_tokens=24, keys=keys)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len({keys[i] for i in batch}) == 1
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 24
    for key in set(keys):
        flat = [lengths[i] for b in batches for i in b if keys[i] == key]
        assert flat == sorted(flat)
    # without the key, 8 of these samples would share batches across languages
    assert any(len({keys[i] for i in b}) > 1 for b in inference.make_decoding_batches(lengths, max_tokens=24))
    with pytest.raises(LsloError, match="2 keys for 11 samples"):
        inference.make_decoding_batches(lengths, 24, keys=["fr", "de"])
