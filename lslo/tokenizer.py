"""Tokenizers for any language list: M2M100-style (M2M100, M2M-124, the embedded demo) and NLLB-200.

transformers' M2M100Tokenizer only knows two fixed language lists (FAIRSEQ_LANGUAGE_CODES: "m2m100", "wmt21").
M2M-124 adds 24 codes and the demo has its own, so `LsloM2M100Tokenizer` is M2M100Tokenizer with the language
list as data: `language_codes` may be a list, saved in tokenizer_config.json. Everything else (vocab.json in
fairseq dictionary order, language tokens __xx__ right after the vocabulary, src_lang/tgt_lang, text_target)
is M2M100Tokenizer's own code. Importing this module registers the class with AutoTokenizer, so
`AutoTokenizer.from_pretrained(dir)` works once `lslo.tokenizer` is imported; `load_tokenizer(dir)` always works.

NLLB-200 directories (tokenizer.json and/or sentencepiece.bpe.model, tokenizer_config.json naming NllbTokenizer)
load as `NllbCodes`: transformers' own NLLB tokenizer addressed by the workflow's language codes, each mapped to
its NLLB code (en -> eng_Latn, the language table's `nllb` column). NLLB's language tokens are the codes
themselves (no __xx__), and its source convention is transformers' default (legacy_behaviour false):
"[eng_Latn] tokens </s>", the M2M100 layout, with the target language token forced after the decoder start
</s> (NLLB Team 2022, §6.1.1). docs/your-model.md has the recipes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, processors
from transformers import AutoTokenizer, PretrainedConfig
from transformers.models.m2m_100.tokenization_m2m_100 import (FAIRSEQ_LANGUAGE_CODES, M2M100Tokenizer, load_json,
                                                              load_spm)

from lslo.errors import LsloError

log = logging.getLogger(__name__)

# fairseq Dictionary's fixed head (bos, pad, eos, unk); M2M100 keeps these ids (decoder_start = eos = 2).
FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

# M2M-124 (FLORES-101 release) = M2M-100's 100 languages + these 24; fairseq orders them by sorted(code).
M2M124_EXTRA_CODES = "as ay cjk dyu kac kam kea kg kmb kmr ku ky luo mi mt ny om qu shn sn te tg ti umb".split()
M2M124_LANGUAGE_CODES = sorted(set(FAIRSEQ_LANGUAGE_CODES["m2m100"]) | set(M2M124_EXTRA_CODES))


class LsloM2M100Tokenizer(M2M100Tokenizer):
    """M2M100Tokenizer whose `language_codes` is either a built-in list name or an explicit list of codes.

    Language token ids are len(vocab) + position in the list, as in M2M100Tokenizer and fairseq's multilingual
    task (language tokens appended to the dictionary in list order).
    """

    def __init__(self, vocab_file, spm_file, src_lang=None, tgt_lang=None, bos_token="<s>", eos_token="</s>",
                 sep_token="</s>", pad_token="<pad>", unk_token="<unk>", language_codes="m2m100",
                 sp_model_kwargs=None, num_madeup_words=8, **kwargs) -> None:
        # Same steps as M2M100Tokenizer.__init__, with the language list taken from `language_codes` itself.
        is_named = isinstance(language_codes, str)
        codes = list(FAIRSEQ_LANGUAGE_CODES[language_codes] if is_named else language_codes)
        if not codes or len(set(codes)) != len(codes):
            raise LsloError(f"language_codes must be a non-empty list of distinct codes, got {codes}")
        self.sp_model_kwargs = {} if sp_model_kwargs is None else sp_model_kwargs
        self.language_codes = language_codes
        self.lang_code_to_token = {code: f"__{code}__" for code in codes}
        additional_special_tokens = list(kwargs.pop("additional_special_tokens", None) or [])
        additional_special_tokens += [t for t in self.lang_code_to_token.values() if t not in additional_special_tokens]

        self.vocab_file = vocab_file
        self.encoder = load_json(vocab_file)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.spm_file = spm_file
        self.sp_model = load_spm(spm_file, self.sp_model_kwargs)
        self.encoder_size = len(self.encoder)
        self.lang_code_to_id = {code: self.encoder_size + i for i, code in enumerate(codes)}
        self.lang_token_to_id = {self.lang_code_to_token[c]: i for c, i in self.lang_code_to_id.items()}
        self.id_to_lang_token = {v: k for k, v in self.lang_token_to_id.items()}

        self._src_lang = src_lang if src_lang is not None else ("en" if "en" in codes else codes[0])
        self.tgt_lang = tgt_lang
        self.cur_lang_id = self.get_lang_id(self._src_lang)
        self.num_madeup_words = num_madeup_words

        super(M2M100Tokenizer, self).__init__(
            src_lang=src_lang, tgt_lang=tgt_lang, bos_token=bos_token, eos_token=eos_token, sep_token=sep_token,
            unk_token=unk_token, pad_token=pad_token, language_codes=language_codes,
            sp_model_kwargs=self.sp_model_kwargs, additional_special_tokens=additional_special_tokens,
            num_madeup_words=num_madeup_words, **kwargs,
        )
        self.set_src_lang_special_tokens(self._src_lang)

    @property
    def languages(self) -> list[str]:
        return list(self.lang_code_to_id)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """M2M100Tokenizer's files (vocab.json, sentencepiece.bpe.model) and tokenizer.json, the same tokenizer
        for transformers without lslo: `AutoTokenizer` reads it when the class named in tokenizer_config.json is
        not registered (docs/your-model.md)."""
        files = super().save_vocabulary(save_directory, filename_prefix)
        path = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + "tokenizer.json")
        try:
            fast = fast_tokenizer(self.spm_file, self.encoder, list(self.lang_token_to_id))
        except LsloError as err:  # the lslo tokenizer is exact without it; say what stock transformers will lack
            log.warning("no tokenizer.json written (%s); this tokenizer loads with lslo.tokenizer.load_tokenizer "
                        "only", err)
            return files
        fast.save(str(path))
        return (*files, str(path))

    def get_lang_token(self, lang: str) -> str:
        if lang not in self.lang_code_to_token:
            raise LsloError(f"language '{lang}' is not known to this tokenizer; it knows {self.languages}")
        return self.lang_code_to_token[lang]


class _LsloTokenizerConfig(PretrainedConfig):
    """Registration key only: AutoTokenizer.register needs a config class; this one leaves M2M100's mapping alone."""

    model_type = "lslo_m2m100_tokenizer"


AutoTokenizer.register(_LsloTokenizerConfig, tokenizer_class=LsloM2M100Tokenizer, exist_ok=True)


def fast_tokenizer(spm_model: str | os.PathLike, vocab: dict[str, int], language_tokens: list[str]) -> Tokenizer:
    """A `tokenizers` Tokenizer with the ids of LsloM2M100Tokenizer: transformers' SentencePiece conversion
    (SpmConverter: the model's normalizer, BPE merges or Unigram scores), renumbered to `vocab` (fairseq
    dictionary order), the language tokens as special added tokens at len(vocab), len(vocab) + 1, ..., and
    "$A </s>" around a text. The source language is the text's first token: "__en__ Hello" encodes as
    M2M100Tokenizer with src_lang "en" does ("__en__ tokens </s>").

    Every SentencePiece piece must be in `vocab`: fairseq maps a piece outside its dictionary to <unk>, which no
    tokenizers model can reproduce, so such a vocabulary is refused (LsloError)."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf  # noqa: PLC0415

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    pieces = {piece.piece: piece.score for piece in proto.pieces}
    normal = [p.piece for p in proto.pieces if p.type not in (2, 3)]  # neither <unk> nor control pieces
    missing = [piece for piece in normal if piece not in vocab]
    if missing:
        raise LsloError(f"{spm_model}: {len(missing)} SentencePiece piece(s) not in the vocabulary, e.g. "
                        f"{missing[:5]}; fairseq maps them to <unk>, which a tokenizer.json cannot reproduce")
    unigram = proto.trainer_spec.model_type == 1
    spm_ids = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    converted = SpmConverter.build_tokenizer_from_spm_proto(
        proto, [(p.piece, p.score) for p in proto.pieces] if unigram else spm_ids, legacy=True)
    ids = {**vocab, **{token: len(vocab) + i for i, token in enumerate(language_tokens)}}
    spec = json.loads(converted.to_str())
    if unigram:  # a token SentencePiece never emits (a special, a language token) gets no chance in the lattice
        by_id = sorted(ids, key=ids.get)
        spec["model"]["vocab"] = [[token, pieces.get(token, -1e9) if token in normal else -1e9] for token in by_id]
        spec["model"]["unk_id"] = ids[FAIRSEQ_SPECIALS[3]]
    else:
        spec["model"]["vocab"] = ids
        spec["model"]["unk_token"] = FAIRSEQ_SPECIALS[3]
    spec["added_tokens"] = []
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in FAIRSEQ_SPECIALS + list(language_tokens)])
    eos = FAIRSEQ_SPECIALS[2]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                             special_tokens=[(eos, ids[eos])])
    return tokenizer


def spm_vocab(spm_model: str | os.PathLike) -> list[str]:
    """Vocabulary in fairseq dictionary order: <s> <pad> </s> <unk>, then the SentencePiece pieces in model order.

    This is the dict.txt fairseq builds from a SentencePiece model (control and unknown pieces left out).
    """
    processor = spm.SentencePieceProcessor()
    processor.Load(str(spm_model))
    pieces = [processor.IdToPiece(i) for i in range(processor.GetPieceSize())
              if not (processor.IsControl(i) or processor.IsUnknown(i))]
    return FAIRSEQ_SPECIALS + [p for p in pieces if p not in FAIRSEQ_SPECIALS]


def build_tokenizer(spm_model: str | os.PathLike, languages: list[str], out_dir: str | os.PathLike,
                    vocab: list[str] | None = None, num_madeup_words: int | None = None) -> LsloM2M100Tokenizer:
    """Write an HF tokenizer directory (vocab.json, sentencepiece.bpe.model, tokenizer_config.json) and return it.

    vocab: token list in id order (e.g. from a fairseq dict.txt, specials first); default: `spm_vocab(spm_model)`.
    num_madeup_words: embedding rows after the language tokens (fairseq pads the dictionary to a multiple of 8);
    default: the padding to a multiple of 8. The model's vocab_size is `model_vocab_size(tokenizer)`.
    """
    spm_model = Path(spm_model)
    if not spm_model.is_file():
        raise LsloError(f"{spm_model}: SentencePiece model not found")
    tokens = spm_vocab(spm_model) if vocab is None else list(vocab)
    if tokens[:4] != FAIRSEQ_SPECIALS:
        raise LsloError(f"vocabulary must start with {FAIRSEQ_SPECIALS} (fairseq order), got {tokens[:4]}")
    duplicated = sorted({t for t in tokens if tokens.count(t) > 1}) if len(set(tokens)) != len(tokens) else []
    if duplicated:
        raise LsloError(f"vocabulary has duplicated tokens {duplicated[:10]}")
    languages = list(languages)
    clashes = [code for code in languages if f"__{code}__" in set(tokens)]
    if clashes:
        raise LsloError(f"language token(s) {[f'__{c}__' for c in clashes]} already in the vocabulary")
    if num_madeup_words is None:
        num_madeup_words = -(len(tokens) + len(languages)) % 8
    out_dir = Path(out_dir)
    present = sorted(name for name in TOKENIZER_FILES if (out_dir / name).exists())
    if present:
        raise LsloError(f"{out_dir}: already holds tokenizer file(s) {present}; choose another directory or "
                        "remove them yourself (build_tokenizer never overwrites or deletes files)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temporary sibling, then only the tokenizer's own files move into out_dir: a model directory
    # keeps its config and weights.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False,
                                                   indent=0), encoding="utf-8")
        tokenizer = LsloM2M100Tokenizer(vocab_file=str(tmp / "vocab.json"), spm_file=str(spm_model),
                                        language_codes=languages, num_madeup_words=num_madeup_words)
        tokenizer.save_pretrained(tmp)
        out_dir.mkdir(exist_ok=True)
        for path in sorted(tmp.iterdir()):
            os.replace(path, out_dir / path.name)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike, nllb_codes: dict[str, str] | None = None):
    """The tokenizer of a model directory: an M2M100-style directory (vocab.json) as LsloM2M100Tokenizer, an
    NLLB directory (tokenizer_config.json naming NllbTokenizer[Fast]) as NllbCodes.

    nllb_codes: {workflow code: NLLB code} (the language table's `nllb` column) for an NLLB tokenizer; None
    addresses NLLB languages by their NLLB codes. M2M100 tokenizers name their languages __code__ and ignore it.
    """
    path = Path(path)
    if (path / "vocab.json").is_file():
        return LsloM2M100Tokenizer.from_pretrained(str(path))
    tokenizer_class = _tokenizer_class(path)
    if tokenizer_class in NLLB_CLASSES:
        return NllbCodes.from_directory(path, nllb_codes)
    raise LsloError(f"{path}: not a tokenizer directory: no vocab.json (M2M100) and no tokenizer_config.json "
                    f"naming {' or '.join(NLLB_CLASSES)} (NLLB-200; found {tokenizer_class!r}); "
                    "docs/your-model.md says how to make one")


def _tokenizer_class(path: Path) -> str | None:
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError) as err:
        raise LsloError(f"{config}: not a JSON tokenizer config ({err})") from None


def language_token(tokenizer, code: str) -> str:
    """The token that stands for language `code` in `tokenizer` (__en__ for M2M100, eng_Latn for NLLB)."""
    if isinstance(tokenizer, NllbCodes):
        return tokenizer.lang_code_to_token.get(code, code)
    return f"__{code}__"


def nllb_codes_of(tokenizer) -> dict[str, str] | None:
    """{code: NLLB code} an NLLB tokenizer was loaded with (variant.json keeps it); None for M2M100."""
    return dict(tokenizer.lang_code_to_token) if isinstance(tokenizer, NllbCodes) else None


def require_languages(tokenizer, languages, source) -> None:
    """Every code in `languages` has a language token in `tokenizer` (loaded from `source`)."""
    missing = [code for code in languages if code not in tokenizer.lang_code_to_id]
    if missing:
        raise LsloError(f"{source}: the tokenizer has no language token for "
                        f"{[language_token(tokenizer, c) for c in missing]} (language(s) {missing}); "
                        f"it knows {list(tokenizer.lang_code_to_id)}")


NLLB_CLASSES = ("NllbTokenizer", "NllbTokenizerFast")
NLLB_SPM = "sentencepiece.bpe.model"  # the SentencePiece model of an NLLB directory (HF hub layout)
# Files a tokenizer directory may hold; build_tokenizer refuses a directory that already has one.
TOKENIZER_FILES = ("vocab.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", NLLB_SPM, "sentencepiece.model", "spm.model")


class NllbCodes:
    """transformers' NLLB tokenizer, addressed by the workflow's language codes.

    Offers what the rest of lslo uses of a tokenizer (the LsloM2M100Tokenizer interface): `get_lang_id(code)`,
    `lang_code_to_id`, `src_lang = code`, `spm_file`, `save_pretrained`; everything else (encoding, decoding,
    special token ids) is the wrapped tokenizer's own.
    """

    def __init__(self, tokenizer, nllb_codes: dict[str, str] | None, spm_file: Path | None, source) -> None:
        if getattr(tokenizer, "legacy_behaviour", False):
            raise LsloError(f"{source}: the NLLB tokenizer has legacy_behaviour true (source language token after "
                            "</s>); lslo encodes sources as [language] tokens </s> (transformers' default, NLLB "
                            "paper §6.1.1): set \"legacy_behaviour\": false in tokenizer_config.json")
        self.tokenizer = tokenizer
        self.source = str(source)
        vocab = tokenizer.get_vocab()
        named = {str(getattr(tokenizer, f"{name}_token", None)) for name in ("bos", "eos", "unk", "pad", "sep",
                                                                                 "cls", "mask")}
        known = [t for t in tokenizer.all_special_tokens if t not in named]  # eng_Latn, ..., codes added by users
        self.nllb_languages = known  # every language token the tokenizer has
        mapping = {code: code for code in known} if nllb_codes is None else dict(nllb_codes)
        self.lang_code_to_token = mapping
        self.lang_code_to_id = {code: vocab[token] for code, token in mapping.items() if token in set(known)}
        self._spm_file = spm_file
        self._src_lang = None

    @classmethod
    def from_directory(cls, path: Path, nllb_codes: dict[str, str] | None = None) -> "NllbCodes":
        if not ((path / "tokenizer.json").is_file() or (path / NLLB_SPM).is_file()):
            raise LsloError(f"{path}: NLLB tokenizer directory without tokenizer.json or {NLLB_SPM}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise LsloError(f"{path}: the NLLB tokenizer does not load ({err})") from None
        spm_file = path / NLLB_SPM
        return cls(tokenizer, nllb_codes, spm_file if spm_file.is_file() else None, path)

    @property
    def languages(self) -> list[str]:
        return list(self.lang_code_to_id)

    @property
    def spm_file(self) -> str:
        """The checkpoint's SentencePiece model (dev spBLEU during training scores with it)."""
        if self._spm_file is None:
            raise LsloError(f"{self.source}: no {NLLB_SPM} next to the NLLB tokenizer (needed for dev spBLEU)")
        return str(self._spm_file)

    def get_lang_id(self, code: str) -> int:
        if code not in self.lang_code_to_id:
            token = self.lang_code_to_token.get(code)
            known = f"its NLLB code '{token}' is not a language token" if token else "it has no NLLB code"
            raise LsloError(f"language '{code}' is not known to the NLLB tokenizer of {self.source}: {known}")
        return self.lang_code_to_id[code]

    @property
    def src_lang(self) -> str:
        return self._src_lang

    @src_lang.setter
    def src_lang(self, code: str) -> None:
        self.get_lang_id(code)
        self._src_lang = code
        self.tokenizer.src_lang = self.lang_code_to_token[code]

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name):  # pad_token_id, eos_token_id, batch_decode, ...: the NLLB tokenizer's own
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        if self._spm_file is not None:
            shutil.copyfile(self._spm_file, Path(directory) / NLLB_SPM)


def model_vocab_size(tokenizer: M2M100Tokenizer) -> int:
    """Embedding rows the model needs: vocabulary + language tokens + madeup words (M2M100 layout)."""
    return tokenizer.encoder_size + len(tokenizer.lang_code_to_id) + tokenizer.num_madeup_words
