"""Bringing a model directory: NLLB-200 tokenizers, build_tokenizer beside a model, `lslo check-model`, the FLORES+
layout and layout detection (docs/your-model.md)."""

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
from model_dirs import (  # noqa: E402
    make_m2m100_model_dir, make_nllb_model_dir, syllable_sentences, tiny_config, train_spm,
)
from transformers import M2M100ForConditionalGeneration, NllbTokenizer  # noqa: E402

from lslo.check_model import check_model, workflow_problems  # noqa: E402
from lslo.cli import main  # noqa: E402
from lslo.errors import LsloError  # noqa: E402
from lslo.languages import read_language_table  # noqa: E402
from lslo.tokenizer import NllbCodes, build_tokenizer, load_tokenizer  # noqa: E402

NLLB = {"en": "eng_Latn", "fr": "fra_Latn", "oc": "oci_Latn"}
TABLE_TEXT = ("code\tresource\tflores200\tnllb\tsubsets\n"
              "en\tH\teng_Latn\teng_Latn\tmine\nfr\tH\tfra_Latn\tfra_Latn\tmine\noc\tV\toci_Latn\toci_Latn\tmine\n"
              "jv\tL\tjav_Latn\tjav_Latn\t\n")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def nllb_dir(tmp_path_factory, spm_model):
    return make_nllb_model_dir(tmp_path_factory.mktemp("nllb") / "model", list(NLLB.values()), spm_model=spm_model)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "languages.tsv"
    path.write_text(TABLE_TEXT, encoding="utf-8")
    return read_language_table(path)


# ------------------------------------------------------------------------------------------- NLLB tokenizer

def test_nllb_batches_equal_transformers_nllb_encoding(nllb_dir):
    """collate (training) and Translator.encode (decoding) build exactly what transformers' NllbTokenizer
    builds with src_lang/tgt_lang: [eng_Latn] tokens </s> and labels [fra_Latn] tokens </s>."""
    from lslo.data import Corpus, Example, collate
    from lslo.inference import Translator

    tokenizer = load_tokenizer(nllb_dir, NLLB)
    assert isinstance(tokenizer, NllbCodes) and tokenizer.lang_code_to_id == {
        code: tokenizer.convert_tokens_to_ids(nllb) for code, nllb in NLLB.items()}
    source, target = syllable_sentences(2, seed=3)
    reference = NllbTokenizer.from_pretrained(str(nllb_dir), src_lang="eng_Latn", tgt_lang="fra_Latn")
    expected = reference(source, text_target=target)
    corpus = Corpus.multiparallel(pd.DataFrame({"en": [source], "fr": [target]}), ["en", "fr"], tokenizer)
    batch = collate([Example(0, "en", "fr")], corpus, tokenizer, ["en", "fr"])
    assert batch["input_ids"][0].tolist() == expected["input_ids"]
    assert batch["labels"][0].tolist() == expected["labels"]
    translator = Translator(model=None, tokenizer=tokenizer, languages=["en", "fr"], is_lslo=False)
    assert translator.encode(source, "en") == expected["input_ids"]
    assert tokenizer.batch_decode([expected["labels"]], skip_special_tokens=True) == [target]


def test_nllb_codes_unknown_and_legacy(tmp_path, nllb_dir):
    tokenizer = load_tokenizer(nllb_dir, {**NLLB, "de": "deu_Latn"})
    assert "de" not in tokenizer.lang_code_to_id
    with pytest.raises(LsloError, match="'de'.*'deu_Latn' is not a language token"):
        tokenizer.src_lang = "de"
    assert load_tokenizer(nllb_dir).lang_code_to_id.keys() == set(NLLB.values())  # NLLB codes as codes
    legacy = tmp_path / "legacy"
    shutil.copytree(nllb_dir, legacy)
    config = json.loads((legacy / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**config, "legacy_behaviour": True}))
    with pytest.raises(LsloError, match="legacy_behaviour"):
        load_tokenizer(legacy, NLLB)
    with pytest.raises(LsloError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------- build_tokenizer

def test_build_tokenizer_beside_a_model_keeps_its_files(tmp_path, spm_model):
    model_dir = tmp_path / "model"
    M2M100ForConditionalGeneration(tiny_config(64)).save_pretrained(model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    tokenizer = build_tokenizer(spm_model, ["en", "xx"], model_dir)
    after = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert {name: after[name] for name in before} == before  # config.json, model.safetensors untouched
    assert "vocab.json" in after and load_tokenizer(model_dir).lang_code_to_id == tokenizer.lang_code_to_id
    with pytest.raises(LsloError, match="already holds tokenizer file"):
        build_tokenizer(spm_model, ["en", "yy"], model_dir)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == after
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


# ------------------------------------------------------------------------------------------- check-model

def test_check_model_reports_a_good_directory(nllb_dir, table):
    report = check_model(nllb_dir, ["en", "fr", "oc"], table)
    assert report.ok, report.problems
    text = "\n".join(report.facts)
    loaded = M2M100ForConditionalGeneration.from_pretrained(nllb_dir)
    n = sum(p.numel() for p in loaded.parameters())
    assert f"parameters: {n:,} ({n * 4 / 2**20:.2f} MiB in float32" in text
    assert "language tokens: en=eng_Latn, fr=fra_Latn, oc=oci_Latn" in text
    assert "NLLB (NllbTokenizer" in text and "decoder start: id 2" in text and "M2M100Config" in text


def _broken(tmp_path, source, case):
    broken = tmp_path / case
    shutil.copytree(source, broken)
    if case == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "sentencepiece.bpe.model"):
            (broken / name).unlink()
        return "not a tokenizer directory"
    if case == "missing-weight":
        from safetensors.torch import load_file, save_file

        state = load_file(broken / "model.safetensors")
        del state["model.encoder.layers.1.fc2.weight"]
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
        return "1 weight(s) missing, e.g. ['model.encoder.layers.1.fc2.weight']"
    if case == "decoder-start":
        config = json.loads((broken / "generation_config.json").read_text())
        (broken / "generation_config.json").write_text(json.dumps({**config, "decoder_start_token_id": 0}))
        return "decoder_start_token_id is 0, config.json says 2"
    if case == "no-weights":
        (broken / "model.safetensors").unlink()
        return "no model weights"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no-tokenizer", "missing-weight", "decoder-start", "no-weights"])
def test_check_model_names_each_problem_on_one_line(tmp_path, nllb_dir, table, case, capsys):
    expected = _broken(tmp_path, nllb_dir, case)
    report = check_model(tmp_path / case, ["en", "fr"], table)
    assert len(report.problems) == 1 and expected in report.problems[0], report.problems
    table_path = table.attrs["path"]
    assert main(["check-model", str(tmp_path / case), "--languages", "en,fr", "--language-table", table_path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("problem")] == [f"problem  {report.problems[0]}"]
    assert all("\n" not in p for p in report.problems)


def test_check_model_languages_and_cli(nllb_dir, table, tmp_path, capsys):
    table_path = table.attrs["path"]
    assert main(["check-model", str(nllb_dir), "--languages", "mine", "--language-table", table_path]) == 0
    assert "language tokens: en=eng_Latn, fr=fra_Latn, oc=oci_Latn" in capsys.readouterr().out
    report = check_model(nllb_dir, ["en", "jv"], table)
    assert report.problems == ["language 'jv': the tokenizer has no language token 'jav_Latn'"]
    m2m = make_m2m100_model_dir(tmp_path / "m2m", ["en", "fr"])
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {m2m}\ndata: {{languages: [en, fr, oc], language_table: {table_path}}}\n")
    assert main(["check-model", "--config", str(config)]) == 1
    assert "problem  language 'oc': the tokenizer has no language token '__oc__'" in capsys.readouterr().out


def test_check_model_checks_the_tokenizer_against_the_weights(tmp_path, table):
    """One entry short in vocab.json: the tokenizer loads, knows every language, and puts each language token
    one row before the one the model was trained with. check-model says so; so it does for a gap in the ids and
    for special-token ids that differ from config.json."""
    good = make_m2m100_model_dir(tmp_path / "good", ["en", "fr", "oc"])
    report = check_model(good, ["en", "fr", "oc"], table)
    assert report.ok, report.problems
    vocab = json.loads((good / "vocab.json").read_text(encoding="utf-8"))
    rows = json.loads((good / "config.json").read_text())["vocab_size"]
    # the rows the weights give the language tokens, computed from the checkpoint's own layout
    assert load_tokenizer(good).lang_code_to_id["en"] == len(vocab)

    short = tmp_path / "short"
    shutil.copytree(good, short)
    tokens = sorted(vocab, key=vocab.get)
    del tokens[10]  # one piece lost, the rest renumbered: a vocab.json of another dictionary
    (short / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    assert load_tokenizer(short).lang_code_to_id["en"] == len(vocab) - 1  # shifted by one
    report = check_model(short, ["en", "fr", "oc"], table)
    assert len(report.problems) == 1, report.problems
    assert f"accounts for {rows - 1} embedding rows ({len(vocab) - 1} vocab.json entries + 3 language tokens" in \
        report.problems[0] and f"vocab_size {rows}: every language token id would be off by 1" in report.problems[0]

    gap = tmp_path / "gap"
    shutil.copytree(good, gap)
    del vocab[next(token for token, i in vocab.items() if i == 10)]  # lost without renumbering
    (gap / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    problems = check_model(gap, ["en", "fr", "oc"], table).problems
    assert any(f"ids are not 0..{len(vocab) - 1} (first gap or repeat at id 10)" in p for p in problems), problems

    specials = tmp_path / "specials"
    shutil.copytree(good, specials)
    config = json.loads((specials / "config.json").read_text())
    (specials / "config.json").write_text(json.dumps({**config, "pad_token_id": 3}))
    problems = check_model(specials, ["en", "fr"], table).problems
    assert any("the tokenizer's pad token '<pad>' has id 1, config.json's pad_token_id is 3" in p
               for p in problems), problems


def test_workflow_precheck_names_config_key_and_table(nllb_dir, table):
    table_path = table.attrs["path"]
    assert workflow_problems(["en", "fr"], table_path, nllb_dir, "run.yaml") == []
    [line] = workflow_problems(["en", "jp"], table_path, nllb_dir, "run.yaml")
    assert line.startswith("config key 'data.languages' (run.yaml): unknown language code(s) ['jp']")
    assert table_path in line
    [line] = workflow_problems(["en", "jv"], table_path, nllb_dir, "run.yaml")
    assert line == "config key 'model' (run.yaml): language 'jv': the tokenizer has no language token 'jav_Latn'"


# ------------------------------------------------------------------------------------------- FLORES layouts

def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def test_floresplus_hub_files_are_read_in_id_order(tmp_path, table):
    """The openlanguagedata/flores_plus layout: dev/eng_Latn.jsonl, records with id, text and metadata."""
    from lslo.data import detect_layout, read_flores

    expected = {code: syllable_sentences(5, seed=i) for i, code in enumerate(["en", "fr"])}
    for split in ("dev", "devtest"):
        for code, sentences in expected.items():
            records = [{"id": i, "iso_639_3": code, "iso_15924": "Latn", "glottocode": "x", "text": text,
                        "url": "u", "domain": "wikinews", "topic": "t", "has_image": 0, "has_hyperlink": 0,
                        "last_updated": "1.0"} for i, text in enumerate(sentences)]
            _write(tmp_path / split / f"{table.loc[code, 'flores200']}.jsonl",
                   [json.dumps(r, ensure_ascii=False) for r in reversed(records)])
    assert detect_layout(tmp_path, table, ["en", "fr"]) == "floresplus"
    frame = read_flores(tmp_path, ["en", "fr"], table, "test", "auto")
    assert frame["en"].tolist() == expected["en"] and frame["fr"].tolist() == expected["fr"]
    bad = tmp_path / "devtest" / "fra_Latn.jsonl"
    bad.write_text('{"id": 0, "text": "a"}\n{"id": 0, "text": "b"}\n', encoding="utf-8")
    with pytest.raises(LsloError, match=f"{bad}: sentence ids repeat"):
        read_flores(tmp_path, ["en", "fr"], table, "test", "floresplus")


def test_auto_layout_refuses_ambiguity_and_names_missing_files(tmp_path, table):
    from lslo.data import detect_layout

    for split in ("dev", "devtest"):
        for code in ("en", "fr"):
            _write(tmp_path / split / f"{table.loc[code, 'flores200']}.{split}", ["a", "b"])
    assert detect_layout(tmp_path, table, ["en", "fr"]) == "flores200"  # no flores101 column needed
    with pytest.raises(LsloError, match=r"no FLORES layout found for language 'oc'.*oci_Latn\.dev"):
        detect_layout(tmp_path, table, ["en", "fr", "oc"])
    for split in ("dev", "devtest"):  # the same languages in the FLORES+ release text layout too
        for code in ("en", "fr"):
            _write(tmp_path / split / f"{split}.{table.loc[code, 'flores200']}", ["a", "b"])
    with pytest.raises(LsloError, match=r"layouts \['flores200', 'floresplus'\] all match.*set data.layout"):
        detect_layout(tmp_path, table, ["en", "fr"])


def test_schema_accepts_floresplus():
    from pathlib import Path

    from lslo.config import load_yaml, validate_config

    root = Path(__file__).resolve().parents[1]
    config = load_yaml(root / "config/lang12.yaml")
    config["data"]["layout"] = "floresplus"
    validate_config(config, root / "config/schema.yaml")
    config["data"]["layout"] = "flores300"
    with pytest.raises(LsloError, match="data.layout"):
        validate_config(config, root / "config/schema.yaml")


def test_parameters_loaded_equal_meta_count(nllb_dir):
    """The meta-device count equals the loaded model's (tied embeddings counted once)."""
    from lslo.check_model import _meta_model

    loaded = M2M100ForConditionalGeneration.from_pretrained(nllb_dir)
    meta = _meta_model(loaded.config)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in loaded.parameters())
    assert loaded.model.shared.weight.data_ptr() == loaded.lm_head.weight.data_ptr()
    assert torch.equal(loaded.model.encoder.embed_tokens.weight, loaded.model.shared.weight)


def test_docs_name_the_spm_files_sacrebleu_reads():
    """Every spBLEU SentencePiece file name in README.md, docs/*.md and config/*.yaml is one sacrebleu reads: the
    basename of a URL in its SPM_MODELS table, the name it looks for under ~/.sacrebleu/models/ (docs/your-model.md
    once named a flores200_sacrebleu_tokenizer_spm.model that sacrebleu never reads)."""
    import os
    import re
    from pathlib import Path

    from sacrebleu.tokenizers.tokenizer_spm import SPM_MODELS

    read = {os.path.basename(model["url"]) for model in SPM_MODELS.values()}
    root = Path(__file__).resolve().parents[1]
    named = {}
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "config").glob("*.yaml"))]
    for path in texts:
        for name in re.findall(r"[\w.-]+", path.read_text(encoding="utf-8")):
            is_file_name = name.endswith(".model") or "sacrebleuspm" in name  # not a word such as a test name
            if "spm" in name and is_file_name and ("sacrebleu" in name or name.endswith("_spm.model")):
                named.setdefault(name, []).append(path.name)
    assert {name: files for name, files in named.items() if name not in read} == {}
    flores = {name for key, model in SPM_MODELS.items() if key in ("flores101", "flores200")
              for name in [os.path.basename(model["url"])]}
    assert flores <= set(named)  # both FLORES files are named somewhere, so the check reads real mentions
