"""FLORES readers, parallel tables, temperature sampling, token-budget batches, collate."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right  # noqa: E402

from lslo.data import (  # noqa: E402
    Corpus, Example, TemperatureSampler, collate, directions, make_batches, prepare_data,
    read_flores, read_parallel, temperature_probs,
)
from lslo.errors import LsloError  # noqa: E402
from lslo.train import TrainOptions, epoch_plan  # noqa: E402
from lslo.languages import read_language_table  # noqa: E402
from lslo.tokenizer import build_tokenizer  # noqa: E402

TABLE_PATH = Path(__file__).resolve().parents[1] / "config" / "languages.tsv"
LANGS = ["en", "fr", "oc"]
SYLLABLES = {"en": ["the", "cat", "sat", "on", "mat"], "fr": ["le", "chat", "assis", "sur", "tapis"],
             "oc": ["lo", "cat", "sus", "la", "estòra"]}


def sentences(code, n, seed):
    rng = random.Random(f"{code}-{seed}")
    return [" ".join(rng.choice(SYLLABLES[code]) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def write_flores(root, layout, table, n_dev=20, n_devtest=15):
    """FLORES files for LANGS: flores101 = <split>/<flores101>.<split>, floresplus = <split>/<split>.<flores200>."""
    for split, n in (("dev", n_dev), ("devtest", n_devtest)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for code in LANGS:
            lines = sentences(code, n, split)
            lines[0] = f'tab\there "quoted" back\\slash {code}'  # TSV round-trip hazards
            name = (f"{table.loc[code, 'flores101']}.{split}" if layout == "flores101"
                    else f"{split}.{table.loc[code, 'flores200']}")
            (root / split / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def table():
    return read_language_table(TABLE_PATH)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(s for c in LANGS for s in sentences(c, 200, "spm")) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=40,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    return build_tokenizer(directory / "sp.model", LANGS, directory / "tokenizer")


@pytest.mark.parametrize("layout", ["flores101", "floresplus"])
def test_read_flores_both_layouts(tmp_path, table, layout):
    root = write_flores(tmp_path / "flores", layout, table)
    for given in (layout, "auto"):
        train = read_flores(root, LANGS, table, "train", given)
        test = read_flores(root, LANGS, table, "test", given)
        assert list(train.columns) == ["id", *LANGS] and len(train) == 20 and len(test) == 15
        assert train["fr"].tolist()[1:] == sentences("fr", 20, "dev")[1:]
        assert test["oc"].tolist()[1:] == sentences("oc", 15, "devtest")[1:]


def test_prepare_data_round_trips_special_characters(tmp_path, table):
    root = write_flores(tmp_path / "flores", "flores101", table)
    out = tmp_path / "results" / "data"
    prepare_data(root, "auto", TABLE_PATH, LANGS, out / "train.tsv", out / "test.tsv")
    train = read_parallel(out / "train.tsv")
    assert train.equals(read_flores(root, LANGS, table, "train", "flores101"))
    assert train.loc[0, "en"] == 'tab\there "quoted" back\\slash en'
    assert read_parallel(out / "test.tsv", ["oc", "en"]).columns.tolist() == ["id", "oc", "en"]
    with pytest.raises(LsloError, match=r"no column for language\(s\) \['wo'\]"):
        read_parallel(out / "test.tsv", ["wo"])


def _bad_input(root, case):
    if case == "missing":
        (root / "devtest" / "oci.devtest").unlink()
        return [str(root / "devtest" / "oci.devtest"), "'oc'"]
    if case == "unequal":
        path = root / "devtest" / "fra.devtest"
        path.write_text("\n".join(path.read_text(encoding="utf-8").splitlines()[:-2]) + "\n", encoding="utf-8")
        return [str(root / "devtest" / "eng.devtest"), "15", str(path), "13"]
    if case == "empty":
        path = root / "dev" / "oci.dev"
        lines = path.read_text(encoding="utf-8").splitlines()
        lines[6] = " "
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [str(path), "line 7"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "unequal", "empty"])
def test_bad_flores_input_names_file_and_writes_nothing(tmp_path, table, case):
    root = write_flores(tmp_path / "flores", "flores101", table)
    expected = _bad_input(root, case)
    out = tmp_path / "results" / "data"
    with pytest.raises(LsloError) as err:
        prepare_data(root, "flores101", TABLE_PATH, LANGS, out / "train.tsv", out / "test.tsv")
    assert all(part in str(err.value) for part in expected), str(err.value)
    assert not (out / "train.tsv").exists() and not (out / "test.tsv").exists()


def write_floresplus(root, table, texts: dict):
    """FLORES+ hub layout: <split>/<flores200>.jsonl records, here in reverse id order. texts: {code: {id: text}}
    for devtest; dev gets the same."""
    import json

    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for code, by_id in texts.items():
            records = [json.dumps({"id": i, "text": text}, ensure_ascii=False) for i, text in by_id.items()]
            (root / split / f"{table.loc[code, 'flores200']}.jsonl").write_text(
                "\n".join(reversed(records)) + "\n", encoding="utf-8")
    return root


def test_floresplus_rows_are_aligned_by_sentence_id(tmp_path, table):
    """Two languages that each lack a different id have equal line counts; sorted and paired by position, en
    sentence 3 would stand beside fr sentence 4. Refused, naming the language, the split and the ids."""
    en = {i: f"english {i}" for i in (0, 1, 2, 4, 5)}   # lacks id 3
    fr = {i: f"francais {i}" for i in (0, 1, 3, 4, 5)}  # lacks id 2
    root = write_floresplus(tmp_path / "plus", table, {"en": en, "fr": fr})
    with pytest.raises(LsloError) as err:
        read_flores(root, ["en", "fr"], table, "test", "floresplus")
    assert "split devtest: language 'en' lacks sentence id(s) [3] that language 'fr' has" in str(err.value)
    en = {i: f"english {i}" for i in range(12)}
    fr = {i: f"francais {i}" for i in range(12) if i % 2 == 0}  # fewer lines: the ids, not the counts, are named
    root = write_floresplus(tmp_path / "half", table, {"en": en, "fr": fr})
    with pytest.raises(LsloError, match=r"split dev: language 'fr' lacks sentence id\(s\) \[1, 3, 5, 7, 9\] and 1 "
                       "more that language 'en' has"):
        read_flores(root, ["en", "fr"], table, "train", "floresplus")
    fr = {i: f"francais {i}" for i in range(6)}
    en = {i: f"english {i}" for i in range(6)}
    test = read_flores(write_floresplus(tmp_path / "full", table, {"en": en, "fr": fr}), ["en", "fr"], table,
                       "test", "floresplus")
    assert [(e.split()[1], f.split()[1]) for e, f in zip(test["en"], test["fr"])] == [(str(i), str(i))
                                                                                    for i in range(6)]


@pytest.mark.parametrize("text, what", [("one\rtwo", "carriage return (CR) inside the sentence at character 4"),
                                        ("one\ntwo", "line feed (LF) inside the sentence at character 4"),
                                        ("  ", "is empty")])
def test_floresplus_text_gets_the_line_checks(tmp_path, table, text, what):
    """A CR inside a jsonl text used to reach the data stage's TSV and crash training later with
    "invalid literal for int()"; it is refused like a CR inside a line of a text file, naming file and id."""
    texts = {"en": {i: f"english {i}" for i in range(4)}, "fr": {i: f"francais {i}" for i in range(4)}}
    texts["fr"][2] = text
    root = write_floresplus(tmp_path / "plus", table, texts)
    with pytest.raises(LsloError) as err:
        read_flores(root, ["en", "fr"], table, "train", "floresplus")
    assert f"{root / 'dev' / 'fra_Latn.jsonl'}: sentence id 2" in str(err.value) and what in str(err.value)
    assert "(language 'fr')" in str(err.value)


def test_floresplus_file_that_is_not_utf8_is_refused_with_its_offset(tmp_path, table):
    """A jsonl file gets the encoding check of a text file: one line naming file, line and offset, not a
    UnicodeDecodeError traceback in the data job's log."""
    root = write_floresplus(tmp_path / "plus", table, {"en": {0: "english 0"}, "fr": {0: "francais 0"}})
    path = root / "dev" / "fra_Latn.jsonl"
    path.write_bytes(b'{"id": 0, "text": "caf\xe9"}\n')
    message = r"fra_Latn.jsonl: line 1: byte 0xe9 at offset 22 is not UTF-8 \(language 'fr'\)"  # b'{"id": 0, ..."caf'
    with pytest.raises(LsloError, match=message):
        read_flores(root, ["en", "fr"], table, "train", "floresplus")


def test_unknown_language_and_layout(tmp_path, table):
    root = write_flores(tmp_path / "flores", "flores101", table)
    with pytest.raises(LsloError, match="'xx'"):
        prepare_data(root, "auto", TABLE_PATH, ["en", "xx"], tmp_path / "a.tsv", tmp_path / "b.tsv")
    with pytest.raises(LsloError, match="no FLORES layout found for language 'en'"):
        read_flores(tmp_path, LANGS, table, "train")
    with pytest.raises(LsloError, match="unknown FLORES layout 'flores99'"):
        read_flores(root, LANGS, table, "train", "flores99")


def test_directions():
    pairs = directions(["a", "b", "c", "d"])
    assert len(pairs) == 12 == len(set(pairs)) and all(s != t for s, t in pairs)


def test_temperature_probs_by_hand():
    sizes = {("en", "fr"): 1000, ("en", "oc"): 10, ("fr", "oc"): 90}
    probs = temperature_probs(sizes, temperature=5)
    total = 1100
    raw = [(1000 / total) ** 0.2, (10 / total) ** 0.2, (90 / total) ** 0.2]
    assert np.allclose(list(probs.values()), [r / sum(raw) for r in raw], atol=1e-12)
    assert np.allclose(list(temperature_probs(sizes, 1).values()), [1000 / total, 10 / total, 90 / total])
    with pytest.raises(LsloError):
        temperature_probs(sizes, 0)


def test_sampler_counts_follow_probs_and_resume():
    sizes = {("en", "fr"): 1000, ("en", "oc"): 10, ("fr", "oc"): 90}
    sampler = TemperatureSampler(sizes, temperature=5, seed=3)
    epoch = sampler.epoch()
    assert len(epoch) == 1100
    for direction, p in sampler.probs.items():
        count = sum((e.src, e.tgt) == direction for e in epoch)
        assert abs(count - p * 1100) < 1
        ids = [e.index for e in epoch if (e.src, e.tgt) == direction]
        assert max(ids) < sizes[direction]
        # an upsampled direction goes through all its data before repeating a sentence
        assert np.bincount(ids, minlength=sizes[direction]).max() - np.bincount(ids).min() <= 1
    state = sampler.state_dict()
    following = sampler.epoch()
    sampler.load_state_dict(state)
    assert sampler.epoch() == following != epoch
    assert TemperatureSampler(sizes, 5, seed=3).epoch() == epoch


def test_equal_sizes_give_each_sentence_once_per_direction():
    sampler = TemperatureSampler({d: 7 for d in directions(LANGS)}, seed=0)
    epoch = sampler.epoch()
    assert sorted(epoch) == sorted(Example(i, s, t) for s, t in directions(LANGS) for i in range(7))


@pytest.fixture(scope="module")
def train_table(tmp_path_factory, table):
    root = write_flores(tmp_path_factory.mktemp("flores"), "flores101", table, n_dev=40)
    return read_flores(root, LANGS, table, "train")


@pytest.fixture(scope="module")
def corpus(train_table, tokenizer):
    return Corpus.multiparallel(train_table, LANGS, tokenizer)


@pytest.mark.parametrize("mixed", [True, False])
def test_batches_respect_token_budget(corpus, tokenizer, mixed):
    sampler = TemperatureSampler(corpus.sizes(), seed=1)
    examples = sampler.epoch()
    batches = make_batches(examples, corpus, max_tokens=64, mixed=mixed, rng=np.random.default_rng(0))
    assert sorted(e for b in batches for e in b) == sorted(examples)
    if not mixed:
        assert all(len({(e.src, e.tgt) for e in b}) == 1 for b in batches)
    else:
        assert any(len({(e.src, e.tgt) for e in b}) > 1 for b in batches)
    for batch in batches:
        tensors = collate(batch, corpus, tokenizer, LANGS)
        size = len(batch) * max(tensors["input_ids"].shape[1], tensors["labels"].shape[1])
        assert size <= 64
    with pytest.raises(LsloError, match="more than max_tokens=3"):
        make_batches(examples, corpus, max_tokens=3)


def test_collate_matches_tokenizer_and_model_shift(corpus, tokenizer, train_table):
    batch = [Example(3, "en", "oc"), Example(5, "oc", "fr"), Example(0, "fr", "en")]
    tensors = collate(batch, corpus, tokenizer, LANGS)
    assert tensors["src_lang"].tolist() == [0, 2, 1] and tensors["tgt_lang"].tolist() == [2, 1, 0]
    for row, e in enumerate(batch):
        src_text, tgt_text = train_table.loc[e.index, e.src], train_table.loc[e.index, e.tgt]
        tokenizer.src_lang, tokenizer.tgt_lang = e.src, e.tgt
        reference = tokenizer(src_text, text_target=tgt_text)
        n_src, n_tgt = len(reference["input_ids"]), len(reference["labels"])
        assert tensors["input_ids"][row, :n_src].tolist() == reference["input_ids"]
        assert tensors["attention_mask"][row].tolist() == [1] * n_src + [0] * (tensors["input_ids"].shape[1] - n_src)
        assert tensors["labels"][row, :n_tgt].tolist() == reference["labels"]
        assert (tensors["labels"][row, n_tgt:] == -100).all() and (tensors["input_ids"][row, n_src:] == 1).all()
    decoder_inputs = shift_tokens_right(tensors["labels"], tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert decoder_inputs[:, 0].tolist() == [2, 2, 2]
    assert decoder_inputs[:, 1].tolist() == [tokenizer.get_lang_id(e.tgt) for e in batch]
    assert tensors["n_tokens"] == int((tensors["labels"] != -100).sum())


def test_epoch_plans_are_deterministic_per_seed_and_epoch(corpus):
    """A training epoch's batches (lslo.train.epoch_plan, the one batch pipeline) are a function of (seed, epoch)."""
    def run(seed, epoch):
        options = TrainOptions(seed=seed, max_tokens=80)
        return [[(e.src, e.tgt, e.index) for e in batch] for batch in epoch_plan(corpus, options, epoch)]
    assert run(7, 1) == run(7, 1) != run(8, 1)
    assert run(7, 1) != run(7, 2)


def test_unequal_direction_sizes(tokenizer):
    ids = tokenizer(["the cat", "le chat", "sat on"], add_special_tokens=False)["input_ids"]
    corpus = Corpus({("en", "fr"): ([ids[0]] * 50, [ids[1]] * 50), ("fr", "en"): ([ids[1]] * 2, [ids[2]] * 2)})
    sampler = TemperatureSampler(corpus.sizes(), temperature=1, seed=0)
    assert sum(e.src == "fr" for e in sampler.epoch()) == 2
    with pytest.raises(LsloError, match="2 sources but 1 targets"):
        Corpus({("en", "fr"): ([ids[0]] * 2, [ids[1]])})
