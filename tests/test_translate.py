"""`lslo translate`: the run's decoding options, empty lines, text that is not UTF-8, a quiet --quiet."""

import io
import json
import os
import sys
import warnings

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_dirs import make_m2m100_model_dir, syllable_sentences  # noqa: E402

from lslo.cli import main  # noqa: E402
from lslo.errors import LsloError  # noqa: E402
from lslo.evaluate import decode_shard  # noqa: E402
from lslo.inference import DecodingOptions, decoding_options_path, write_decoding_options  # noqa: E402
from lslo.translate import read_input_lines  # noqa: E402

LANGS = ["en", "fr", "oc"]
RECORDED = DecodingOptions(beam=3, max_len_b=7, max_tokens=40)  # not the defaults (beam 5, max_len_b 200)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pretrain variant whose run recorded non-default decoding options, and its test table."""
    root = tmp_path_factory.mktemp("translate")
    make_m2m100_model_dir(root / "base", LANGS, init_std=0.5)
    variant = root / "finetune" / "variant.json"
    variant.parent.mkdir()
    variant.write_text(json.dumps({"method": "pretrain", "base_model": "../base", "languages": LANGS}))
    write_decoding_options(RECORDED, decoding_options_path(variant))
    sentences = syllable_sentences(5, seed=4, words=6)
    pd.DataFrame({"id": range(5), "en": sentences, "fr": sentences, "oc": sentences}).to_csv(
        root / "test.tsv", sep="\t", index=False)
    return variant, root / "test.tsv", sentences


def translate(monkeypatch, capsys, stdin, *args):
    stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")  # the POSIX locale's
    monkeypatch.setattr(sys, "stdin", stream)
    code = main(["translate", *args, "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_translate_decodes_with_the_runs_recorded_options(run, tmp_path, monkeypatch, capsys):
    """The docs' claim: with the run's own options its output equals the evaluate stage's hypotheses."""
    variant, test_tsv, sentences = run
    hyps = decode_shard(variant, test_tsv, [("en", "oc"), ("fr", "oc")], tmp_path / "hyps.tsv", RECORDED,
                        device="cpu")
    expected = hyps[hyps.src == "en"].sort_values("id").hyp.tolist()
    stdin = "".join(f"{s}\n" for s in sentences).encode()
    code, out, err = translate(monkeypatch, capsys, stdin, "--variant", str(variant), "--src", "en", "--tgt", "oc",
                               "--quiet")
    assert code == 0 and out.splitlines() == expected
    assert err == ""  # --quiet: no progress bar, no weight-loading bar, nothing to report
    # lslo's defaults (beam 5, max_len_b 200) decode other hypotheses: equality above is not luck
    code, out, err = translate(monkeypatch, capsys, stdin, "--variant", str(variant), "--src", "en", "--tgt", "oc",
                               "--beam", "5", "--max-len-b", "200", "--quiet")
    assert code == 0 and out.splitlines() != expected
    assert err.splitlines() == [f"lslo translate: decoding with the run's decoding options "
                                f"({decoding_options_path(variant)}), overridden by --beam 5 (recorded: 3), "
                                f"--max-len-b 200 (recorded: 7)"]


def test_translate_without_recorded_options_says_so(run, tmp_path, monkeypatch, capsys):
    variant, _, sentences = run
    bare = tmp_path / "variant.json"
    bare.write_text(json.dumps({**json.loads(variant.read_text()), "base_model": str(variant.parent.parent / "base")}))
    code, out, err = translate(monkeypatch, capsys, f"{sentences[0]}\n".encode(), "--variant", str(bare),
                               "--src", "en", "--tgt", "fr", "--max-len-b", "3", "--quiet")
    assert code == 0 and len(out.splitlines()) == 1
    assert err.splitlines() == [f"lslo translate: decoding with lslo's default decoding options "
                                f"({tmp_path / 'decoding.json'} not found), overridden by --max-len-b 3; beam 5, "
                                f"max_len_a 0.0, max_len_b 3, lenpen 1.0, max_tokens 4000, search fairseq, dtype fp32"]


def test_an_empty_line_gives_an_empty_line(run, monkeypatch, capsys):
    variant, _, sentences = run
    args = ("--variant", str(variant), "--src", "en", "--tgt", "oc", "--quiet")
    _, alone, _ = translate(monkeypatch, capsys, f"{sentences[0]}\n{sentences[1]}\n".encode(), *args)
    code, out, _ = translate(monkeypatch, capsys, f"\n{sentences[0]}\n   \n{sentences[1]}\n\n".encode(), *args)
    first, second = alone.splitlines()
    assert code == 0 and out.split("\n") == ["", first, "", second, "", ""]


def test_text_that_is_not_utf8_is_refused_with_its_byte_offset(run, monkeypatch, capsys):
    variant, _, _ = run
    code, out, err = translate(monkeypatch, capsys, "héllo\nbad \xff byte\n".encode("latin-1"), "--variant",
                               str(variant), "--src", "en", "--tgt", "oc", "--quiet")
    # "héllo" in latin-1 is already not UTF-8: 0xe9 at offset 1
    assert code == 2 and out == ""
    assert err.strip() == "lslo translate: error: <stdin>: byte offset 1 (line 1) is not UTF-8 (byte 0xe9); " \
                          "lslo translate reads UTF-8 text"
    assert read_input_lines("a\r\nb é\n".encode(), "f") == ["a", "b é"]
    with pytest.raises(LsloError, match=r"^f: byte offset 6 \(line 2\) is not UTF-8 \(byte 0xff\)"):
        read_input_lines(b"abc\nde\xff\n", "f")


def test_translate_prints_no_transformers_warning(run, monkeypatch, capsys):
    variant, _, sentences = run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = translate(monkeypatch, capsys, f"{sentences[2]}\n".encode(), "--variant", str(variant),
                                 "--src", "en", "--tgt", "oc", "--quiet")
    assert code == 0 and err == ""
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
