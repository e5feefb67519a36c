"""The embedded demo's tiny pretrained model: SentencePiece, tokenizer, M2M100 pretrained on imbalanced bitext.

Stands in for the paper's M2M-124 615M (§5): the same architecture class (M2M100ForConditionalGeneration),
the same tokenizer kind (SentencePiece + `__xx__` language tokens, forced target-language BOS), trained from
scratch on the demo bitext (lslo.demo_benchmark), which is English-centric and imbalanced (H >> M >> V) so
that its zero-shot quality shows the gap the paper starts from (Table 1, Pretrain row).

    make_benchmark(out_dir, n_languages=12, seed=1, bitext_scale=1.0)  (re-exported from lslo.demo_benchmark)
    pretrain_demo_model(benchmark_dir, out_dir, seed=1, max_steps=1000, ...)
    zero_shot_report(model_dir, benchmark_dir, ...) -> (per-direction DataFrame, per-group DataFrame)

The checkpoint directory holds the HF model (config.json, model.safetensors, generation_config.json with
decoder_start_token_id = eos), the tokenizer files (lslo.tokenizer.load_tokenizer reads them), `spm.model`
(the SentencePiece model, for spBLEU) and `pretrain.json` (settings, steps, minutes, loss curve).
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import sentencepiece as spm
import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

from lslo.data import Corpus, TemperatureSampler, make_batches
from lslo.demo_benchmark import make_benchmark, read_bitext  # noqa: F401 - make_benchmark is part of this API
from lslo.inference import DecodingOptions, Translator, load_hf_model, translate_many
from lslo.io import atomic_write, write_json
from lslo.languages import read_language_table
from lslo.metrics import aggregate, chrf, spbleu
from lslo.tokenizer import build_tokenizer, load_tokenizer, model_vocab_size
from lslo.train import BatchSource, TrainOptions, make_trainer, training_epochs

log = logging.getLogger(__name__)

LOG_EVERY = 50  # updates between pretraining log lines (and points of the loss curve in pretrain.json)
SPM_SENTENCES_PER_LANGUAGE = 3000  # balanced SentencePiece training sample, as FLORES' spm upsamples low-resource text


def train_demo_spm(benchmark_dir: str | Path, model_file: str | Path, vocab_size: int = 2000, seed: int = 1) -> Path:
    """Train a unigram SentencePiece model on a language-balanced sample of the demo bitext and dev text."""
    root = Path(benchmark_dir)
    per_language: dict[str, set[str]] = defaultdict(set)
    for (a, b), (lines_a, lines_b) in read_bitext(root).items():
        per_language[a].update(lines_a)
        per_language[b].update(lines_b)
    for path in sorted((root / "dev").glob("*.dev")):
        per_language[path.stem].update(path.read_text(encoding="utf-8").splitlines())
    rng = random.Random(seed)
    sample = []
    for code in sorted(per_language):
        lines = sorted(per_language[code])
        rng.shuffle(lines)
        sample += lines[:SPM_SENTENCES_PER_LANGUAGE]
    model_file = Path(model_file)
    # Trained into memory: with a model_prefix the file would record that (temporary) path, and its sha256, which
    # sacrebleu's signature carries, would differ from run to run.
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        character_coverage=1.0,  # the demo scripts are small alphabets: keep every character
        model_type="unigram",
        hard_vocab_limit=False,  # vocab_size is an upper bound: the small demo world may have fewer pieces
        num_threads=1,  # a single thread keeps the EM sums, hence the pieces, reproducible
        minloglevel=2,
    )
    with atomic_write(model_file) as tmp:
        tmp.write_bytes(model_bytes.getvalue())
    return model_file


def demo_model_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, d_model: int = 256,
                      layers: int = 3, ffn_dim: int = 512, heads: int = 4, max_positions: int = 256):
    """A tiny M2M100 configuration (same class as M2M-124; eos starts decoding as in fairseq)."""
    return M2M100Config(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        max_position_embeddings=max_positions,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        decoder_start_token_id=eos_id,
        scale_embedding=True,
        tie_word_embeddings=True,
    )


def train_on_bitext(model, corpus, tokenizer, languages: list[str], *, seed: int = 1, max_tokens: int = 4096,
                    lr: float = 2e-3, warmup: int = 200, label_smoothing: float = 0.1, temperature: float = 1.0,
                    max_steps: int = 1000) -> dict:
    """The stages' training loop (lslo.train.training_epochs) on CPU for max_steps updates: Adam,
    the inverse-sqrt schedule, label-smoothed cross-entropy, gradient norm clipped at 1, the model's own dropout.

    `corpus` is an lslo.data.Corpus of the bitext (both directions of every pair); one TemperatureSampler draws the
    epochs one after the other (temperature 1 samples directions in proportion to their size, which keeps the
    H >> M >> V imbalance). label_smoothing is in torch's definition (ε spread over all V tokens, the gold one
    included), as the demo was pretrained. Returns the training log.
    """
    options = pretrain_options(model.config, seed=seed, max_tokens=max_tokens, lr=lr, warmup=warmup,
                               label_smoothing=label_smoothing, temperature=temperature, max_steps=max_steps)
    trainer = make_trainer(model, options, device=torch.device("cpu"))  # the demo's numbers are CPU numbers
    sampler = TemperatureSampler(corpus.sizes(), temperature=temperature, seed=seed)
    source = BatchSource(corpus, tokenizer, languages,
                         lambda epoch: make_batches(sampler.epoch(), corpus, max_tokens, rng=sampler.rng))
    start, step, epoch, losses, stopped = time.monotonic(), 0, 0, [], None
    for done in training_epochs(trainer, source, itertools.count(1), log_every=LOG_EVERY):
        step, epoch, stopped = done.step, done.epoch, done.stopped
        losses += [{"step": s, "loss": round(loss / n_tokens, 4)} for s, loss, n_tokens in done.updates
                   if s == 1 or s % LOG_EVERY == 0]
    model.eval()
    return {"steps": step, "epochs": epoch, "stopped": stopped,  # "max_updates": the demo's way to end
            "minutes": round((time.monotonic() - start) / 60, 3), "loss": losses}


def pretrain_options(config, *, seed: int, max_tokens: int, lr: float, warmup: int, label_smoothing: float,
                     temperature: float, max_steps: int | None):
    """lslo.options.TrainOptions of demo pretraining: dropout as the model's config has it, no AMP, no dev scores.

    torch's label smoothing ε over all V tokens equals fairseq's (lslo.train.label_smoothed_nll_loss, ε over the
    V - 1 tokens other than the gold one) at ε·(V - 1)/V: the same loss."""
    vocab = config.vocab_size
    return TrainOptions(lr=lr, max_tokens=max_tokens, warmup_updates=warmup, seed=seed, temperature=temperature,
                        label_smoothing=label_smoothing * (vocab - 1) / vocab, dropout=config.dropout,
                        attention_dropout=config.attention_dropout, activation_dropout=config.activation_dropout,
                        layerdrop=config.encoder_layerdrop, clip_norm=1.0, amp=False, mixed_directions=True,
                        dev_sentences=0, max_updates=max_steps)


def fast_tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """lslo.data.tokenize_column's ids (SentencePiece pieces -> vocab ids, unknown -> <unk>) for text without special
    tokens, in one batched SentencePiece call: the HF slow tokenizer's per-text Python path dominated pretraining
    setup."""
    vocab, unk = tokenizer.encoder, tokenizer.encoder[tokenizer.unk_token]
    return [[vocab.get(piece, unk) for piece in pieces] for pieces in tokenizer.sp_model.encode(texts, out_type=str)]


def encode_bitext(benchmark_dir: str | Path, tokenizer):
    """The benchmark's bitext as an lslo.data.Corpus with both directions of every pair (each text encoded once)."""
    texts: dict[str, list[str]] = defaultdict(list)
    bitext = read_bitext(benchmark_dir)
    for (a, b), (lines_a, lines_b) in bitext.items():
        texts[a] += lines_a
        texts[b] += lines_b
    ids = {}
    for code, lines in texts.items():
        unique = sorted(set(lines))
        ids[code] = dict(zip(unique, fast_tokenize(unique, tokenizer)))
    pairs = {}
    for (a, b), (lines_a, lines_b) in bitext.items():
        ids_a, ids_b = [ids[a][s] for s in lines_a], [ids[b][s] for s in lines_b]
        pairs[(a, b)], pairs[(b, a)] = (ids_a, ids_b), (ids_b, ids_a)
    return Corpus(pairs)


def pretrain_demo_model(benchmark_dir: str | Path, out_dir: str | Path, seed: int = 1,
                        max_steps: int = 1000, vocab_size: int = 1500,
                        d_model: int = 128, layers: int = 2, ffn_dim: int = 512, heads: int = 4,
                        max_tokens: int = 768, lr: float = 3e-3, warmup: int = 200, temperature: float = 2.0,
                        threads: int | None = None) -> Path:
    """SentencePiece + tokenizer + a tiny M2M100 pretrained from scratch on the benchmark's bitext -> HF directory.

    Trains for exactly max_steps updates, never for a wall-clock budget: the model, and so every result of the demo,
    is the same on a slow or a busy machine. The defaults are tuned for 2 CPU cores (768-token batches of the demo
    world's short sentences: more updates per CPU-second than large batches; after 1000 updates the model is fluent
    on H2H and near zero on V2V). vocab_size is an upper bound
    (the demo world has about 1500 pieces' worth of text). The directory appears complete or not at all.
    """
    if threads:
        torch.set_num_threads(threads)
    root = Path(benchmark_dir)
    languages = read_language_table(root / "languages.tsv")["code"].tolist()
    with atomic_write(out_dir, is_dir=True) as tmp:
        spm_file = train_demo_spm(root, tmp / "spm.model", vocab_size, seed)
        build_tokenizer(spm_file, languages, tmp / "tokenizer")
        tokenizer = load_tokenizer(tmp / "tokenizer")
        corpus = encode_bitext(root, tokenizer)
        torch.manual_seed(seed)
        config = demo_model_config(model_vocab_size(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                   tokenizer.eos_token_id, d_model=d_model, layers=layers, ffn_dim=ffn_dim, heads=heads)
        model = M2M100ForConditionalGeneration(config)
        train_log = train_on_bitext(model, corpus, tokenizer, languages, seed=seed, max_tokens=max_tokens, lr=lr,
                                    warmup=warmup, temperature=temperature, max_steps=max_steps)
        model.generation_config.decoder_start_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "tokenizer")
        settings = dict(seed=seed, vocab_size=vocab_size, d_model=d_model, layers=layers, ffn_dim=ffn_dim,
                        heads=heads, max_tokens=max_tokens, lr=lr, warmup=warmup, temperature=temperature,
                        languages=languages)
        write_json({"settings": settings, **train_log}, tmp / "pretrain.json")
    log.info("pretrained demo model: %d steps in %.1f min -> %s", train_log["steps"], train_log["minutes"], out_dir)
    return Path(out_dir)


def zero_shot_report(model_dir: str | Path, benchmark_dir: str | Path, split: str = "devtest",
                     n_sentences: int | None = 100, num_beams: int = 1, languages: list[str] | None = None,
                     batch_size: int = 128):
    """Zero-shot spBLEU/chrF++ of a demo checkpoint on every direction of the benchmark, and by group pair.

    Decoded and scored as the evaluate stage does (lslo.inference; lslo.metrics: spBLEU = sacrebleu BLEU on
    pieces of the checkpoint's own spm.model, chrF++, group means, AVG over directions). n_sentences=None uses the
    whole split. Returns (directions DataFrame, groups DataFrame in Table 1 column order).
    """
    model_dir, root = Path(model_dir), Path(benchmark_dir)
    table = read_language_table(root / "languages.tsv")
    languages = languages or table["code"].tolist()
    text = {c: (root / split / f"{c}.{split}").read_text(encoding="utf-8").splitlines()[:n_sentences]
            for c in languages}
    translator = Translator(load_hf_model(model_dir).eval(), load_tokenizer(model_dir), languages, is_lslo=False)
    # the demo's sentences are short: at most 64 new tokens; batch_size sentences a batch, no token budget
    decoding = DecodingOptions(beam=num_beams, max_len_a=0.0, max_len_b=64, max_tokens=None,
                               max_sentences=batch_size)
    rows = []
    for src in languages:
        for tgt in (t for t in languages if t != src):
            hyps = translate_many(translator, text[src], [src] * len(text[src]), [tgt] * len(text[src]), decoding)
            src_group, tgt_group = table.loc[src, "resource"], table.loc[tgt, "resource"]
            bleu = spbleu(hyps, text[tgt], model_dir / "spm.model").score
            rows.append({"src": src, "tgt": tgt, "src_group": src_group, "tgt_group": tgt_group,
                         "pair": f"{src_group}2{tgt_group}", "spbleu": bleu,
                         "chrf": chrf(hyps, text[tgt]).score, "n": len(hyps)})
    directions = pd.DataFrame(rows)
    return directions, aggregate(directions)
