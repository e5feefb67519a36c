"""Nothing silently wrong (issue 12): byte-level FLORES reading, all-or-nothing stage outputs, safe checkpoint
loading in `lslo convert`, complete scoring, rank plan and language table validation, training sentences longer
than the token budget, and Tables 9/10 with an undefined Pearson r. Each case raises one LsloError naming what is
at fault and leaves nothing under a final output name; docs/validation.md lists the messages."""

import errno
import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lslo.data import prepare_data, read_parallel  # noqa: E402
from test_validation import raises  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "config" / "languages.tsv"
FLORES101 = {"en": "eng", "fr": "fra", "oc": "oci"}
LANGS = list(FLORES101)


# ---------------------------------------------------------------------------------------------- FLORES bytes

def sentences(code: str, n: int = 4) -> list[str]:
    return [f"{code} sentence {i}" for i in range(n)]


def write_flores(root: Path, raw: dict | None = None) -> Path:
    """FLORES-101 layout for LANGS, LF line ends; raw = {(split, code): bytes} replaces one file's bytes."""
    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for code, name in FLORES101.items():
            data = ("\n".join(sentences(code)) + "\n").encode("utf-8")
            (root / split / f"{name}.{split}").write_bytes((raw or {}).get((split, code), data))
    return root


def prepare(root: Path, out: Path, **kwargs) -> None:
    prepare_data(root, "flores101", TABLE, LANGS, out / "train.tsv", out / "test.tsv", **kwargs)


def assert_no_output(out: Path) -> None:
    """Neither table under its final name, and no temporary left behind."""
    assert not out.exists() or sorted(os.listdir(out)) == []


def test_lone_cr_inside_a_sentence_is_refused_with_file_and_line(tmp_path):
    # the case: one CR in fr and one in oc keep the line counts equal, so a line split at the CR
    # would pair every sentence between them with the wrong translation
    fr = "fr sentence 0\nfr sen\rtence 1\nfr sentence 2\nfr sentence 3\n".encode()
    oc = "oc sentence 0\noc sentence 1\noc sentence 2\r3\n".encode()
    root = write_flores(tmp_path / "flores", {("dev", "fr"): fr, ("dev", "oc"): oc})
    raises(prepare, str(root / "dev" / "fra.dev"), "line 2", "carriage return", "character 7", "'fr'",
           root=root, out=tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_crlf_line_ends_and_a_utf8_bom_read_as_plain_lines(tmp_path):
    plain = write_flores(tmp_path / "plain")
    crlf = ("\r\n".join(sentences("fr")) + "\r\n").encode()
    bom = b"\xef\xbb\xbf" + ("\n".join(sentences("oc")) + "\n").encode()
    odd = write_flores(tmp_path / "odd", {("dev", "fr"): crlf, ("dev", "oc"): bom, ("devtest", "en"): b"\xef\xbb\xbf" +
                                           ("\r\n".join(sentences("en")) + "\r\n").encode()})
    prepare(plain, tmp_path / "a")
    prepare(odd, tmp_path / "b")
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.tsv").read_bytes() == (tmp_path / "b" / f"{split}.tsv").read_bytes()
    train = read_parallel(tmp_path / "b" / "train.tsv")
    assert train["oc"][0] == "oc sentence 0" and train["fr"][3] == "fr sentence 3"


def test_non_utf8_byte_names_file_line_and_byte(tmp_path):
    oc = "oc sentence 0\noc sentence 1\noc sent".encode() + b"\xe9" + "nce 2\noc sentence 3\n".encode()
    root = write_flores(tmp_path / "flores", {("devtest", "oc"): oc})
    offset = oc.index(b"\xe9")
    raises(prepare, str(root / "devtest" / "oci.devtest"), "line 3", "byte 0xe9", f"offset {offset}", "not UTF-8",
           root=root, out=tmp_path / "out")
    assert_no_output(tmp_path / "out")
    # after a BOM the offset still counts from the start of the file
    root = write_flores(tmp_path / "bom", {("dev", "en"): b"\xef\xbb\xbfok\n\xff\nx\ny\n"})
    raises(prepare, "eng.dev: line 2: byte 0xff at offset 6", root=root, out=tmp_path / "out")


def test_disk_full_while_writing_the_data_stage_leaves_neither_table(tmp_path, monkeypatch):
    root = write_flores(tmp_path / "flores")
    real_to_csv, calls = pd.DataFrame.to_csv, []

    def to_csv_that_fills_the_disk(frame, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second table (test.tsv): the first is complete by now
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_to_csv(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv_that_fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        prepare(root, tmp_path / "out")
    assert len(calls) == 2
    assert_no_output(tmp_path / "out")


def test_data_stage_cuts_the_test_table_in_the_same_publish(tmp_path):
    root = write_flores(tmp_path / "flores")
    prepare(root, tmp_path / "out", test_sentences=2)
    assert read_parallel(tmp_path / "out" / "test.tsv")["en"].tolist() == sentences("en")[:2]
    assert len(read_parallel(tmp_path / "out" / "train.tsv")) == 4


# ---------------------------------------------------------------------------------------------- training data

def test_a_training_sentence_longer_than_max_tokens_stops_training_before_it_starts(tmp_path):
    from test_train import LANGUAGES, make_world
    from transformers import M2M100ForConditionalGeneration

    from lslo.tokenizer import load_tokenizer
    from lslo.train import train

    model_dir, table, _ = make_world(tmp_path / "world", n_sentences=12)
    tokenizer = load_tokenizer(model_dir)
    table = table.copy()
    table.loc[7, "oc"] = " ".join([table.loc[7, "oc"]] * 30)  # one long sentence in one language

    def length(text):  # encoder/label length with the language token and </s> (M2M100: [lang] + ids + [eos])
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 2

    long = length(table.loc[7, "oc"])
    rest = max(length(table.loc[i, lang]) for i in range(len(table)) for lang in LANGUAGES if (i, lang) != (7, "oc"))
    assert rest < long
    options = dict(epochs=2, max_tokens=rest, max_epoch_examples=4, seed=0, dev_sentences=2)
    model = M2M100ForConditionalGeneration.from_pretrained(model_dir)
    raises(train, "training sentence 7 of language 'oc'", f"has {long} tokens", f"max_tokens={rest}",
           model=model, tokenizer=tokenizer, train_table=table, languages=LANGUAGES, options=options,
           checkpoint_dir=tmp_path / "ckpt", metrics_path=tmp_path / "metrics.tsv")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics.tsv").exists()


# ---------------------------------------------------------------------------------------------- scoring

SCORE_LANGS = ["en", "fr", "oc", "wo"]
SCORE_TABLE = pd.DataFrame({"code": SCORE_LANGS, "resource": ["H", "H", "V", "V"]}).set_index("code", drop=False)


@pytest.fixture(scope="module")
def scoring_world(tmp_path_factory):
    """A 4-language test table, hyps for all 12 directions, and a SentencePiece model for spBLEU."""
    import sentencepiece

    from lslo.data import write_parallel

    root = tmp_path_factory.mktemp("scoring")
    words = "maison chat chien rouge grand petit Haus Katze Hund rot Stadt Fluss".split()
    base = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 5)) for i in range(8)]
    test = pd.DataFrame({"id": range(len(base)), **{lang: [f"{lang} {s}" for s in base] for lang in SCORE_LANGS}})
    write_parallel(test, root / "test.tsv")
    (root / "corpus.txt").write_text("\n".join(base * 20) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "spm"),
                                             vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    rows = [(s, t, str(i), f"{t} {sentence}") for s in SCORE_LANGS for t in SCORE_LANGS if s != t
            for i, sentence in zip(test["id"], reversed(base))]
    hyps = pd.DataFrame(rows, columns=["src", "tgt", "id", "hyp"])
    return root, hyps


def score(root, hyps: pd.DataFrame, out: Path, **kwargs):
    from lslo import evaluate

    hyps.to_csv(root / "hyps.tsv", index=False, **evaluate._TSV)
    return evaluate.score_variant([root / "hyps.tsv"], root / "test.tsv", SCORE_TABLE, root / "spm.model",
                                  out / "directions.tsv", out / "groups.tsv", **kwargs)


def assert_no_scores(out: Path) -> None:
    for name in ("directions.tsv", "groups.tsv", "groups.signature.json"):
        assert not (out / name).exists()
    assert_no_output(out)


def test_scoring_needs_every_direction_of_the_language_list(scoring_world, tmp_path):
    root, hyps = scoring_world
    groups = score(root, hyps, tmp_path / "complete")
    assert groups.set_index("pair").loc["AVG", "n_directions"] == 12  # n(n-1) for the 4 test-table languages
    # the case: every direction of one language missing (its V2V cell would vanish and AVG change)
    without_wo = hyps[(hyps.src != "wo") & (hyps.tgt != "wo")]
    raises(score, "no hypotheses for direction en-wo, fr-wo, oc-wo, wo-en, wo-fr and 1 more",
           "6 of the 12 directions of languages ['en', 'fr', 'oc', 'wo']", root=root, hyps=without_wo,
           out=tmp_path / "out")
    assert_no_scores(tmp_path / "out")


def test_scoring_refuses_extra_directions_and_sentence_ids(scoring_world, tmp_path):
    root, hyps = scoring_world
    raises(score, "hypotheses for direction en-wo, fr-wo, oc-wo, wo-en, wo-fr and 1 more",
           "not among the 6 directions of languages ['en', 'fr', 'oc']", root=root, hyps=hyps,
           out=tmp_path / "out", languages=["en", "fr", "oc"])
    moved = hyps.copy()
    moved.loc[(moved.src == "fr") & (moved.tgt == "oc") & (moved.id == "3"), "id"] = "99"
    raises(score, "direction fr-oc: 8 hypotheses for 8 test sentences", "missing id(s): 3",
           "id(s) not in the test table: 99", root=root, hyps=moved, out=tmp_path / "out")
    assert_no_scores(tmp_path / "out")


def test_scoring_outputs_appear_together_or_not_at_all(scoring_world, tmp_path, monkeypatch):
    from lslo import evaluate

    root, hyps = scoring_world

    def disk_full(spm_model):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate, "signatures", disk_full)  # fails after both TSVs are complete
    with pytest.raises(OSError, match="No space left"):
        score(root, hyps, tmp_path / "out")
    assert_no_scores(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- rank plans

GPS = {"groups": ["H"], "ratio": 0.9, "start": 2, "duration": 8}


@pytest.fixture()
def rank_plan(tmp_path):
    """A rank plan written by the ranks stage for en, fr (H) and oc (V), GPS on H."""
    import json

    from lslo.ranks import assign_ranks

    path = tmp_path / "plan.json"
    assign_ranks("resource", TABLE, LANGS, {"H": 2, "V": 8}, GPS, out_json=path, epochs=15)
    return path, json.loads(path.read_text())


def read_plan(path, plan):
    import json

    from lslo.ranks import read_rank_plan

    path.write_text(json.dumps(plan))
    return read_rank_plan(path, LANGS, 15)


def test_a_written_rank_plan_reads_back(rank_plan):
    path, plan = rank_plan
    ranks, targets, schedule = read_plan(path, plan)
    assert ranks == {"en": 2, "fr": 2, "oc": 8} and targets == {"en": 0.9, "fr": 0.9, "oc": 0.0}
    assert schedule == {"start": 2, "duration": 8, "matrices": ["A", "B"], "pool": "tensor"}  # the default scope


@pytest.mark.parametrize("edit,lines", [
    (lambda p: p["gps"].pop("duration"), ["field 'gps': 'duration' is a required property"]),
    (lambda p: p["ranks"].update(xx=4), ["field 'ranks': 'xx' is not one of ['en', 'fr', 'oc']"]),
    (lambda p: p["ranks"].pop("oc"), ["field 'ranks': 'oc' is a required property"]),
    (lambda p: (p["ranks"].update(fr=0), p["prune"].update(en=1.5), p["groups"].update(oc="Q")),
     ["field 'groups.oc': 'Q' is not one of ['H', 'M', 'L', 'V']",
      "field 'prune.en': 1.5 is greater than or equal to the maximum of 1",
      "field 'ranks.fr': 0 is less than the minimum of 1"]),
    (lambda p: p.update(ranks="2;2;8"), ["field 'ranks': '2;2;8' is not of type 'object'"]),
])
def test_a_hand_edited_rank_plan_reports_one_line_per_error(rank_plan, edit, lines):
    path, plan = rank_plan
    edit(plan)
    message = raises(read_plan, str(path), "invalid rank plan", *lines, path=path, plan=plan)
    assert len(message.splitlines()) == 1 + len(lines)


def test_a_rank_plan_that_is_a_json_list_is_refused(rank_plan):
    path, plan = rank_plan
    message = raises(read_plan, "field '<top level>': [{'policy': 'resource', 'ranks'", "is not of type 'object'",
                     path=path, plan=[plan])
    assert len(message.splitlines()) == 2


def test_gps_on_no_group_or_a_group_without_languages_is_refused(tmp_path):
    from lslo.config import load_yaml, validate_config
    from lslo.ranks import assign_ranks

    out = tmp_path / "plan.json"
    raises(assign_ranks, "gps.groups is empty, so GPS would prune nothing", policy="resource",
           language_table=TABLE, languages=LANGS, group_ranks={"H": 2, "V": 8}, gps={**GPS, "groups": []},
           out_json=out, epochs=15)
    raises(assign_ranks, "gps.groups: resource group(s) ['M'] have no language in this run",
           "{'H': ['en', 'fr'], 'V': ['oc']}", policy="resource", language_table=TABLE, languages=LANGS,
           group_ranks={"H": 2, "V": 8}, gps={**GPS, "groups": ["H", "M"]}, out_json=out, epochs=15)
    assert not out.exists()
    config = load_yaml(REPO / "config" / "config.yaml")
    config["variants"]["lslo-2-2-8-wl-gps0.9"]["gps"]["groups"] = []
    raises(validate_config, "config key 'variants.lslo-2-2-8-wl-gps0.9.gps.groups': [] should be non-empty",
           config=config, schema_path=REPO / "config" / "schema.yaml")


# ---------------------------------------------------------------------------------------------- language table

@pytest.mark.parametrize("change,extra_fields", [("extra", 1), ("missing", -1)])
def test_a_language_table_row_with_a_field_too_many_or_few_names_file_and_line(tmp_path, change, extra_fields):
    from lslo.languages import read_language_table

    lines = TABLE.read_text(encoding="utf-8").splitlines()
    header_fields = lines[0].count("\t") + 1
    fields = header_fields + extra_fields
    lines[5] = lines[5] + "\tEuropean" if change == "extra" else lines[5].rsplit("\t", 1)[0]
    bad = tmp_path / "languages.tsv"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raises(read_language_table,
           f"{bad}: line 6 has {fields} tab-separated fields, expected {header_fields} as in the header",
           path=bad)


# ---------------------------------------------------------------------------------------------- Tables 9/10

def test_tables_9_10_say_why_r_is_undefined_for_a_module_with_equal_scores(tmp_path):
    import numpy as np

    from lslo import tables
    from test_figures import BITEXT, language_table, write_scores

    scores = write_scores(tmp_path / "raw.tsv", seed=5)
    scores.loc[(scores.side == "enc") & (scores.module == "k"), "score"] = -12.5  # equal in every language
    scores.to_csv(tmp_path / "scores.tsv", sep="\t", index=False)
    result = tables.correlation_table(tmp_path / "scores.tsv", language_table(), "enc", tmp_path / "t9.tsv",
                                      tmp_path / "t9.md").set_index("module")
    kept = [code for code, count in BITEXT.items() if count is not None]
    x = np.array([BITEXT[code] for code in kept], dtype=float)
    expected = {}
    for module in ["q", "v", "fc1", "fc2"]:
        y = scores[(scores.side == "enc") & (scores.module == module)].groupby("language").score.mean()[kept]
        expected[module] = np.corrcoef(x, y.to_numpy())[0, 1]
        assert result.loc[module, "r"] == pytest.approx(expected[module])
    assert np.isnan(result.loc["k", "r"]) and np.isnan(result.loc["k", "p_value"])
    assert result.loc["AVG", "r"] == pytest.approx(np.mean(list(expected.values())))
    md = (tmp_path / "t9.md").read_text()
    assert "nan" not in md
    assert "| k | undefined | undefined |" in md
    assert "Pearson r is undefined for k: the score is the same for every language (zero variance" in md
    assert "AVG is the mean of the 4 module rows with a defined r." in md


def test_tables_9_10_with_equal_bitext_counts_say_every_r_is_undefined(tmp_path):
    from lslo import tables
    from test_figures import language_table, write_scores

    write_scores(tmp_path / "scores.tsv", seed=1)
    table = language_table()
    table["bitext"] = pd.array([None, 1000, 1000, 1000, 1000, 1000], dtype="Int64")
    result = tables.correlation_table(tmp_path / "scores.tsv", table, "dec", tmp_path / "t10.tsv",
                                      tmp_path / "t10.md")
    assert result["r"].isna().all()
    md = (tmp_path / "t10.md").read_text()
    assert "nan" not in md and "| AVG | undefined | undefined |" in md
    assert "the bitext counts are the same for every language" in md and "AVG is undefined too." in md
