"""Inference: a fine-tuned variant loaded for decoding, the decoding options, and the one translate-many loop.

The evaluate stage (lslo.evaluate.decode_shard), the per-epoch dev scores (lslo.train.dev_scores), the demo's
zero-shot report (lslo.demo) and `lslo translate` (lslo.translate) all decode through `translate_many`:

    encode each source ("__src__ tokens </s>", the fairseq / HF M2M100 convention)
    -> batches: one target language per batch, sources sorted by length under a token budget (fairseq --max-tokens)
    -> beam search: decoder prefix [decoder_start = </s>, __tgt__], at most max_len_a * longest source +
       max_len_b new tokens (fairseq's max_len_a/b), length penalty `lenpen`; `search` "fairseq" is
       fairseq-generate's beam search (lslo.search: its stop rule and its length normalization, which counts the
       language token), "hf" is HF `generate`'s; `dtype` "fp16" decodes a half-precision copy of the weights
       (fairseq-generate --fp16; CUDA only)
    -> decode, back in input order.

`DecodingOptions` is the one place that defines these options and their defaults (fairseq-generate's, as the
authors decode). The workflow records the evaluate stage's options next to each variant
(results/finetune/<variant>/decoding.json, written from config `eval`), so `lslo translate` decodes as the run did.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import M2M100ForConditionalGeneration
from transformers.utils import logging as hf_logging

from lslo.adapters import load_adapters
from lslo.beam import with_beam_cache
from lslo.checkpoint import model_identity
from lslo.errors import LsloError
from lslo.io import atomic_write, read_json, write_json
from lslo.model import check_model_dir
from lslo.search import m2m100_beam_search
from lslo.tokenizer import load_tokenizer, require_languages
from lslo.variant import decoded_model_dir, read_variant
from lslo.options import SEARCHES  # the beam searches, by name

DECODING_FILE = "decoding.json"  # next to variant.json: the decoding options the evaluate stage used
DTYPES = ("fp32", "fp16")  # fp16: the weights cast to half precision for decoding (fairseq-generate --fp16)


# ---------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class DecodingOptions:
    """How a batch of sentences is decoded. Defaults: fairseq-generate's, as the authors decode (beam 5)."""

    beam: int = 5  # beam size (paper §5: 5)
    max_len_a: float = 0.0  # at most max_len_a * longest source in the batch + max_len_b new tokens
    max_len_b: int = 200
    lenpen: float = 1.0  # length penalty, fairseq's --lenpen (whatever the checkpoint's generation_config says)
    max_tokens: int | None = 4000  # source tokens per batch, padding included (None: no token budget)
    max_sentences: int | None = None  # sentences per batch (None: no limit)
    search: str = "fairseq"  # whose beam search: fairseq-generate's (the authors') or HF generate's
    dtype: str = "fp32"  # the weights' precision while decoding; fp16 (the authors' --fp16) needs CUDA

    def __post_init__(self):
        if not _whole(self.beam) or self.beam < 1:
            raise LsloError(f"beam is {self.beam!r}, expected a whole number >= 1 (config eval.beam)")
        if not _whole(self.max_len_b) or self.max_len_b < 0:
            raise LsloError(f"max_len_b is {self.max_len_b!r}, expected a whole number >= 0 (config eval.max_len_b)")
        if not _number(self.max_len_a) or self.max_len_a < 0:
            raise LsloError(f"max_len_a is {self.max_len_a!r}, expected a number >= 0 (config eval.max_len_a)")
        if not _number(self.lenpen):
            raise LsloError(f"lenpen is {self.lenpen!r}, expected a number")
        for name in ("max_tokens", "max_sentences"):
            value = getattr(self, name)
            if value is not None and (not _whole(value) or value < 1):
                raise LsloError(f"{name} is {value!r}, expected a whole number >= 1 or null (config eval.{name})")
        for name, allowed in (("search", SEARCHES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise LsloError(f"{name} is {getattr(self, name)!r}, expected one of {', '.join(allowed)} "
                                f"(config eval.{name})")

    def max_new_tokens(self, longest_source: int) -> int:
        return int(self.max_len_a * longest_source + self.max_len_b)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "decoding options") -> "DecodingOptions":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise LsloError(f"{where}: unknown decoding option(s) {unknown}; known options are {known}")
        try:
            return cls(**values)
        except LsloError as err:
            raise LsloError(f"{where}: {err}") from None

    def replace(self, **changes) -> "DecodingOptions":
        return dataclasses.replace(self, **changes)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def decoding_options_path(variant_json) -> Path:
    """results/finetune/<v>/variant.json -> results/finetune/<v>/decoding.json."""
    return Path(variant_json).with_name(DECODING_FILE)


def write_decoding_options(options: DecodingOptions, path) -> None:
    with atomic_write(path) as tmp:
        write_json(options.to_dict(), tmp)


def read_decoding_options(path) -> DecodingOptions:
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: decoding options not found (written by the workflow's decoding_options rule)")
    values = read_json(path)
    if not isinstance(values, dict):
        raise LsloError(f"{path}: expected a JSON object of decoding options")
    return DecodingOptions.from_dict(values, str(path))


# ---------------------------------------------------------------------------------------------- the model

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

    def translate_batch(self, batch_ids: list[list[int]], srcs: list[str], tgts: list[str],
                        options: DecodingOptions, max_new_tokens: int) -> list[str]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch_ids], device=self.device)
        attention_mask = (input_ids != pad).long()
        start = getattr(self.model, "base", self.model).config.decoder_start_token_id  # LSLoModel wraps HF
        prefix = torch.tensor([[start, self.tokenizer.get_lang_id(t)] for t in tgts], device=self.device)
        if options.search == "fairseq":
            return self._fairseq_batch(input_ids, attention_mask, prefix, srcs, tgts, options, max_new_tokens)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=prefix,
                      num_beams=options.beam, max_new_tokens=max_new_tokens, length_penalty=float(options.lenpen))
        if self.is_lslo:
            kwargs["src_lang"] = self._lang_ids(srcs)
            kwargs["tgt_lang"] = self._lang_ids(tgts)
        else:  # the same beam loop as LSLoModel.generate, so every method is decoded alike

            kwargs = with_beam_cache(self.model, kwargs)
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        return self.tokenizer.batch_decode(out[:, prefix.shape[1]:], skip_special_tokens=True)

    def _fairseq_batch(self, input_ids, attention_mask, prefix, srcs, tgts, options, max_new_tokens):
        """lslo.search: the decoder start begins every hypothesis, the target-language token is forced."""
        route = {}
        if self.is_lslo:
            route = dict(routing=self.model.routing, src_lang=self._lang_ids(srcs), tgt_lang=self._lang_ids(tgts))
        hyps = m2m100_beam_search(getattr(self.model, "base", self.model), input_ids, attention_mask, prefix[:, 1:],
                                  options.beam, max_new_tokens, float(options.lenpen), **route)
        forced = prefix.shape[1] - 1
        return self.tokenizer.batch_decode([hyp.tokens[forced:] for hyp in hyps], skip_special_tokens=True)

    def _lang_ids(self, codes):
        unknown = sorted(set(codes) - set(self.languages))
        if unknown:
            raise LsloError(f"language(s) {unknown} have no adapters; the model knows {self.languages}")
        return torch.tensor([self.languages.index(c) for c in codes], device=self.device)


def load_hf_model(model_dir):
    """M2M100ForConditionalGeneration from a local directory, without transformers' weight-loading progress bar
    (a sub-second bar in every decode log and on `lslo translate --quiet`'s stderr)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return M2M100ForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_variant(variant_json, device: str | None = None) -> Translator:
    """Model + tokenizer named by a finetune stage's variant.json (method pretrain | full | lslo)."""
    variant = read_variant(variant_json)
    is_lslo = variant["method"] == "lslo"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = decoded_model_dir(variant)
    check_model_dir(model_dir)
    tokenizer = load_tokenizer(variant["base_model"], variant.get("nllb_codes"))
    languages = list(variant.get("languages") or [])
    require_languages(tokenizer, languages, f"{variant_json}: base_model {variant['base_model']}")
    model = load_hf_model(model_dir)
    if is_lslo:
        model = load_adapters(model, variant["adapters"], languages=languages or None,
                              base_identity=model_identity(model_dir), base_model=model_dir)
        languages = list(model.languages)
    model.to(device).eval()
    return Translator(model, tokenizer, languages, is_lslo, device)


def make_decoding_batches(lengths: list[int], max_tokens: int | None, max_sentences: int | None = None,
                          keys: list | None = None) -> list[list[int]]:
    """Sample indices sorted by source length, cut into batches with n * longest <= max_tokens (fairseq; None: no
    budget). With ``keys`` (one per sample) a batch never mixes keys: samples are ordered by key, then by length."""
    if keys is not None and len(keys) != len(lengths):
        raise LsloError(f"make_decoding_batches: {len(keys)} keys for {len(lengths)} samples")
    key = (lambda i: (lengths[i], i)) if keys is None else (lambda i: (keys[i], lengths[i], i))
    batches, current, longest = [], [], 0
    for i in sorted(range(len(lengths)), key=key):
        new_longest = max(longest, lengths[i])
        full = max_sentences is not None and len(current) >= max_sentences
        new_key = keys is not None and current and keys[current[-1]] != keys[i]
        over = max_tokens is not None and new_longest * (len(current) + 1) > max_tokens
        if current and (over or full or new_key):
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def translate_many(translator: Translator, texts: list[str], srcs: list[str], tgts: list[str],
                   options: DecodingOptions, progress: str | None = None, show_progress: bool | None = None
                   ) -> list[str]:
    """Hypotheses for sentence i = texts[i] translated srcs[i] -> tgts[i], in input order, as the tokenizer
    decodes them (callers that write one line per sentence join whitespace runs: `one_line`).

    Each batch holds one target language and mixes the source languages into it, sorted by source length: an
    LSLo model's target-indexed sites then run as merged layers W + s·BA, and only source-indexed sites route
    sample by sample. With max_len_a = 0 a sentence's hypothesis does not depend on which batch it lands in.
    progress: the progress bar's label (stderr; None: no bar); show_progress None hides it when stderr is not a
    terminal (a log file)."""
    if not len(texts) == len(srcs) == len(tgts):
        raise LsloError(f"translate_many: {len(texts)} texts, {len(srcs)} sources, {len(tgts)} targets")
    encoded = [translator.encode(text, src) for text, src in zip(texts, srcs)]
    lengths = [len(ids) for ids in encoded]
    hyps = [""] * len(texts)
    batches = make_decoding_batches(lengths, options.max_tokens, options.max_sentences, keys=list(tgts))
    disable = True if progress is None else (None if show_progress is None else not show_progress)
    with (decoding_precision(translator.model, options.dtype, translator.device),
          tqdm(total=len(texts), desc=progress, unit="sent", file=sys.stderr, disable=disable) as bar):
        for batch in batches:
            longest = max(lengths[i] for i in batch)
            outputs = translator.translate_batch([encoded[i] for i in batch], [srcs[i] for i in batch],
                                                 [tgts[i] for i in batch], options, options.max_new_tokens(longest))
            for i, hyp in zip(batch, outputs):
                hyps[i] = hyp
            bar.update(len(batch))
    return hyps


@contextmanager
def decoding_precision(model, dtype: str, device):
    """``model`` with its floating-point parameters and buffers in ``dtype`` ("fp16": half precision, as
    fairseq-generate --fp16 calls model.half()) for the block, and the very same tensors as before afterwards:
    the fp32 weights are set aside, not cast back, so a model in training (lslo.train.dev_scores) loses nothing."""
    if dtype == "fp32":
        yield model
        return
    if torch.device(device).type != "cuda":
        raise LsloError(f"eval.dtype is {dtype}, which decodes on CUDA only; this decoding runs on {device} "
                        f"(set eval.dtype: fp32, or lslo translate --dtype fp32)")
    params = [(p, p.data) for p in model.parameters() if p.is_floating_point()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()
               if b is not None and b.is_floating_point()]
    try:
        for p, data in params:
            p.data = data.half()
        for m, name, b in buffers:
            m._buffers[name] = b.half()
        yield model
    finally:
        for p, data in params:
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


def one_line(hyp: str) -> str:
    """A hypothesis on one line without tabs (whitespace runs joined): a TSV row or an output line per sentence."""
    return " ".join(hyp.split())
