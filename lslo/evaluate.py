"""Stage 6, evaluation (paper §5 "Evaluation", Tables 1-4/8): decoding the test directions, spBLEU, chrF++, group pairs.

Decoding (`decode_shard`) translates every sentence of a shard's directions with one variant (pretrain, full or
lslo) through lslo.inference (the loader, the decoding options, the one translate-many loop).

Scoring (`score_variant`) computes per direction spBLEU and chrF++ (lslo.metrics), then averages by
resource-group pair (H2H ... V2V) and over all directions (AVG).

Files (docs/formats.md):
    hyps TSV        columns src, tgt, id, hyp       (one row per direction and test sentence)
    directions TSV  columns src, tgt, src_group, tgt_group, pair, spbleu, chrf, n
    groups TSV      columns pair, spbleu, chrf, n_directions (pairs in Table 1 order, then AVG)
    signature JSON  <groups stem>.signature.json next to the groups TSV: sacrebleu signatures + spm model used
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lslo.bootstrap import SentenceStats, write_sentence_stats
from lslo.data import read_parallel
from lslo.errors import LsloError
from lslo.inference import DecodingOptions, Translator, load_variant, one_line, translate_many
from lslo.io import atomic_write, atomic_write_all, write_json, write_tsv
from lslo.languages import read_language_table, select
from lslo.metrics import (aggregate, chrf, load_spm, sentence_stats, signature_path, signatures, spbleu,
                          spm_pieces)
from lslo.tokenizer import require_languages

log = logging.getLogger(__name__)

HYP_COLUMNS = ["src", "tgt", "id", "hyp"]
DIRECTION_COLUMNS = ["src", "tgt", "src_group", "tgt_group", "pair", "spbleu", "chrf", "n"]
_TSV = dict(sep="\t", quoting=csv.QUOTE_NONE, escapechar="\\")  # same dialect as results/data/*.tsv


# ---------------------------------------------------------------------------------------------- scoring

def read_hyps(paths) -> pd.DataFrame:
    """Concatenate hyps TSVs (src, tgt, id, hyp); a (direction, id) found twice is an error."""
    frames = []
    for path in paths:
        if not Path(path).is_file():
            raise LsloError(f"{path}: hypotheses file not found")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, **_TSV)
        if list(frame.columns) != HYP_COLUMNS:
            raise LsloError(f"{path}: columns {list(frame.columns)}, expected {HYP_COLUMNS}")
        frames.append(frame)
    hyps = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=HYP_COLUMNS)
    dup = hyps[hyps.duplicated(["src", "tgt", "id"])]
    if len(dup):
        first = dup.iloc[0]
        raise LsloError(f"hypothesis for {first.src}-{first.tgt} sentence {first.id} appears twice in {list(paths)}")
    return hyps


def _read_test(test_tsv) -> pd.DataFrame:
    test = read_parallel(test_tsv)
    test["id"] = test["id"].astype(str)
    return test.set_index("id")


def _language_table(language_table) -> pd.DataFrame:
    if isinstance(language_table, pd.DataFrame):
        return language_table

    return read_language_table(language_table)


def score_directions(hyps: pd.DataFrame, test: pd.DataFrame, table: pd.DataFrame, spm_model,
                     directions=None, languages=None) -> pd.DataFrame:
    """Per-direction spBLEU and chrF++. `test` is indexed by sentence id, one column per language.

    directions: the expected (src, tgt) list; default: every ordered pair of `languages`, whose default is the
    test table's language columns (the data stage's language list). The hyps must cover exactly these directions,
    each with exactly the test table's sentence ids: a missing direction would drop its cells from the group
    means and from AVG (Table 1 averages over all directions), so it is an error, as is anything extra.
    """
    languages = list(test.columns) if languages is None else list(languages)
    expected = [tuple(d) for d in directions] if directions is not None else \
        [(s, t) for s in languages for t in languages if s != t]
    for lang in dict.fromkeys(lang for direction in expected for lang in direction):
        if lang not in table.index:
            raise LsloError(f"language '{lang}' of the scored directions is not in the language table")
        if lang not in test.columns:
            raise LsloError(f"language '{lang}' of the scored directions has no column in the test table")
    by_direction = dict(tuple(hyps.groupby(["src", "tgt"], sort=False)))
    _check_coverage(by_direction, expected, test, languages if directions is None else None)
    rows = []
    for src, tgt in tqdm(expected, desc="scoring", disable=None):
        sub = by_direction[(src, tgt)]
        refs = test.loc[sub["id"], tgt].tolist()
        hyp_lines = sub["hyp"].tolist()
        src_group, tgt_group = table.loc[src, "resource"], table.loc[tgt, "resource"]
        rows.append({"src": src, "tgt": tgt, "src_group": src_group, "tgt_group": tgt_group,
                     "pair": f"{src_group}2{tgt_group}", "spbleu": spbleu(hyp_lines, refs, spm_model).score,
                     "chrf": chrf(hyp_lines, refs).score, "n": len(sub)})
    return pd.DataFrame(rows, columns=DIRECTION_COLUMNS)


def _first(items, n: int = 5) -> str:
    """The first n items and how many more: 'en-wo, fr-wo and 2 more'."""
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_coverage(by_direction: dict, expected: list, test: pd.DataFrame, languages: list | None) -> None:
    """The hyps hold exactly the expected directions, each with exactly the test sentence ids."""
    of = f"of languages {languages}" if languages is not None else "given"
    missing = [f"{s}-{t}" for s, t in expected if (s, t) not in by_direction]
    if missing:
        raise LsloError(f"no hypotheses for direction {_first(missing)} ({len(missing)} of the {len(expected)} "
                        f"directions {of} are missing from the hyps files)")
    extra = [f"{s}-{t}" for s, t in by_direction if (s, t) not in set(expected)]
    if extra:
        raise LsloError(f"hypotheses for direction {_first(extra)}, which are not among the {len(expected)} "
                        f"directions {of} ({len(extra)} unexpected direction(s) in the hyps files)")
    ids = set(test.index)
    for (src, tgt) in expected:
        found = by_direction[(src, tgt)]["id"]
        if len(found) != len(test) or set(found) != ids:
            absent = sorted(ids - set(found), key=_id_order)
            unknown = sorted(set(found) - ids, key=_id_order)
            raise LsloError(f"direction {src}-{tgt}: {len(found)} hypotheses for {len(test)} test sentences "
                            f"(ids must match the test table one to one); missing id(s): {_first(absent) or 'none'}; "
                            f"id(s) not in the test table: {_first(unknown) or 'none'}")


def _id_order(sentence_id: str):
    return (0, int(sentence_id), "") if sentence_id.isdigit() else (1, 0, sentence_id)


def direction_sentence_stats(hyps: pd.DataFrame, test: pd.DataFrame, scored: pd.DataFrame, spm_model):
    """Per-sentence spBLEU statistics (lslo.bootstrap) of the directions of `scored` (score_directions' output,
    which has checked that every direction holds exactly the test ids), sentences in test-table order."""
    by_direction = {key: sub.set_index("id")["hyp"] for key, sub in hyps.groupby(["src", "tgt"], sort=False)}
    ids = [str(i) for i in test.index]
    stats = [sentence_stats(spm_pieces(by_direction[(src, tgt)].loc[ids].tolist(), spm_model),
                            spm_pieces(test[tgt].tolist(), spm_model))
             for src, tgt in zip(scored["src"], scored["tgt"])]
    return SentenceStats(np.stack(stats) if stats else np.zeros((0, len(ids), 10), dtype=np.int64),
                         scored["src"].tolist(), scored["tgt"].tolist(), scored["pair"].tolist(), ids)


def score_variant(hyp_tsvs, test_tsv, language_table, spm_model, out_directions, out_groups, label=None,
                  directions=None, languages=None, out_stats=None) -> pd.DataFrame:
    """Score one variant's hyps: writes the directions TSV, the groups TSV and its signature JSON sidecar, and
    with `out_stats` the per-sentence spBLEU statistics behind Table 1's error bars (lslo.bootstrap).

    languages (a list or subset name; default: the test table's columns) defines the n(n-1) expected directions."""
    load_spm(spm_model)  # fail before any work when the spm file is missing
    table = _language_table(language_table)
    if isinstance(languages, str):
        languages = select(table, languages)
    hyps, test = read_hyps(hyp_tsvs), _read_test(test_tsv)
    by_direction = score_directions(hyps, test, table, spm_model, directions, languages)
    groups = aggregate(by_direction)
    outputs = [out_directions, out_groups, signature_path(out_groups)] + ([out_stats] if out_stats else [])
    # the outputs are published together: a failed write (a full disk) leaves none of them
    with atomic_write_all(outputs) as temporaries:
        write_tsv(by_direction, temporaries[0], float_format="%.4f")
        write_tsv(groups, temporaries[1], float_format="%.4f")
        write_json({"label": label, **signatures(spm_model)}, temporaries[2])
        if out_stats:
            write_sentence_stats(direction_sentence_stats(hyps, test, by_direction, spm_model), temporaries[3])
    avg = groups.iloc[-1]
    log.info("%s: spBLEU AVG %.2f, chrF++ AVG %.2f over %d directions", label or out_groups, avg.spbleu,
             avg.chrf, avg.n_directions)
    return groups


# ---------------------------------------------------------------------------------------------- decoding

def shard_directions(directions, n_shards: int) -> list[list[tuple[str, str]]]:
    """Deterministic round-robin split of the directions (sorted) into n_shards non-empty-when-possible lists."""
    if n_shards < 1:
        raise LsloError(f"n_shards must be >= 1, got {n_shards}")
    ordered = sorted(tuple(d) for d in directions)
    return [ordered[i::n_shards] for i in range(n_shards)]


def decode_shard(variant_json, test_tsv, directions, out_hyps, options: DecodingOptions = DecodingOptions(),
                 device: str | None = None, translator: Translator | None = None) -> pd.DataFrame:
    """Translate the test sentences of `directions` ([[src, tgt], ...]) with `options` and write the hyps TSV
    atomically (lslo.inference.translate_many: one target language per batch, sources mixed and sorted by
    length)."""
    translator = translator or load_variant(variant_json, device)
    codes = sorted({lang for direction in directions for lang in direction})
    require_languages(translator.tokenizer, codes, variant_json)
    test = _read_test(test_tsv)
    samples = []  # (src, tgt, id, source text)
    for src, tgt in directions:
        for lang in (src, tgt):
            if lang not in test.columns:
                raise LsloError(f"{test_tsv}: no column for language '{lang}' (direction {src}-{tgt})")
        samples += [(src, tgt, sent_id, text) for sent_id, text in test[src].items()]
    hyps = translate_many(translator, [s[3] for s in samples], [s[0] for s in samples], [s[1] for s in samples],
                          options, progress=f"decoding {Path(out_hyps).stem}")
    # one line, no tabs: the TSV stays one row per sentence
    frame = pd.DataFrame([(s[0], s[1], s[2], one_line(h)) for s, h in zip(samples, hyps)], columns=HYP_COLUMNS)
    with atomic_write(out_hyps) as tmp:
        frame.to_csv(tmp, index=False, **_TSV)
    return frame
