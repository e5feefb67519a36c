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


# Decoding with transformers alone, in a fresh interpreter that never imports lslo. stdin holds a JSON list of
# [src, tgt, text, beam, max_len_b, lenpen, mode]; the source is "__src__ text" (the language token as the
# text's first token). mode "prefix": decoder_input_ids [</s>, __tgt__] and max_len_b new tokens (the evaluate
# stage's prefix); mode "forced": forced_bos_token_id __tgt__ after </s> and max_len_b + 1 new tokens (the
# language token is one of them).
STOCK_DECODE = r"""
import json, sys
import torch
from transformers import AutoTokenizer, M2M100ForConditionalGeneration

directory, requests = sys.argv[1], json.loads(sys.stdin.read())
tokenizer = AutoTokenizer.from_pretrained(directory)
model = M2M100ForConditionalGeneration.from_pretrained(directory).eval()
languages = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens
             if token.startswith("__") and token.endswith("__")}
results = []
for src, tgt, text, beam, max_len_b, lenpen, mode in requests:
    batch = tokenizer(f"__{src}__ {text}", return_tensors="pt")
    tgt_id = tokenizer.convert_tokens_to_ids(f"__{tgt}__")
    if mode == "prefix":
        how = dict(decoder_input_ids=torch.tensor([[tokenizer.eos_token_id, tgt_id]]), max_new_tokens=max_len_b)
    else:
        how = dict(forced_bos_token_id=tgt_id, max_new_tokens=max_len_b + 1)
    with torch.inference_mode():
        out = model.generate(**batch, num_beams=beam, length_penalty=lenpen, **how)
    results.append({"source": batch["input_ids"][0].tolist(), "output": out[0].tolist(),
                    "text": tokenizer.decode(out[0], skip_special_tokens=True)})
print(json.dumps({"lslo_imported": "lslo" in sys.modules, "class": type(tokenizer).__name__,
                  "languages": languages, "results": results}))
"""


def stock_transformers_decode(directory, requests) -> dict:
    """Run STOCK_DECODE on `directory` in a subprocess without the repository on its path (cwd: the directory)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", STOCK_DECODE, str(directory)], input=json.dumps(requests),
                          capture_output=True, text=True, cwd=directory, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
