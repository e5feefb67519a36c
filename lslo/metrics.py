"""Translation metrics (paper §5 "Evaluation"): spBLEU, chrF++, their signatures, per-sentence BLEU statistics,
and the resource-group cells of Table 1 (pair order, group means, AVG over directions).

spBLEU is sacrebleu BLEU on SentencePiece pieces (Goyal et al. 2021: with the FLORES-101/200 SentencePiece model
it equals sacrebleu's tokenize="flores101"/"flores200"); chrF++ is sacrebleu CHRF with word_order=2.
The evaluate stage (lslo.evaluate), the per-epoch dev scores (lslo.train), the demo's report and the bootstrap
intervals (lslo.bootstrap) all score with these functions.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import sacrebleu
import sentencepiece

from lslo.errors import LsloError

GROUP_ORDER = ("H", "M", "L", "V")  # FLORES-101 resource types, high to very low (paper §5)
GROUP_COLUMNS = ["pair", "spbleu", "chrf", "n_directions"]


# ---------------------------------------------------------------------------------------------- corpus scores

@lru_cache(maxsize=4)
def _load_spm(path: str) -> sentencepiece.SentencePieceProcessor:
    processor = sentencepiece.SentencePieceProcessor()
    processor.Load(path)
    return processor


def load_spm(spm_model: str | os.PathLike) -> sentencepiece.SentencePieceProcessor:
    path = Path(spm_model)
    if not path.is_file():
        raise LsloError(f"{path}: spBLEU SentencePiece model not found (config: the FLORES-101/200 spm file)")
    return _load_spm(str(path.resolve()))


def spm_pieces(lines: list[str], spm_model: str | os.PathLike) -> list[str]:
    """Lines as space-joined SentencePiece pieces, exactly as sacrebleu's TokenizerSPM (rstrip, then encode)."""
    processor = load_spm(spm_model)
    return [" ".join(processor.EncodeAsPieces(line.rstrip())) for line in lines]


def spbleu(hyps: list[str], refs: list[str], spm_model: str | os.PathLike) -> sacrebleu.BLEUScore:
    """Corpus spBLEU: sacrebleu BLEU (defaults: exp smoothing, mixed case) on SentencePiece-tokenized text."""
    _check_lengths(hyps, refs)
    bleu = sacrebleu.BLEU(tokenize="none")
    return bleu.corpus_score(spm_pieces(hyps, spm_model), [spm_pieces(refs, spm_model)])


def chrf(hyps: list[str], refs: list[str]) -> sacrebleu.CHRFScore:
    """Corpus chrF++ (character 6-grams + word bigrams) on detokenized text."""
    _check_lengths(hyps, refs)
    return sacrebleu.CHRF(word_order=2).corpus_score(list(hyps), [list(refs)])


def _check_lengths(hyps, refs) -> None:
    if len(hyps) != len(refs):
        raise LsloError(f"{len(hyps)} hypotheses but {len(refs)} references")


def spm_label(spm_model: str | os.PathLike) -> str:
    """Names the SentencePiece model by file name and content hash (a signature must identify the tokenizer)."""
    path = Path(spm_model)
    load_spm(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"spm[{path.name}@sha256:{digest}]"


def signature_path(groups_tsv) -> Path:
    """Sidecar holding the sacrebleu signatures of a groups TSV (groups.tsv -> groups.signature.json)."""
    groups_tsv = Path(groups_tsv)
    return groups_tsv.with_name(f"{groups_tsv.stem}.signature.json")


def signatures(spm_model: str | os.PathLike) -> dict:
    """sacrebleu signatures; spBLEU's tok field names our spm file instead of sacrebleu's 'none'."""
    label = spm_label(spm_model)
    bleu, chrf_metric = sacrebleu.BLEU(tokenize="none"), sacrebleu.CHRF(word_order=2)
    for metric in (bleu, chrf_metric):  # a signature knows the number of references only after one score
        metric.corpus_score(["x"], [["x"]])
    return {"spbleu": bleu.get_signature().format().replace("tok:none", f"tok:{label}"),
            "chrf": chrf_metric.get_signature().format(), "spm_model": str(spm_model), "spm": label}


# ---------------------------------------------------------------------------------------------- per sentence

def sentence_stats(hyp_pieces: list[str], ref_pieces: list[str]) -> np.ndarray:
    """Per-sentence BLEU sufficient statistics (n, 10) of SentencePiece-tokenized lines (sacrebleu BLEU defaults,
    tokenize="none": the same metric as `spbleu`): hypothesis length, reference length, matching and total
    n-grams for n = 1..4. Corpus spBLEU is a function of their sum (lslo.bootstrap.bleu_from_stats)."""
    if len(hyp_pieces) != len(ref_pieces):
        raise LsloError(f"{len(hyp_pieces)} hypotheses but {len(ref_pieces)} references")
    bleu = sacrebleu.BLEU(tokenize="none")
    return np.asarray(bleu._extract_corpus_statistics(list(hyp_pieces), [list(ref_pieces)]), dtype=np.int64)


# ---------------------------------------------------------------------------------------------- groups

def pair_order(groups) -> list[str]:
    """Group-pair columns in the paper's order (H2H H2M H2L H2V M2H ... V2V) for the groups present."""
    present = [g for g in GROUP_ORDER if g in set(groups)]
    return [f"{s}2{t}" for s in present for t in present]


def aggregate(direction_df: pd.DataFrame) -> pd.DataFrame:
    """Mean spBLEU/chrF++ per group pair, then AVG = mean over all directions (not over group cells, Table 1).

    Pairs with no directions (e.g. H2L when no L language is evaluated) are omitted.
    """
    groups = set(direction_df["src_group"]) | set(direction_df["tgt_group"])
    rows = []
    for pair in pair_order(groups):
        cell = direction_df[direction_df["pair"] == pair]
        if len(cell):
            rows.append({"pair": pair, "spbleu": cell["spbleu"].mean(), "chrf": cell["chrf"].mean(),
                         "n_directions": len(cell)})
    rows.append({"pair": "AVG", "spbleu": direction_df["spbleu"].mean(), "chrf": direction_df["chrf"].mean(),
                 "n_directions": len(direction_df)})
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)
