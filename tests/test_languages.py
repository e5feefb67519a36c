"""The language table (paper appendix A, Tables 5 and 6)."""

from pathlib import Path

import pytest

from lslo.errors import LsloError
from lslo.languages import group_of, groups, pair_name, read_language_table, select

TABLE = Path(__file__).resolve().parents[1] / "config" / "languages.tsv"


@pytest.fixture(scope="module")
def table():
    return read_language_table(TABLE)


def test_lang12_is_table5(table):
    assert select(table, "lang12") == ["en", "fr", "de", "it", "zh", "nl", "ja", "ko", "oc", "or", "sd", "wo"]
    assert [groups(table, select(table, "lang12"))[c] for c in ["en", "zh", "wo"]] == ["H", "M", "V"]


def test_lang30_group_sizes_and_bitext(table):
    codes = select(table, "lang30")
    assert len(codes) == 30 and len(set(codes)) == 30
    counts = {g: list(groups(table, codes).values()).count(g) for g in "HMLV"}
    assert counts == {"H": 7, "M": 9, "L": 8, "V": 6}  # Table 6
    assert table.loc["fr", "bitext"] == 289_000_000 and table.loc["oc", "bitext"] == 5_110
    assert table.loc["ko", "bitext"] == 7_460_000 and table.loc["kam", "bitext"] == 50_000
    assert table["bitext"].isna().tolist() == [c == "en" for c in table.index]  # English has no bitext w/ En
    assert table.loc["ff", "flores200"] == "fuv_Latn" and table.loc["zh", "flores101"] == "zho_simpl"


def test_pair_name_and_group_of(table):
    assert pair_name(table, "fr", "wo") == "H2V" and group_of(table, "ja") == "M"
    with pytest.raises(LsloError, match="'xx'"):
        group_of(table, "xx")


def test_select_explicit_list_keeps_order_and_rejects_unknown(table):
    assert select(table, ["wo", "en"]) == ["wo", "en"]
    with pytest.raises(LsloError, match=r"\['xx'\]"):
        select(table, ["en", "xx"])
    with pytest.raises(LsloError, match="lang99"):
        select(table, "lang99")
    with pytest.raises(LsloError, match="more than once"):
        select(table, ["en", "en"])


@pytest.mark.parametrize("field,value,message", [
    ("resource", "X", "field 'resource' is 'X'"),
    ("bitext", "5K", "field 'bitext' is '5K'"),
    ("resource", "", "field 'resource' is empty"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, field, value, message):
    lines = TABLE.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    row = lines[3].split("\t")
    row[header.index(field)] = value
    lines[3] = "\t".join(row)
    bad = tmp_path / "languages.tsv"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LsloError) as err:
        read_language_table(bad)
    assert str(bad) in str(err.value) and "line 4" in str(err.value) and message in str(err.value)


def test_missing_column(tmp_path):
    bad = tmp_path / "languages.tsv"
    bad.write_text("code\tname\nen\tEnglish\n", encoding="utf-8")
    with pytest.raises(LsloError, match="missing column"):
        read_language_table(bad)


def test_own_table_needs_only_code_and_resource(tmp_path):
    """A user's table (docs/your-model.md): no flores101 column for FLORES-200 data; floresplus falls back to
    flores200; file codes a layout needs and does not find are named with the table file."""
    from lslo.languages import file_code, nllb_codes

    own = tmp_path / "own.tsv"
    own.write_text("code\tresource\tflores200\tnllb\tsubsets\n"
                   "en\tH\teng_Latn\teng_Latn\tmine\nzz\tV\t\t\tmine\n", encoding="utf-8")
    table = read_language_table(own)
    assert select(table, "mine") == ["en", "zz"] and table["bitext"].isna().all()
    assert file_code(table, "en", "flores200") == "eng_Latn" == file_code(table, "en", "floresplus")
    assert nllb_codes(table) == {"en": "eng_Latn"}
    with pytest.raises(LsloError, match=f"{own}: language 'zz' has no 'flores200' code"):
        file_code(table, "zz", "flores200")
    with pytest.raises(LsloError, match="no 'flores101' code"):
        file_code(table, "en", "flores101")
    with pytest.raises(LsloError, match=rf"\['xx'\]; not in the language table {own}"):
        select(table, ["en", "xx"])


def test_shipped_table_maps_every_language_to_an_nllb_token():
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    from lslo.languages import nllb_codes

    table = read_language_table(TABLE)
    codes = nllb_codes(table)
    assert set(codes) == set(table.index) and set(codes.values()) <= set(FAIRSEQ_LANGUAGE_CODES)
    assert codes["zh"] == "zho_Hans" and table.loc["zh", "floresplus"] == "cmn_Hans"
