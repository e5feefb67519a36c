"""Tiny checkpoint directories the tests build: an NLLB-200-format one and an M2M100 one (random weights).

    make_nllb_model_dir(directory, ["eng_Latn", "fra_Latn"])   NllbTokenizer files + sentencepiece.bpe.model
    make_m2m100_model_dir(directory, ["en", "fr"])             lslo.tokenizer.build_tokenizer files (vocab.json)

Both follow the released layouts: config.json (model_type m2m_100), model.safetensors, generation_config.json
with decoder_start_token_id = </s> (2), the tokenizer files next to them.
"""

import random
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

SYLLABLES = ["lo", "ra", "mi", "ta", "ke", "su", "no", "pa", "vi", "zen", "qua", "bel", "ö", "ñu"]


def train_spm(directory, vocab_size=60, name="sp") -> Path:
    """A small BPE SentencePiece model trained on syllable soup (the words of `syllable_sentences`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / f"{name}.txt"
    corpus.write_text("\n".join(syllable_sentences(400, seed=0)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / name), vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    return directory / f"{name}.model"


def syllable_sentences(n, seed=0, words=8) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(SYLLABLES) + rng.choice(SYLLABLES) for _ in range(words)) for _ in range(n)]


def tiny_config(vocab_size: int, **overrides) -> M2M100Config:
    kwargs = dict(vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=32,
                  decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                  max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  scale_embedding=True)
    kwargs.update(overrides)
    return M2M100Config(**kwargs)


def _save_model(directory: Path, vocab_size: int, seed: int, tokenizer_class=None, **overrides) -> None:
    torch.manual_seed(seed)
    config = tiny_config(vocab_size, **overrides)
    if tokenizer_class:
        config.tokenizer_class = tokenizer_class  # as in facebook/nllb-200-*'s config.json
    model = M2M100ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = config.decoder_start_token_id
    model.save_pretrained(directory)


def make_nllb_model_dir(directory, nllb_codes, seed: int = 0, spm_model=None, **overrides) -> Path:
    """An NLLB-200-format directory: NllbTokenizer (tokenizer.json, tokenizer_config.json) converted by
    transformers from sentencepiece.bpe.model, the language codes as its special tokens, a tiny M2M100."""
    import shutil

    from transformers import NllbTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm_model = spm_model or train_spm(directory.parent / f"{directory.name}-spm")
    shutil.copyfile(spm_model, directory / "sentencepiece.bpe.model")
    tokenizer = NllbTokenizer.from_pretrained(str(directory), additional_special_tokens=list(nllb_codes))
    tokenizer.save_pretrained(directory)
    _save_model(directory, vocab_size=len(tokenizer), seed=seed, tokenizer_class="NllbTokenizer", **overrides)
    return directory


def make_m2m100_model_dir(directory, codes, seed: int = 0, spm_model=None, **overrides) -> Path:
    """An M2M100-style directory with an lslo tokenizer for `codes` (__xx__ tokens) and a tiny M2M100."""
    from lslo.tokenizer import build_tokenizer, model_vocab_size

    directory = Path(directory)
    spm_model = spm_model or train_spm(directory.parent / f"{directory.name}-spm")
    tokenizer = build_tokenizer(spm_model, list(codes), directory)
    _save_model(directory, vocab_size=model_vocab_size(tokenizer), seed=seed, **overrides)
    return directory
