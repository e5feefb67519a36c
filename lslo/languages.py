"""The language table: model language codes, FLORES file codes, resource groups (paper appendix A, Tables 5/6).

Format (config/languages.tsv, see docs/formats.md): one row per language, tab-separated, with a header line.
Columns `code` and `resource` (H/M/L/V) are required; the others may be left out or left empty where a run
does not need them: name, flores101 / flores200 / floresplus (file codes of each FLORES layout; floresplus
defaults to flores200), nllb (the NLLB-200 language code, eng_Latn), family, bitext (sentences with English;
empty for en), subsets (comma list such as "lang12,lang30"). A stage that needs a field says which
(`file_code`, `nllb_codes`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lslo.errors import LsloError

COLUMNS = ["code", "name", "flores101", "flores200", "floresplus", "nllb", "resource", "family", "bitext",
           "subsets"]
RESOURCE_GROUPS = ["H", "M", "L", "V"]  # FLORES-101 resource types, high to very low (paper §5)
_REQUIRED = ["code", "resource"]  # columns every table has and fields every row fills


def read_language_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a language table; returns a DataFrame indexed by model code (file order kept)."""
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: language table not found")
    _check_field_counts(path)
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise LsloError(f"{path}: missing column(s) {missing}; required {_REQUIRED}, optional "
                        f"{[c for c in COLUMNS if c not in _REQUIRED]}")
    for column in COLUMNS:  # an optional column left out reads as empty
        if column not in table.columns:
            table[column] = ""
    table = table[COLUMNS].apply(lambda col: col.str.strip())
    for row, record in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        _check_row(path, row, record)
    duplicated = table["code"][table["code"].duplicated()].tolist()
    if duplicated:
        raise LsloError(f"{path}: duplicated language code(s) {duplicated}")
    table["bitext"] = pd.array([int(b) if b else None for b in table["bitext"]], dtype="Int64")
    table = table.set_index("code", drop=False)
    table.attrs["path"] = str(path)
    return table


def _check_field_counts(path: Path) -> None:
    """Every row has the header's number of tab-separated fields. pandas would stop on a longer row with a
    ParserError that names no file, and fill a shorter one with empty fields without a word."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    expected = lines[0].rstrip("\r").count("\t") + 1
    for number, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").count("\t") + 1
        if line.strip() and fields != expected:
            raise LsloError(f"{path}: line {number} has {fields} tab-separated fields, expected {expected} as in "
                            "the header (a tab inside a field, or a missing one?)")


def _check_row(path: Path, row: int, record: dict) -> None:
    for field in _REQUIRED:
        if not record[field]:
            raise LsloError(f"{path}: line {row}: field '{field}' is empty")
    if record["resource"] not in RESOURCE_GROUPS:
        raise LsloError(
            f"{path}: line {row} ({record['code']}): field 'resource' is '{record['resource']}', "
            f"expected one of {RESOURCE_GROUPS}"
        )
    bitext = record["bitext"]
    if bitext and not (bitext.isdigit() and int(bitext) > 0):
        raise LsloError(
            f"{path}: line {row} ({record['code']}): field 'bitext' is '{bitext}', "
            "expected a positive whole number of sentences or empty"
        )


def select(table: pd.DataFrame, languages: str | list[str]) -> list[str]:
    """Ordered model codes of a named subset ("lang12", "lang30", any name in `subsets`) or of an explicit list.

    A named subset keeps table order; an explicit list keeps its own order (it defines the model's language ids).
    """
    if isinstance(languages, str):
        members = [code for code, subsets in zip(table["code"], table["subsets"]) if languages in _split(subsets)]
        if not members:
            known = sorted({s for subsets in table["subsets"] for s in _split(subsets)})
            raise LsloError(f"unknown language subset '{languages}'; the language table {_source(table)} "
                           f"defines {known}")
        return members
    codes = list(languages)
    unknown = [code for code in codes if code not in table.index]
    if unknown:
        raise LsloError(f"unknown language code(s) {unknown}; not in the language table {_source(table)}")
    duplicated = sorted({code for code in codes if codes.count(code) > 1})
    if duplicated:
        raise LsloError(f"language code(s) {duplicated} listed more than once")
    return codes


def language_rows(path: str | os.PathLike, languages: str | list[str], columns: list[str]) -> list[dict]:
    """What a stage reads of the language table: the rows of the run's languages, in run order, with `columns`
    only (values as strings, an empty field as ""). The workflow keeps this in each rule's params, so an edit of
    another column, or of a language outside the run, reruns nothing."""
    table = read_language_table(path)
    return [{column: "" if pd.isna(table.loc[code, column]) else str(table.loc[code, column]) for column in columns}
            for code in select(table, languages)]


def row_codes(rows: list[dict] | str) -> list[str]:
    """The language codes of `language_rows` output, in run order. A string in their place says why the workflow
    could not read the table (a demo table not written yet, or unreadable): raised as the error."""
    if isinstance(rows, str):
        raise LsloError(rows)
    return [row["code"] for row in rows]


def file_code(table: pd.DataFrame, code: str, column: str) -> str:
    """The FLORES file code of `code` in `column` (flores101, flores200, floresplus; floresplus falls back to
    flores200, as FLORES+ kept FLORES-200's codes except where it renamed a language, e.g. zh: cmn_Hans)."""
    value = table.loc[code, column]
    if not value and column == "floresplus":
        value = table.loc[code, "flores200"]
    if not value:
        columns = "'floresplus' or 'flores200'" if column == "floresplus" else f"'{column}'"
        raise LsloError(f"{_source(table)}: language '{code}' has no {columns} code; the {column} layout "
                        "reads its files by that column")
    return value


def nllb_codes(table: pd.DataFrame, languages: list[str] | None = None) -> dict[str, str]:
    """{code: NLLB code} for the languages (default: all) whose `nllb` field is filled."""
    codes = table["code"].tolist() if languages is None else list(languages)
    return {code: table.loc[code, "nllb"] for code in codes if code in table.index and table.loc[code, "nllb"]}


def _source(table: pd.DataFrame) -> str:
    return table.attrs.get("path", "language table")


def _split(subsets: str) -> list[str]:
    return [s.strip() for s in subsets.split(",") if s.strip()]


def group_of(table: pd.DataFrame, code: str) -> str:
    """Resource group (H/M/L/V) of one language."""
    if code not in table.index:
        raise LsloError(f"unknown language code '{code}'; not in the language table")
    return table.loc[code, "resource"]


def groups(table: pd.DataFrame, languages: list[str] | None = None) -> dict[str, str]:
    """{code: resource group} for the given languages (default: every language of the table)."""
    codes = table["code"].tolist() if languages is None else select(table, list(languages))
    return {code: table.loc[code, "resource"] for code in codes}


def pair_name(table: pd.DataFrame, src: str, tgt: str) -> str:
    """Direction group pair name such as "H2V" (Table 1 columns)."""
    return f"{group_of(table, src)}2{group_of(table, tgt)}"
