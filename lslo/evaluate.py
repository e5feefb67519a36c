"""Stage 6, evaluation (paper §5 "Evaluation", Tables 1-4/8): beam-5 decoding, spBLEU, chrF++, group pairs.

Decoding (`decode_shard`) translates every sentence of a shard's directions with one model: pretrain (the base
HF checkpoint), full (a fine-tuned HF directory) or lslo (base + language-specific adapters). Batches mix
directions; each sample carries its own source/target language (encoder input "__src__ ... </s>", decoder
prefix [decoder_start = </s>, __tgt__], the fairseq / HF M2M100 convention).

Scoring (`score_variant`) computes per direction spBLEU (sacrebleu BLEU on SentencePiece pieces, Goyal et al.
2021: with the FLORES-101/200 SentencePiece model it equals sacrebleu's tokenize="flores101"/"flores200") and
chrF++ (CHRF word_order=2), then averages by resource-group pair (H2H ... V2V) and over all directions (AVG).

Files (docs/formats.md):
    hyps TSV        columns src, tgt, id, hyp       (one row per direction and test sentence)
    directions TSV  columns src, tgt, src_group, tgt_group, pair, spbleu, chrf, n
    groups TSV      columns pair, spbleu, chrf, n_directions (pairs in Table 1 order, then AVG)
    signature JSON  <groups stem>.signature.json next to the groups TSV: sacrebleu signatures + spm model used
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import sacrebleu
import sentencepiece
from tqdm.auto import tqdm

from lslo.errors import LsloError
from lslo.io import atomic_write, atomic_write_all, read_json, stage_path, write_json, write_tsv

log = logging.getLogger(__name__)

GROUP_ORDER = ("H", "M", "L", "V")  # FLORES-101 resource types, high to very low (paper §5)
HYP_COLUMNS = ["src", "tgt", "id", "hyp"]
DIRECTION_COLUMNS = ["src", "tgt", "src_group", "tgt_group", "pair", "spbleu", "chrf", "n"]
GROUP_COLUMNS = ["pair", "spbleu", "chrf", "n_directions"]
_TSV = dict(sep="\t", quoting=csv.QUOTE_NONE, escapechar="\\")  # same dialect as results/data/*.tsv


# ---------------------------------------------------------------------------------------------- metrics

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


def signatures(spm_model: str | os.PathLike) -> dict:
    """sacrebleu signatures; spBLEU's tok field names our spm file instead of sacrebleu's 'none'."""
    label = spm_label(spm_model)
    bleu, chrf_metric = sacrebleu.BLEU(tokenize="none"), sacrebleu.CHRF(word_order=2)
    for metric in (bleu, chrf_metric):  # a signature knows the number of references only after one score
        metric.corpus_score(["x"], [["x"]])
    return {"spbleu": bleu.get_signature().format().replace("tok:none", f"tok:{label}"),
            "chrf": chrf_metric.get_signature().format(), "spm_model": str(spm_model), "spm": label}


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
    from lslo.data import read_parallel

    test = read_parallel(test_tsv)
    test["id"] = test["id"].astype(str)
    return test.set_index("id")


def _language_table(language_table) -> pd.DataFrame:
    if isinstance(language_table, pd.DataFrame):
        return language_table
    from lslo.languages import read_language_table

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
    from lslo.bootstrap import SentenceStats, sentence_stats

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
        from lslo.languages import select

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
            from lslo.bootstrap import write_sentence_stats

            write_sentence_stats(direction_sentence_stats(hyps, test, by_direction, spm_model), temporaries[3])
    avg = groups.iloc[-1]
    log.info("%s: spBLEU AVG %.2f, chrF++ AVG %.2f over %d directions", label or out_groups, avg.spbleu,
             avg.chrf, avg.n_directions)
    return groups


def signature_path(groups_tsv) -> Path:
    """Sidecar holding the sacrebleu signatures of a groups TSV (groups.tsv -> groups.signature.json)."""
    groups_tsv = Path(groups_tsv)
    return groups_tsv.with_name(f"{groups_tsv.stem}.signature.json")


# ---------------------------------------------------------------------------------------------- decoding

def shard_directions(directions, n_shards: int) -> list[list[tuple[str, str]]]:
    """Deterministic round-robin split of the directions (sorted) into n_shards non-empty-when-possible lists."""
    if n_shards < 1:
        raise LsloError(f"n_shards must be >= 1, got {n_shards}")
    ordered = sorted(tuple(d) for d in directions)
    return [ordered[i::n_shards] for i in range(n_shards)]


@dataclass
class Translator:
    """One interface over a plain HF model (pretrain/full) and an LSLoModel (lslo): codes in, strings out."""

    model: object
    tokenizer: object
    languages: list[str]  # the LSLo model's ordered language list (its language ids)
    is_lslo: bool
    device: str = "cpu"

    def encode(self, text: str, src: str) -> list[int]:
        self.tokenizer.src_lang = src  # M2M100: "__src__ tokens </s>"
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def translate(self, batch_ids: list[list[int]], srcs: list[str], tgts: list[str], beam: int,
                  max_new_tokens: int) -> list[str]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch_ids], device=self.device)
        attention_mask = (input_ids != pad).long()
        start = getattr(self.model, "base", self.model).config.decoder_start_token_id  # LSLoModel wraps HF
        prefix = torch.tensor([[start, self.tokenizer.get_lang_id(t)] for t in tgts], device=self.device)
        # length_penalty 1: fairseq-generate's --lenpen 1, as the authors decode (whatever the checkpoint's
        # generation_config says)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=prefix,
                      num_beams=beam, max_new_tokens=max_new_tokens, length_penalty=1.0)
        if self.is_lslo:
            kwargs["src_lang"] = self._lang_ids(srcs)
            kwargs["tgt_lang"] = self._lang_ids(tgts)
        else:  # the same beam loop as LSLoModel.generate, so every method is decoded alike
            from lslo.beam import with_beam_cache

            kwargs = with_beam_cache(self.model, kwargs)
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        return self.tokenizer.batch_decode(out[:, prefix.shape[1]:], skip_special_tokens=True)

    def _lang_ids(self, codes):
        import torch

        unknown = sorted(set(codes) - set(self.languages))
        if unknown:
            raise LsloError(f"language(s) {unknown} have no adapters; the model knows {self.languages}")
        return torch.tensor([self.languages.index(c) for c in codes], device=self.device)


def read_variant(variant_json) -> dict:
    """A finetune stage's variant.json with its paths (base_model, adapters, model) resolved against the file's
    own directory: a results directory copied elsewhere reads its own adapters, never the original's."""
    variant = read_json(variant_json)
    for key in ("method", "base_model"):
        if not variant.get(key):
            raise LsloError(f"{variant_json}: field '{key}' is missing")
    for key in ("base_model", "adapters", "model"):
        if variant.get(key):
            variant[key] = str(stage_path(variant[key], variant_json))
    return variant


def load_variant(variant_json, device: str | None = None) -> Translator:
    """Model + tokenizer named by a finetune stage's variant.json (method pretrain | full | lslo)."""
    import torch
    from transformers import M2M100ForConditionalGeneration

    from lslo.tokenizer import load_tokenizer

    variant = read_variant(variant_json)
    method = variant["method"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if method == "pretrain":
        model_dir = variant["base_model"]
    elif method == "full":
        model_dir = variant.get("model") or _missing(variant_json, "model", method)
    elif method == "lslo":
        model_dir = variant["base_model"]
        variant.get("adapters") or _missing(variant_json, "adapters", method)
    else:
        raise LsloError(f"{variant_json}: method '{method}', expected pretrain, full or lslo")
    from lslo.model import check_model_dir
    from lslo.tokenizer import require_languages

    check_model_dir(model_dir)
    tokenizer = load_tokenizer(variant["base_model"], variant.get("nllb_codes"))
    languages = list(variant.get("languages") or [])
    require_languages(tokenizer, languages, f"{variant_json}: base_model {variant['base_model']}")
    model = M2M100ForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    if method == "lslo":
        from lslo.adapters import load_adapters

        from lslo.checkpoint import model_identity

        model = load_adapters(model, variant["adapters"], languages=languages or None,
                              base_identity=model_identity(model_dir), base_model=model_dir)
        languages = list(model.languages)
    model.to(device).eval()
    return Translator(model, tokenizer, languages, method == "lslo", device)


def _missing(variant_json, key, method):
    raise LsloError(f"{variant_json}: method '{method}' needs field '{key}'")


def make_decoding_batches(lengths: list[int], max_tokens: int, max_sentences: int | None = None,
                          keys: list | None = None) -> list[list[int]]:
    """Sample indices sorted by source length, cut into batches with n * longest <= max_tokens (fairseq).
    With ``keys`` (one per sample) a batch never mixes keys: samples are ordered by key, then by length."""
    if keys is not None and len(keys) != len(lengths):
        raise LsloError(f"make_decoding_batches: {len(keys)} keys for {len(lengths)} samples")
    key = (lambda i: (lengths[i], i)) if keys is None else (lambda i: (keys[i], lengths[i], i))
    batches, current, longest = [], [], 0
    for i in sorted(range(len(lengths)), key=key):
        new_longest = max(longest, lengths[i])
        full = max_sentences is not None and len(current) >= max_sentences
        new_key = keys is not None and current and keys[current[-1]] != keys[i]
        if current and (new_longest * (len(current) + 1) > max_tokens or full or new_key):
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def decode_shard(variant_json, test_tsv, directions, out_hyps, beam: int = 5, max_tokens: int = 4000,
                 max_sentences: int | None = None, max_len_a: float = 0.0, max_len_b: int = 200,
                 device: str | None = None, translator: Translator | None = None) -> pd.DataFrame:
    """Translate the test sentences of `directions` ([[src, tgt], ...]) and write the hyps TSV atomically.

    Each batch holds one target language and mixes the source languages into it, sorted by source length: an
    LSLo model's target-indexed sites (the whole decoder in the paper's index plans) then run as merged layers
    W + s·BA, and only source-indexed sites route sample by sample. Each batch generates at most
    max_len_a * longest_source + max_len_b new tokens (fairseq's max_len_a/b); with max_len_a = 0 a sentence's
    hypothesis does not depend on which batch it lands in.
    """
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise LsloError(f"beam is {beam!r}, expected a whole number >= 1 (config eval.beam)")
    from lslo.tokenizer import require_languages

    translator = translator or load_variant(variant_json, device)
    codes = sorted({lang for direction in directions for lang in direction})
    require_languages(translator.tokenizer, codes, variant_json)
    test = _read_test(test_tsv)
    samples = []  # (src, tgt, id, source token ids)
    for src, tgt in directions:
        for lang in (src, tgt):
            if lang not in test.columns:
                raise LsloError(f"{test_tsv}: no column for language '{lang}' (direction {src}-{tgt})")
        for sent_id, text in test[src].items():
            samples.append((src, tgt, sent_id, translator.encode(text, src)))
    hyps = [""] * len(samples)
    batches = make_decoding_batches([len(s[3]) for s in samples], max_tokens, max_sentences,
                                    keys=[s[1] for s in samples])
    for batch in tqdm(batches, desc=f"decoding {Path(out_hyps).stem}", disable=None):
        longest = max(len(samples[i][3]) for i in batch)
        outputs = translator.translate([samples[i][3] for i in batch], [samples[i][0] for i in batch],
                                       [samples[i][1] for i in batch], beam,
                                       int(max_len_a * longest + max_len_b))
        for i, hyp in zip(batch, outputs):
            hyps[i] = " ".join(hyp.split())  # one line, no tabs: the TSV stays one row per sentence
    frame = pd.DataFrame([(s[0], s[1], s[2], h) for s, h in zip(samples, hyps)], columns=HYP_COLUMNS)
    with atomic_write(out_hyps) as tmp:
        frame.to_csv(tmp, index=False, **_TSV)
    return frame
