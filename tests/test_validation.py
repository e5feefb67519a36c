"""Bad input: one LsloError per case, naming the file / key / language / value and what is expected, and no
half-written output. docs/validation.md lists every case with its message and the test here that covers it."""

import copy
import json
import os
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import make_tiny_config, make_tiny_model  # noqa: E402

from lslo.config import load_yaml, validate_config  # noqa: E402
from lslo.errors import LsloError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "config" / "languages.tsv"
SCHEMA = REPO / "config" / "schema.yaml"
LANGS = ["en", "fr", "oc"]
FLORES101 = {"en": "eng", "fr": "fra", "oc": "oci"}


def raises(call, *parts, **kwargs):
    """Run call(**kwargs); it must raise LsloError whose message contains every part. Returns the message."""
    with pytest.raises(LsloError) as err:
        call(**kwargs)
    message = str(err.value)
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------- FLORES data

def write_flores(root: Path, n: int = 4) -> Path:
    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for code, name in FLORES101.items():
            (root / split / f"{name}.{split}").write_text(
                "\n".join(f"{code} sentence {i}" for i in range(n)) + "\n", encoding="utf-8")
    return root


def prepare(root, out, languages=LANGS):
    from lslo.data import prepare_data

    prepare_data(root, "flores101", TABLE, languages, out / "train.tsv", out / "test.tsv")


def assert_nothing_written(out: Path):
    assert not (out / "train.tsv").exists() and not (out / "test.tsv").exists()


def test_flores_file_missing(tmp_path):
    root = write_flores(tmp_path / "flores")
    (root / "devtest" / "oci.devtest").unlink()
    raises(prepare, root / "devtest" / "oci.devtest", "language 'oc'", "not found", root=root, out=tmp_path)
    assert_nothing_written(tmp_path)


def test_flores_files_misaligned(tmp_path):
    root = write_flores(tmp_path / "flores")
    (root / "devtest" / "fra.devtest").write_text("a\nb\n", encoding="utf-8")
    raises(prepare, "unequal line counts", root / "devtest" / "eng.devtest", "has 4 lines",
           root / "devtest" / "fra.devtest", "has 2", "language 'fr'", root=root, out=tmp_path)
    assert_nothing_written(tmp_path)


def test_flores_file_with_zero_lines(tmp_path):
    root = write_flores(tmp_path / "flores")
    for name in FLORES101.values():
        (root / "devtest" / f"{name}.devtest").write_text("", encoding="utf-8")
    raises(prepare, root / "devtest" / "eng.devtest", "has no lines", "language 'en'", root=root, out=tmp_path)
    assert_nothing_written(tmp_path)


def test_flores_blank_line(tmp_path):
    root = write_flores(tmp_path / "flores")
    (root / "dev" / "oci.dev").write_text("one\n \nthree\nfour\n", encoding="utf-8")
    raises(prepare, root / "dev" / "oci.dev", "line 2 is empty", "language 'oc'", root=root, out=tmp_path)
    assert_nothing_written(tmp_path)


def test_flores_split_directory_empty(tmp_path):
    root = write_flores(tmp_path / "flores")
    for path in (root / "devtest").iterdir():
        path.unlink()
    raises(prepare, root / "devtest" / "eng.devtest", "language 'en'", "not found", root=root, out=tmp_path)
    assert_nothing_written(tmp_path)


def test_unknown_language_code(tmp_path):
    from lslo.languages import read_language_table, select

    root = write_flores(tmp_path / "flores")
    raises(prepare, "unknown language code(s) ['xx']", "not in the language table", root=root, out=tmp_path,
           languages=["en", "xx"])
    assert_nothing_written(tmp_path)
    raises(select, "unknown language subset 'lang99'", table=read_language_table(TABLE), languages="lang99")


# ---------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny M2M100 HF directory whose tokenizer knows en, fr, oc only."""
    from transformers import M2M100ForConditionalGeneration

    from lslo.tokenizer import build_tokenizer, model_vocab_size

    root = tmp_path_factory.mktemp("model")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(["la", "mi", "to", "ke", "su"]) for _ in range(6))
                                for _ in range(200)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), vocab_size=24,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    tokenizer = build_tokenizer(root / "sp.model", LANGS, root / "base")
    M2M100ForConditionalGeneration(make_tiny_config(vocab_size=model_vocab_size(tokenizer))).save_pretrained(
        root / "base")
    return root / "base"


def write_variant(path: Path, base_model: Path, languages=LANGS) -> Path:
    path.write_text(json.dumps({"method": "pretrain", "base_model": str(base_model), "adapters": None,
                                "model": None, "languages": languages}))
    return path


def test_language_missing_from_tokenizer(model_dir, tmp_path):
    from lslo.evaluate import decode_shard
    from lslo.inference import load_variant
    from lslo.train import load_base

    raises(load_base, model_dir, "__wo__", "language(s) ['wo']", "it knows ['en', 'fr', 'oc']",
           model_dir=model_dir, languages=["en", "wo"])
    model, tokenizer = load_base(model_dir, LANGS)  # the happy path still loads
    assert tokenizer.languages == LANGS
    variant = write_variant(tmp_path / "variant.json", model_dir, ["en", "wo"])
    raises(load_variant, model_dir, "__wo__", variant_json=variant, device="cpu")
    good = write_variant(tmp_path / "good.json", model_dir)
    out = tmp_path / "hyps" / "0.tsv"
    raises(decode_shard, good, "__wo__", variant_json=good, test_tsv=tmp_path / "test.tsv",
           directions=[["en", "wo"]], out_hyps=out, device="cpu")
    assert not out.exists()


def test_model_dir_without_weights(tmp_path):
    from lslo.inference import load_variant
    from lslo.train import load_base

    make_tiny_config().save_pretrained(tmp_path / "m")
    raises(load_base, tmp_path / "m", "no model weights", "model.safetensors", model_dir=tmp_path / "m")
    raises(load_variant, tmp_path / "m", "no model weights",
           variant_json=write_variant(tmp_path / "v.json", tmp_path / "m"), device="cpu")
    raises(load_base, tmp_path / "nowhere", "no config.json", model_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_model_dir_of_unsupported_class(tmp_path, model_type):
    from lslo.train import load_base

    directory = tmp_path / model_type
    make_tiny_model().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    raises(load_base, directory / "config.json", f"model_type is '{model_type}'", "expected 'm2m_100'",
           model_dir=directory)


def test_unsupported_model_object_for_injection():
    from transformers import BartConfig, BartForConditionalGeneration

    from lslo.model import LSLoSpec, inject_lslo

    bart = BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, vocab_size=32,
                                                   encoder_ffn_dim=16, decoder_ffn_dim=16,
                                                   encoder_attention_heads=2, decoder_attention_heads=2))
    raises(inject_lslo, "unsupported model class BartForConditionalGeneration", "M2M100ForConditionalGeneration",
           hf_model=bart, spec=LSLoSpec(languages=["en"], ranks={"en": 2}))


# ---------------------------------------------------------------------------------------------- config

@pytest.fixture(scope="module")
def config():
    return load_yaml(REPO / "config" / "config.yaml")


def bad_configs(config):
    unknown = copy.deepcopy(config)
    unknown["variants"]["pretrain"]["colour"] = "blue"
    wrong_type = copy.deepcopy(config)
    wrong_type["train"]["lr"] = "fast"
    return unknown, wrong_type


def test_snakemake_validate_rejects_unknown_key_and_wrong_type(config):
    from snakemake.utils import validate

    unknown, wrong_type = bad_configs(config)
    with pytest.raises(Exception) as err:
        validate(unknown, str(SCHEMA), set_default=False)
    assert "'colour' was unexpected" in str(err.value)
    # snakemake names the key path only as instance['train']['lr'], after a dump of the schema
    with pytest.raises(Exception) as err:
        validate(wrong_type, str(SCHEMA), set_default=False)
    assert "instance['train']['lr']" in str(err.value)


def test_snakemake_fills_the_schema_defaults_of_every_shipped_config():
    """The Snakefile runs validate(set_default=True) after validate_config: a default inside a block that may be
    null (a variant's `gps: null`) would crash it, so gps.matrices and gps.pool have none in the schema and an
    absent one stays absent (lslo.ranks.gps_scope gives [A, B] and tensor)."""
    from snakemake.utils import validate

    for path in sorted((REPO / "config").glob("*.yaml")):
        if path.name == "schema.yaml":
            continue
        config = load_yaml(path)
        validate(config, str(SCHEMA), set_default=True)
        blocks = [spec["gps"] for spec in config["variants"].values()]
        assert None in blocks, path  # a variant without GPS is in the test
        assert all(block is None or not {"matrices", "pool"} & set(block) for block in blocks), path


def test_validate_config_names_the_key_path(config):
    for path in sorted((REPO / "config").glob("*.yaml")):
        if path.name != "schema.yaml":
            validate_config(load_yaml(path), SCHEMA)  # the shipped configs are valid
    unknown, wrong_type = bad_configs(config)
    raises(validate_config, "config key 'variants.pretrain.colour': unknown key", "expected one of [",
           config=unknown, schema_path=SCHEMA)
    raises(validate_config, "config key 'train.lr': 'fast' is not of type 'number'", config=wrong_type,
           schema_path=SCHEMA)
    gps = copy.deepcopy(config)
    name = next(v for v, spec in gps["variants"].items() if spec.get("gps"))
    gps["variants"][name]["gps"]["ratio"] = 1.5
    raises(validate_config, f"config key 'variants.{name}.gps.ratio': 1.5 is greater than or equal to the maximum "
           "of 1", config=gps, schema_path=SCHEMA)
    gps["variants"][name]["gps"].update(ratio=0.9, matrices=["A", "C"])
    raises(validate_config, f"config key 'variants.{name}.gps.matrices.1': 'C' is not one of ['A', 'B']", config=gps,
           schema_path=SCHEMA)
    gps["variants"][name]["gps"].update(matrices=["B"], pool="global")
    raises(validate_config, f"config key 'variants.{name}.gps.pool': 'global' is not one of ['tensor', 'language']",
           config=gps, schema_path=SCHEMA)
    gps["variants"][name]["gps"].update(matrices=["B", "B"], pool="language")
    raises(validate_config, f"config key 'variants.{name}.gps.matrices': 'B' listed more than once", config=gps,
           schema_path=SCHEMA)
    rank = copy.deepcopy(config)
    rank["weight_learning"]["rank"] = 0
    raises(validate_config, "config key 'weight_learning.rank': 0 is less than the minimum of 1", config=rank,
           schema_path=SCHEMA)


def test_variant_labels_must_be_unique(config):
    """Tables and figures name rows by label: two variants with one label, or one variant twice in a table, is
    a config error naming both variants (before, Table 1 silently lost a row)."""
    names = list(config["variants"])
    same = copy.deepcopy(config)
    same["variants"][names[2]]["label"] = same["variants"][names[1]]["label"]
    raises(validate_config, f"config key 'variants': variants '{names[1]}' and '{names[2]}' have the same label "
           f"'{config['variants'][names[1]]['label']}'", config=same, schema_path=SCHEMA)
    twice = copy.deepcopy(config)
    table, rows = next(iter(twice["tables"].items()))
    rows.append(rows[0])
    raises(validate_config, f"config key 'tables.{table}': variant(s) ['{rows[0]}'] listed more than once",
           config=twice, schema_path=SCHEMA)


@pytest.mark.parametrize("label", ["", "Pretrain ", " Pretrain", "two\nlines"])
def test_a_label_is_one_line_without_spaces_at_its_ends(config, label):
    """A label is a table row's name: an empty one, or "Pretrain " beside "Pretrain" (two rows that look the same),
    or a line break (which splits the Markdown row) is a config error naming the key."""
    name = list(config["variants"])[1]
    bad = copy.deepcopy(config)
    bad["variants"][name]["label"] = label
    raises(validate_config, f"config key 'variants.{name}.label'", config=bad, schema_path=SCHEMA)


def test_duplicated_language_code_is_named(config):
    """data.languages is "a subset name or a list of codes" (oneOf): a list with a repeated code names the code,
    not "is not valid under any of the given schemas"."""
    repeated = copy.deepcopy(config)
    repeated["data"]["languages"] = ["en", "fr", "oc", "fr"]
    message = raises(validate_config, "config key 'data.languages': 'fr' listed more than once", config=repeated,
                     schema_path=SCHEMA)
    assert "any of the given schemas" not in message


def test_duplicate_variant_name(tmp_path, config):
    text = (REPO / "config" / "config.yaml").read_text(encoding="utf-8")
    assert load_yaml(REPO / "config" / "config.yaml") == config
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  pretrain:"))
    block = [lines[start]] + [line for line in lines[start + 1:start + 20]]
    end = next(i for i, line in enumerate(block[1:], 1) if not line.startswith("    "))
    duplicated = lines[:start + end] + block[:end] + lines[start + end:]
    path = tmp_path / "dup.yaml"
    path.write_text("\n".join(duplicated) + "\n", encoding="utf-8")
    raises(load_yaml, path, f"line {start + end + 1}: duplicate key 'variants.pretrain'", path=path)


def test_train_options_unknown_key_and_wrong_type():
    from lslo.train import TrainOptions

    raises(TrainOptions.from_dict, "variants.x.train.learning_rate: unknown training option", "'lr'",
           d={"learning_rate": 1e-3}, path="variants.x.train")
    raises(TrainOptions.from_dict, "options.epochs is '15'", "expected", d={"epochs": "15"})


# ---------------------------------------------------------------------------------------------- ranks, GPS, beam

def test_rank_below_one(tmp_path):
    from lslo.model import LSLoSpec
    from lslo.ranks import assign_ranks

    raises(LSLoSpec, "rank of language 'fr'", "integer >= 1", "got 0", languages=["en", "fr"],
           ranks={"en": 2, "fr": 0})
    out = tmp_path / "ranks.json"
    raises(assign_ranks, "0", ">= 1", policy="resource", language_table=TABLE, languages=["en", "oc"],
           group_ranks={"H": 0, "V": 8}, gps=None, out_json=out)
    assert not out.exists()


def test_pruning_ratio_outside_0_1(tiny_model, languages):
    from lslo.model import LSLoSpec, inject_lslo
    from lslo.pruning import check_ratio, prune

    model = inject_lslo(tiny_model, LSLoSpec(languages=languages, ranks={lang: 2 for lang in languages}))
    for ratio in (1.0, -0.1):
        raises(prune, f"is {ratio!r}", "expected a number in [0, 1)", model=model, ratio=ratio, languages=["en"])
    raises(check_ratio, "GPS target ratio P is 1.5", "[0, 1)", ratio=1.5, what="GPS target ratio P")


def test_gps_start_plus_duration_exceeds_epochs(tmp_path):
    from lslo.pruning import validate_gps
    from lslo.ranks import assign_ranks

    raises(validate_gps, "E=5 + duration k=8 = 13 exceeds the 10 training epochs", "E + k <= T",
           target=0.9, start=5, duration=8, epochs=10)
    out = tmp_path / "ranks.json"
    raises(assign_ranks, "13", "10", policy="resource", language_table=TABLE, languages=["en", "oc"],
           group_ranks={"H": 2, "V": 8}, gps={"groups": ["H"], "ratio": 0.9, "start": 5, "duration": 8},
           out_json=out, epochs=10)
    assert not out.exists()


@pytest.mark.parametrize("beam", [0, -1, 2.5])
def test_beam_below_one(tmp_path, beam):
    from lslo.inference import DecodingOptions

    raises(DecodingOptions, f"beam is {beam!r}", "whole number >= 1", beam=beam)


# ---------------------------------------------------------------------------------------------- missing files

def test_subspace_scores_missing(tmp_path):
    from lslo.ranks import assign_ranks

    out = tmp_path / "ranks.json"
    raises(assign_ranks, tmp_path / "scores.tsv", "subspace scores not found", policy="subspace",
           language_table=TABLE, languages=["en", "oc"], group_ranks=None, gps=None,
           scores_tsv=tmp_path / "scores.tsv", out_json=out)
    assert not out.exists()


def test_sentencepiece_model_missing(tmp_path):
    from lslo.metrics import spbleu
    from lslo.tokenizer import build_tokenizer

    raises(spbleu, tmp_path / "flores.spm", "SentencePiece model not found", hyps=["a"], refs=["a"],
           spm_model=tmp_path / "flores.spm")
    raises(build_tokenizer, tmp_path / "sp.model", "SentencePiece model not found",
           spm_model=tmp_path / "sp.model", languages=LANGS, out_dir=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


# ---------------------------------------------------------------------------------------------- config is data

def test_no_code_execution_from_config():
    """Config and data files are parsed, never executed: no eval/exec, and YAML only through safe loaders."""
    sources = [*sorted((REPO / "lslo").glob("*.py")), *sorted((REPO / "workflow").rglob("*.py")),
               REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    pattern = re.compile(r"(?<![\w.])(eval|exec)\(|yaml\.load\(|yaml\.unsafe_load|yaml\.full_load|"
                         r"Loader=yaml\.(Full|Unsafe)?Loader\b|importlib\.import_module\(")
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in sources if path.is_file()
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
