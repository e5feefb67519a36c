"""The language table: model language codes, FLORES file codes, resource groups (paper appendix A, Tables 5/6).

Format (config/languages.tsv, see docs/formats.md): one row per language, tab-separated, columns
code, name, flores101, flores200, resource (H/M/L/V), family, bitext (sentences with English; empty for en),
subsets (comma list such as "lang12,lang30").
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lslo.errors import LsloError

COLUMNS = ["code", "name", "flores101", "flores200", "resource", "family", "bitext", "subsets"]
RESOURCE_GROUPS = ["H", "M", "L", "V"]  # FLORES-101 resource types, high to very low (paper §5)
_REQUIRED = ["code", "flores101", "flores200", "resource"]  # fields every row must fill


def read_language_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a language table; returns a DataFrame indexed by model code (file order kept)."""
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: language table not found")
    _check_field_counts(path)
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise LsloError(f"{path}: missing column(s) {missing}; expected columns {COLUMNS}")
    table = table[COLUMNS].apply(lambda col: col.str.strip())
    for row, record in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        _check_row(path, row, record)
    duplicated = table["code"][table["code"].duplicated()].tolist()
    if duplicated:
        raise LsloError(f"{path}: duplicated language code(s) {duplicated}")
    table["bitext"] = pd.array([int(b) if b else None for b in table["bitext"]], dtype="Int64")
    return table.set_index("code", drop=False)


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
            raise LsloError(f"unknown language subset '{languages}'; the language table defines {known}")
        return members
    codes = list(languages)
    unknown = [code for code in codes if code not in table.index]
    if unknown:
        raise LsloError(f"unknown language code(s) {unknown}; not in the language table")
    duplicated = sorted({code for code in codes if codes.count(code) > 1})
    if duplicated:
        raise LsloError(f"language code(s) {duplicated} listed more than once")
    return codes


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
