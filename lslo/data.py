"""FLORES readers, the multi-parallel split tables, and the many-to-many training data pipeline.

Paper §5: the FLORES-101 dev split is the training set, devtest the test set; every ordered pair of the chosen
languages is a training direction (n(n-1) directions), sampled with temperature T (p_d ∝ (n_d/Σn)^(1/T)).
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from lslo.errors import LsloError
from lslo.io import atomic_write_all, write_tsv
from lslo.languages import file_code, read_language_table, select

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "dev", "test": "devtest"}  # paper §5: dev -> training, devtest -> evaluation
LAYOUTS = {  # layout -> (language-table column with the file code, file patterns under the root, first found)
    "flores101": ("flores101", ["{split}/{code}.{split}"]),  # flores101_dataset/dev/eng.dev
    "flores200": ("flores200", ["{split}/{code}.{split}"]),  # flores200_dataset/dev/eng_Latn.dev
    # FLORES+ (openlanguagedata): the Hugging Face dataset holds dev/eng_Latn.jsonl (earlier revisions
    # dev/eng_Latn.parquet), one record per sentence with fields id and text; the GitHub release archives hold
    # plain text dev/dev.eng_Latn. Codes: the table's floresplus column (default: flores200).
    "floresplus": ("floresplus", ["{split}/{code}.jsonl", "{split}/{code}.parquet", "{split}/{split}.{code}"]),
}
_TSV = dict(sep="\t", quoting=csv.QUOTE_NONE, escapechar="\\")  # docs/formats.md: results/data/{split}.tsv


# ---------------------------------------------------------------- FLORES files -> multi-parallel tables

def flores_path(root: str | os.PathLike, layout: str, code: str, flores_split: str) -> Path:
    """Path of one language's file (the first pattern of the layout that exists, else its first pattern):
    flores_split is the FLORES split name ("dev" or "devtest"), code the file code."""
    paths = [Path(root) / pattern.format(split=flores_split, code=code) for pattern in LAYOUTS[layout][1]]
    return next((path for path in paths if path.is_file()), paths[0])


def detect_layout(root: str | os.PathLike, table: pd.DataFrame, languages: str | list[str]) -> str:
    """The one layout under which every language has its dev and devtest file; none or several is an error
    (a directory holding both eng.dev and eng_Latn.dev names no layout: set data.layout)."""
    languages = [languages] if isinstance(languages, str) else list(languages)
    missing = {}  # layout -> (language, what it lacks: a file, or the language's code in the table)
    for layout, (column, _) in LAYOUTS.items():
        for code in languages:
            stem = file_code_or_none(table, code, column)
            if stem is None:
                missing[layout] = (code, f"no {column} code in the language table")
                break
            paths = [flores_path(root, layout, stem, split) for split in SPLIT_FILES.values()]
            absent = [path for path in paths if not path.is_file()]
            if absent:
                missing[layout] = (code, absent[0])
                break
    matching = [layout for layout in LAYOUTS if layout not in missing]
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise LsloError(f"{root}: FLORES layouts {matching} all match the files present; set data.layout to one")
    code = max(missing.values(), key=lambda item: languages.index(item[0]))[0]
    tried = "; ".join(f"{layout}: {what} (language '{lang}')" for layout, (lang, what) in missing.items())
    raise LsloError(f"{root}: no FLORES layout found for language '{code}'; missing: {tried}")


def file_code_or_none(table: pd.DataFrame, code: str, column: str) -> str | None:
    try:
        return file_code(table, code, column)
    except LsloError:
        return None


def read_flores(root: str | os.PathLike, languages: list[str], table: pd.DataFrame, split: str,
                layout: str = "auto") -> pd.DataFrame:
    """One split ("train" = FLORES dev, "test" = devtest) as a multi-parallel table: column id + one per language."""
    if split not in SPLIT_FILES:
        raise LsloError(f"unknown split '{split}'; expected one of {list(SPLIT_FILES)}")
    languages = select(table, list(languages))
    if layout == "auto":
        layout = detect_layout(root, table, languages)
    if layout not in LAYOUTS:
        raise LsloError(f"unknown FLORES layout '{layout}'; expected 'auto' or one of {list(LAYOUTS)}")
    columns, ids, paths = {}, {}, {}
    for code in languages:
        path = paths[code] = flores_path(root, layout, file_code(table, code, LAYOUTS[layout][0]), SPLIT_FILES[split])
        if path.suffix in RECORD_FILES:
            ids[code], columns[code] = _read_records(path, code)
        else:
            columns[code] = _read_lines(path, code)
    _check_same_ids(ids, SPLIT_FILES[split], root)  # names the missing ids, where line counts would only differ
    first = languages[0]
    for code in languages[1:]:
        if len(columns[code]) != len(columns[first]):
            raise LsloError(f"unequal line counts: {paths[first]} has {len(columns[first])} lines, "
                            f"{paths[code]} has {len(columns[code])} (language '{code}')")
    return pd.DataFrame({"id": range(len(columns[first])), **columns})


def _check_same_ids(ids: dict[str, list[int]], flores_split: str, root) -> None:
    """FLORES+ records carry sentence ids: every language must hold the same ones, or sentences sorted by id
    would stand beside other sentences' translations (two files that each lack a different id have equal line
    counts). `ids`: {language: its sorted ids}."""
    union = sorted(set().union(*ids.values())) if ids else []
    for code, own in ids.items():
        if own != union:
            missing = sorted(set(union) - set(own))
            having = next(other for other, theirs in ids.items() if set(missing) & set(theirs))
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise LsloError(f"{root}: FLORES+ split {flores_split}: language '{code}' lacks sentence id(s) "
                            f"{missing[:5]}{more} that language '{having}' has; every language needs the same ids")


RECORD_FILES = (".jsonl", ".parquet")  # FLORES+ on the Hugging Face hub: records with fields id and text


def _read_records(path: Path, language: str) -> tuple[list[int], list[str]]:
    """(sorted ids, texts in that order) of a FLORES+ .jsonl/.parquet file (ids must be distinct integers).
    Each text gets the checks of a line of a text file (_read_lines): not empty, no line break, no CR."""
    if path.suffix == ".parquet":
        try:
            records = pd.read_parquet(path, columns=["id", "text"]).to_dict("records")
        except ImportError:
            raise LsloError(f"{path}: reading FLORES+ parquet files needs pyarrow (pip install pyarrow)") from None
    else:
        records = []
        for number, line in enumerate(_read_text(path, language).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LsloError(f"{path}: line {number} is not JSON ({err.msg})") from None
    bad = next((r for r in records if not isinstance(r, dict) or "id" not in r or "text" not in r), None)
    if bad is not None or not records:
        raise LsloError(f"{path}: FLORES+ file for language '{language}' needs records with fields 'id' and "
                        f"'text'{'' if records else ' (it has none)'}")
    bad = next((r["id"] for r in records if not _is_whole_number(r["id"])), None)
    if bad is not None:
        raise LsloError(f"{path}: sentence id {bad!r} is not a whole number (language '{language}')")
    ids = [int(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise LsloError(f"{path}: sentence ids repeat (language '{language}')")
    records = sorted(records, key=lambda r: int(r["id"]))
    for record in records:
        text = record["text"]
        where = f"{path}: sentence id {int(record['id'])}"
        if not isinstance(text, str):
            raise LsloError(f"{where}: text is {type(text).__name__} {text!r}, expected a string "
                            f"(language '{language}')")
        if "\r" in text:
            raise LsloError(f"{where}: carriage return (CR) inside the sentence at character {text.index(chr(13)) + 1} "
                            f"(language '{language}'); a sentence holds no line break")
        if "\n" in text:
            raise LsloError(f"{where}: line feed (LF) inside the sentence at character {text.index(chr(10)) + 1} "
                            f"(language '{language}'); a sentence holds no line break")
        if not text.strip():
            raise LsloError(f"{where} is empty (language '{language}')")
    return sorted(ids), [record["text"] for record in records]


def _is_whole_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, str):
        return value.strip().isdigit()
    return False


def _read_text(path: Path, language: str) -> str:
    """A FLORES file's text: UTF-8, a leading byte order mark dropped; a missing file or a byte that is not UTF-8
    stops with one line naming the file, the language and where."""
    if not path.is_file():
        raise LsloError(f"{path}: FLORES file for language '{language}' not found")
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise LsloError(f"{path}: line {line}: byte 0x{data[offset]:02x} at offset {offset} is not UTF-8 "
                        f"(language '{language}'); FLORES files must be UTF-8") from None


def _read_lines(path: Path, language: str) -> list[str]:
    """One sentence per line. Lines end at "\n" only: universal-newline reading would also end a line at a lone
    "\r" (and str.splitlines at U+2028 and other separators) and so shift every later sentence against its
    translations. CRLF endings and a leading UTF-8 byte order mark are accepted; a CR anywhere else is refused,
    since FLORES sentences hold no control characters and TSV readers would split the row there."""
    lines = _read_text(path, language).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.removesuffix("\r") for line in lines]
    if not lines:
        raise LsloError(f"{path}: FLORES file for language '{language}' has no lines; expected one sentence per line")
    for number, line in enumerate(lines, start=1):
        if "\r" in line:
            column = line.index("\r") + 1
            raise LsloError(f"{path}: line {number}: carriage return (CR) inside the sentence at character {column} "
                            f"(language '{language}'); lines must end with LF or CRLF only")
        if not line.strip():
            raise LsloError(f"{path}: line {number} is empty (language '{language}')")
    return lines


def write_parallel(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a multi-parallel table (column id + one column per language) atomically; format in docs/formats.md."""
    if list(table.columns[:1]) != ["id"] or len(table.columns) < 2:
        raise LsloError(f"{path}: a parallel table needs column 'id' first and at least one language column")
    write_tsv(table, path, **{k: v for k, v in _TSV.items() if k != "sep"})


def read_parallel(path: str | os.PathLike, languages: list[str] | None = None) -> pd.DataFrame:
    """Read results/data/{split}.tsv; keep column id and `languages` (default: all) in that order."""
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: parallel table not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False, **_TSV)
    if "id" not in table.columns:
        raise LsloError(f"{path}: no 'id' column; columns are {list(table.columns)}")
    table["id"] = table["id"].astype(int)
    languages = [c for c in table.columns if c != "id"] if languages is None else list(languages)
    missing = [code for code in languages if code not in table.columns]
    if missing:
        raise LsloError(f"{path}: no column for language(s) {missing}; it has {list(table.columns[1:])}")
    return table[["id", *languages]]


def prepare_data(flores_root: str | os.PathLike, layout: str, language_table_path: str | os.PathLike,
                 languages: str | list[str], out_train: str | os.PathLike, out_test: str | os.PathLike,
                 test_sentences: int | None = None) -> None:
    """The data stage: FLORES dev/devtest -> results/data/{train,test}.tsv. Both splits are read and checked
    before anything is written, so bad input leaves no output, and the two tables are published together, so a
    failed write (a full disk) leaves neither. test_sentences keeps only the first N devtest sentences."""
    table = read_language_table(language_table_path)
    codes = select(table, languages)
    if layout == "auto":
        layout = detect_layout(flores_root, table, codes)
    train = read_flores(flores_root, codes, table, "train", layout)
    test = read_flores(flores_root, codes, table, "test", layout)
    if test_sentences:  # eval.max_sentences: evaluate on the first N devtest sentences (demo, smoke runs)
        test = test.head(test_sentences)
    with atomic_write_all([out_train, out_test]) as (tmp_train, tmp_test):  # both tables or neither
        write_parallel(train, tmp_train)
        write_parallel(test, tmp_test)
    log.info("wrote %d train and %d test sentences in %d languages (%s layout)", len(train), len(test),
             len(codes), layout)


# ---------------------------------------------------------------- directions and temperature sampling

Direction = tuple[str, str]


def directions(languages: list[str]) -> list[Direction]:
    """All n(n-1) ordered pairs (src, tgt), src != tgt, in language-list order."""
    return [(src, tgt) for src in languages for tgt in languages if src != tgt]


def temperature_probs(sizes: dict[Direction, int], temperature: float = 5.0) -> dict[Direction, float]:
    """p_d ∝ (n_d / Σn)^(1/T): T=1 is proportional sampling, T→∞ uniform."""
    if temperature <= 0:
        raise LsloError(f"sampling temperature must be > 0, got {temperature}")
    bad = {d: n for d, n in sizes.items() if n <= 0}
    if bad:
        raise LsloError(f"every direction needs at least one sentence pair; empty: {bad}")
    keys = list(sizes)
    n = np.array([sizes[d] for d in keys], dtype=np.float64)
    weights = (n / n.sum()) ** (1.0 / temperature)
    return dict(zip(keys, weights / weights.sum()))


class Example(NamedTuple):
    index: int  # sentence id within the direction's data (the row id for a multi-parallel table)
    src: str
    tgt: str


class TemperatureSampler:
    """Draws one epoch of examples: direction d gets round(p_d * epoch_size) examples (largest remainder),
    drawn from its data without replacement (whole passes first when it needs more than it has), as fairseq's
    SampledMultiDataset does. The numpy RNG state is saved by state_dict() for resume."""

    def __init__(self, sizes: dict[Direction, int], temperature: float = 5.0, seed: int = 0,
                 epoch_size: int | None = None) -> None:
        self.sizes = dict(sizes)
        self.probs = temperature_probs(self.sizes, temperature)
        self.epoch_size = sum(self.sizes.values()) if epoch_size is None else int(epoch_size)
        self.rng = np.random.default_rng(seed)

    def counts(self) -> dict[Direction, int]:
        expected = np.array(list(self.probs.values())) * self.epoch_size
        counts = np.floor(expected).astype(int)
        remainder_order = np.argsort(-(expected - counts), kind="stable")
        counts[remainder_order[: self.epoch_size - counts.sum()]] += 1
        return dict(zip(self.probs, counts.tolist()))

    def epoch(self) -> list[Example]:
        examples = []
        for (src, tgt), count in self.counts().items():
            size = self.sizes[(src, tgt)]
            passes, rest = divmod(count, size)
            ids = [np.arange(size)] * passes + [self.rng.choice(size, rest, replace=False)]
            examples += [Example(int(i), src, tgt) for i in np.concatenate(ids)]
        order = self.rng.permutation(len(examples))
        return [examples[i] for i in order]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


# ---------------------------------------------------------------- token ids, batches, collate

class Corpus:
    """Pre-tokenized training data: per direction, the SentencePiece ids (no special tokens) of sources and targets.

    `Corpus.multiparallel` shares one token list per language among all directions (FLORES); `Corpus(pairs)`
    takes explicit per-direction lists, whose sizes may differ (e.g. imbalanced pretraining bitext)."""

    def __init__(self, pairs: dict[Direction, tuple[list[list[int]], list[list[int]]]]) -> None:
        for (src, tgt), (src_ids, tgt_ids) in pairs.items():
            if len(src_ids) != len(tgt_ids):
                raise LsloError(f"direction {src}-{tgt}: {len(src_ids)} sources but {len(tgt_ids)} targets")
        self.pairs = pairs

    @classmethod
    def multiparallel(cls, table: pd.DataFrame, languages: list[str], tokenizer) -> "Corpus":
        tokens = {code: tokenize_column(table[code].tolist(), tokenizer) for code in languages}
        return cls({(s, t): (tokens[s], tokens[t]) for s, t in directions(languages)})

    def sizes(self) -> dict[Direction, int]:
        return {d: len(src_ids) for d, (src_ids, _) in self.pairs.items()}

    def check_lengths(self, max_tokens: int) -> None:
        """Refuse a sentence that no batch could hold (fairseq --max-tokens), before training starts: make_batches
        would only meet it when the sampler first draws it, possibly epochs later with checkpoints written."""
        too_long, checked = [], set()
        for (src, tgt), sides in self.pairs.items():
            for language, token_lists in zip((src, tgt), sides):
                if id(token_lists) in checked:  # multi-parallel corpora share one list per language
                    continue
                checked.add(id(token_lists))
                too_long += [(language, f"{src}-{tgt}", index, len(ids) + 2)  # + language token and </s>
                             for index, ids in enumerate(token_lists) if len(ids) + 2 > max_tokens]
        if too_long:
            language, direction, index, length = too_long[0]
            more = f"; {len(too_long) - 1} more sentence(s) are too long" if len(too_long) > 1 else ""
            raise LsloError(f"training sentence {index} of language '{language}' (direction {direction}) has {length} "
                            f"tokens with its language token and </s>, more than max_tokens={max_tokens}{more}; "
                            "raise max_tokens or remove the sentence")

    def lengths(self, example: Example) -> tuple[int, int]:
        """Encoder and label lengths with the language token and </s> (M2M100: [lang] + ids + [eos])."""
        src_ids, tgt_ids = self.pairs[(example.src, example.tgt)]
        return len(src_ids[example.index]) + 2, len(tgt_ids[example.index]) + 2


def tokenize_column(texts: list[str], tokenizer) -> list[list[int]]:
    """SentencePiece ids of each text, without language token or </s> (added per batch by `collate`)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def make_batches(examples: list[Example], corpus: Corpus, max_tokens: int, mixed: bool = True,
                 rng: np.random.Generator | None = None) -> list[list[Example]]:
    """Token-budget batches: batch_size * max(longest source, longest target) <= max_tokens, padding included
    (fairseq's --max-tokens). Examples are sorted by length so padding stays small; the batch order is shuffled.
    mixed=False keeps one direction per batch (the LSLo fast path)."""
    groups = [examples] if mixed else _by_direction(examples)
    batches = []
    for group in groups:
        lengths = [max(corpus.lengths(e)) for e in group]
        batch, longest = [], 0
        for i in np.argsort(lengths, kind="stable"):
            if lengths[i] > max_tokens:
                e = group[i]
                raise LsloError(f"sentence {e.index} of direction {e.src}-{e.tgt} has {lengths[i]} tokens, "
                                f"more than max_tokens={max_tokens}")
            if batch and (len(batch) + 1) * max(longest, lengths[i]) > max_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(group[i])
            longest = max(longest, lengths[i])
        if batch:
            batches.append(batch)
    order = (rng or np.random.default_rng(0)).permutation(len(batches))
    return [batches[i] for i in order]


def _by_direction(examples: list[Example]) -> list[list[Example]]:
    groups: dict[Direction, list[Example]] = {}
    for e in examples:
        groups.setdefault((e.src, e.tgt), []).append(e)
    return list(groups.values())


def collate(batch: list[Example], corpus: Corpus, tokenizer, languages: list[str]) -> dict:
    """Tensors for M2M100ForConditionalGeneration, identical to tokenizer(src, text_target=tgt) per sample:
    input_ids = [src_lang_token] + ids + [</s>], labels = [tgt_lang_token] + ids + [</s>] (pad -> -100); the model
    builds decoder_input_ids = [</s>] + labels[:-1] itself (shift_tokens_right, decoder_start_token_id = eos).
    src_lang / tgt_lang are ids into `languages` (the model's ordered language list)."""
    lang_index = {code: i for i, code in enumerate(languages)}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sources, targets = [], []
    for e in batch:
        src_ids, tgt_ids = corpus.pairs[(e.src, e.tgt)]
        sources.append([tokenizer.get_lang_id(e.src), *src_ids[e.index], eos])
        targets.append([tokenizer.get_lang_id(e.tgt), *tgt_ids[e.index], eos])
    input_ids = _pad(sources, pad)
    labels = _pad(targets, -100)
    return {
        "input_ids": input_ids,
        "attention_mask": _pad([[1] * len(row) for row in sources], 0),
        "labels": labels,
        "src_lang": torch.tensor([lang_index[e.src] for e in batch], dtype=torch.long),
        "tgt_lang": torch.tensor([lang_index[e.tgt] for e in batch], dtype=torch.long),
        "n_tokens": int((labels != -100).sum()),
    }


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
