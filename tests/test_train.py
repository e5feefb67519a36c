"""The training loop (lslo.train): schedule, loss, gradient accumulation, options, resume, NaN handling.

A tiny world is built here: a multi-parallel table of 5 languages, a SentencePiece model trained on it, an
M2M100 tokenizer (lslo.tokenizer.build_tokenizer) and a tiny random M2M100 (conftest.make_tiny_config).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import M2M100ForConditionalGeneration

from conftest import LANGUAGES, make_tiny_config
from lslo.checkpoint import checkpoint_path, last_checkpoint, load_checkpoint
from lslo.errors import LsloError
from lslo.model import LSLoSpec, inject_lslo
from lslo.train import TrainOptions, get_lr, label_smoothed_nll_loss, train, train_update

GROUPS = {"en": "H", "fr": "H", "de": "M", "oc": "V", "wo": "V"}
WORDS = ["sun", "moon", "tree", "river", "stone", "bird", "house", "road", "fire", "rain", "wind", "hill"]


def make_table(n_sentences: int = 24, seed: int = 0) -> pd.DataFrame:
    """A multi-parallel table: each language renders the same word sequence with its own suffix and order."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_sentences):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(2, 5))]
        row = {"id": i}
        for k, lang in enumerate(LANGUAGES):
            rendered = [w[: 3 + k % 2] + lang for w in (words if k % 2 == 0 else words[::-1])]
            row[lang] = " ".join(rendered)
        rows.append(row)
    return pd.DataFrame(rows)


def make_world(root: Path, n_sentences: int = 24, seed: int = 0):
    """(model_dir with tokenizer + tiny HF model, train table, language table path) under `root`."""
    from lslo.tokenizer import build_tokenizer, model_vocab_size

    root.mkdir(parents=True, exist_ok=True)
    table = make_table(n_sentences)
    text = "\n".join(table[lang].str.cat(sep="\n") for lang in LANGUAGES)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_writer=model_bytes,
                                   vocab_size=60, model_type="unigram", hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    spm_path = root / "spm.model"
    spm_path.write_bytes(model_bytes.getvalue())
    model_dir = root / "model"
    tokenizer = build_tokenizer(spm_path, LANGUAGES, model_dir)
    torch.manual_seed(seed)
    config = make_tiny_config(vocab_size=model_vocab_size(tokenizer), dropout=0.1)
    M2M100ForConditionalGeneration(config).save_pretrained(model_dir)
    lang_table = root / "languages.tsv"
    pd.DataFrame([{"code": c, "name": c, "flores101": c, "flores200": c, "resource": GROUPS[c], "family": "x",
                   "bitext": "", "subsets": "tiny"} for c in LANGUAGES]).to_csv(lang_table, sep="\t", index=False)
    return model_dir, table, lang_table


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def lslo_model(model_dir, ranks=2, seed=0):
    torch.manual_seed(seed)
    hf = M2M100ForConditionalGeneration.from_pretrained(model_dir)
    spec = LSLoSpec(languages=LANGUAGES, ranks={lang: ranks for lang in LANGUAGES}, modules="all",
                    index_plan={"enc": "src", "dec": "tgt"})
    return inject_lslo(hf, spec)


def small_options(**kw):
    base = dict(lr=1e-2, epochs=2, max_tokens=200, warmup_updates=3, dropout=0.1, dev_sentences=4, seed=3,
                max_epoch_examples=60)
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------------------- formulas

def test_get_lr_matches_fairseq_inverse_sqrt():
    lr, warmup = 5e-4, 4000
    for step in (1, 10, 3999, 4000, 4001, 16000, 10**6):
        # fairseq: lr_step = lr / warmup in warm-up, then decay_factor = lr * sqrt(warmup), lr = decay / sqrt(n)
        expected = step * (lr / warmup) if step < warmup else (lr * warmup ** 0.5) * step ** -0.5
        assert get_lr(step, lr, warmup) == pytest.approx(expected, rel=1e-12)
    assert get_lr(4000, lr, warmup) == pytest.approx(lr)
    assert get_lr(7, lr, 0) == lr


def test_label_smoothing_is_fairseqs():
    torch.manual_seed(0)
    vocab, eps = 11, 0.2
    logits = torch.randn(3, 5, vocab, dtype=torch.float64)
    target = torch.randint(0, vocab, (3, 5))
    target[0, 3:] = -100
    loss, nll = label_smoothed_nll_loss(logits, target, eps)
    # fairseq's ε over the V-1 wrong tokens is torch's label_smoothing ε·V/(V-1) over all V tokens.
    expected = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100,
                               label_smoothing=eps * vocab / (vocab - 1), reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    # and by hand: gold weight 1-ε, others ε/(V-1)
    lp = torch.log_softmax(logits, -1)
    keep = target != -100
    lp, t = lp[keep], target[keep]
    weights = torch.full_like(lp, eps / (vocab - 1)).scatter(1, t[:, None], 1 - eps)
    assert loss.item() == pytest.approx(-(weights * lp).sum().item(), rel=1e-10)
    assert nll.item() == pytest.approx(F.nll_loss(lp, t, reduction="sum").item(), rel=1e-10)


def test_gradient_accumulation_equals_one_big_batch(world):
    from lslo.data import Corpus, Example, collate
    from lslo.tokenizer import load_tokenizer

    model_dir, table, _ = world
    tokenizer = load_tokenizer(model_dir)
    corpus = Corpus.multiparallel(table, LANGUAGES, tokenizer)
    examples = [Example(i, s, t) for i, (s, t) in enumerate([("en", "fr"), ("fr", "oc"), ("oc", "wo"),
                                                              ("de", "en"), ("wo", "de"), ("en", "oc")])]
    options = TrainOptions.from_dict(small_options(dropout=0.0, label_smoothing=0.2))
    results = []
    for micro in ([examples], [examples[:3], examples[3:]]):
        model = lslo_model(model_dir).double()
        with torch.no_grad():  # non-zero B so every LoRA matrix gets a gradient
            for p in model.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                         dtype=p.dtype))
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
        batches = [collate(b, corpus, tokenizer, LANGUAGES) for b in micro]
        loss, n = train_update(model, optimizer, batches, options, lr=0.5, device=torch.device("cpu"))
        results.append((loss, n, [p.detach().clone() for p in model.trainable_parameters()]))
    (loss1, n1, p1), (loss2, n2, p2) = results
    assert n1 == n2 and loss1 == pytest.approx(loss2, rel=1e-10)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- options

def test_options_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(LsloError, match=r"options\.learning_rate"):
        TrainOptions.from_dict({"learning_rate": 1e-3})
    with pytest.raises(LsloError, match=r"finetune\.options\.epochs"):
        TrainOptions.from_dict({"epochs": "15"}, path="finetune.options")
    with pytest.raises(LsloError, match=r"options\.amp"):
        TrainOptions.from_dict({"amp": 1})
    with pytest.raises(LsloError, match=r"options\.dropout"):
        TrainOptions.from_dict({"dropout": 1.5})
    opts = TrainOptions.from_dict({"lr": 1, "adam_betas": [0.9, 0.98], "max_updates": None})
    assert opts.lr == 1.0 and isinstance(opts.lr, float) and opts.max_updates is None


# ---------------------------------------------------------------------------------------------- the loop

def test_train_writes_metrics_and_checkpoints(world, tmp_path):
    from lslo.tokenizer import load_tokenizer

    model_dir, table, _ = world
    model = lslo_model(model_dir)
    hooks = []
    train(model, load_tokenizer(model_dir), table, LANGUAGES, small_options(), tmp_path / "ckpt",
          tmp_path / "metrics.tsv", epoch_hook=hooks.append, dev_table=table, groups=GROUPS)
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    assert list(metrics.columns) == ["epoch", "step", "loss", "pruning_ratio", "trainable_params",
                                     "effective_params", "dev_H2H", "dev_V2V", "dev_H2H_low", "dev_H2H_high",
                                     "dev_V2V_low", "dev_V2V_high", "stopped", "gpus", "peak_gpu_mib"]
    # on CPU: no process trains on a GPU, and no GPU memory is measured (an empty field, not 0)
    assert metrics["gpus"].tolist() == [0, 0] and metrics["peak_gpu_mib"].isna().all()
    assert (metrics["dev_V2V_low"] <= metrics["dev_V2V"]).all()
    assert (metrics["dev_V2V"] <= metrics["dev_V2V_high"]).all()
    assert metrics["epoch"].tolist() == [1, 2] and hooks == [1, 2]
    assert metrics["loss"].notna().all() and metrics["dev_H2H"].notna().all() and metrics["dev_V2V"].notna().all()
    assert metrics["trainable_params"].iloc[0] == sum(p.numel() for p in model.trainable_parameters())
    assert last_checkpoint(tmp_path / "ckpt") == checkpoint_path(tmp_path / "ckpt", 2)
    assert any(not torch.all(p == 0) for n, p in model.named_parameters() if ".B." in n)  # B learned


def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path):
    from lslo.tokenizer import load_tokenizer

    model_dir, table, _ = world
    model = lslo_model(model_dir)

    def poison(epoch):
        if epoch == 2:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith("banks.src.A.en")).fill_(float("nan"))

    ckpt = tmp_path / "ckpt"
    with pytest.raises(LsloError, match=r"non-finite training loss .* epoch 2.*epoch001\.pt"):
        train(model, load_tokenizer(model_dir), table, LANGUAGES, small_options(epochs=3, dev_sentences=0), ckpt,
              tmp_path / "metrics.tsv", epoch_hook=poison)
    assert last_checkpoint(ckpt) == checkpoint_path(ckpt, 1)
    state = load_checkpoint(checkpoint_path(ckpt, 1))
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["trainable_state"].values()
                                       if v.is_floating_point())
    # the rows so far beside the checkpoints; the declared metrics TSV only once training ends
    assert pd.read_csv(ckpt / "metrics.tsv", sep="\t")["epoch"].tolist() == [1]
    assert not (tmp_path / "metrics.tsv").exists()


def gps_run(model_dir, table, out: Path, hang_in_epoch: int = 0) -> dict:
    """3 epochs with GPS on en/fr/de (eq. 4: P=0.5, E=0, k=2) and dropout; returns the final trainable state.
    hang_in_epoch: after the 2nd update of that epoch, write out/mid_epoch and hang (the test SIGKILLs us)."""
    import lslo.train as T
    from lslo.pruning import gps_ratio, prune
    from lslo.tokenizer import load_tokenizer

    model = lslo_model(model_dir)
    real_update, calls = T.train_update, []

    def update_then_hang(*args, **kwargs):
        result = real_update(*args, **kwargs)
        if last_checkpoint(out / "ckpt") == checkpoint_path(out / "ckpt", hang_in_epoch - 1):
            calls.append(1)
            if len(calls) == 2:
                (out / "mid_epoch").write_text("x")
                time.sleep(600)
        return result

    if hang_in_epoch:
        T.train_update = update_then_hang
    hook = lambda e: prune(model, gps_ratio(e, 0.5, 0, 2), ["en", "fr", "de"], scope="matrix")  # noqa: E731
    T.train(model, load_tokenizer(model_dir), table, LANGUAGES, small_options(epochs=3, dev_sentences=2),
            out / "ckpt", out / "metrics.tsv", epoch_hook=hook, dev_table=table, groups=GROUPS)
    return T.trainable_state(model)


HANG_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    import pandas as pd
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_train import gps_run
    gps_run(Path(sys.argv[2]), pd.read_csv(sys.argv[3], sep="\\t"), Path(sys.argv[4]), hang_in_epoch=2)
""")


def test_resume_after_sigkill_is_bit_identical(world, tmp_path):
    model_dir, table, _ = world
    run = tmp_path / "run"
    run.mkdir()
    table.to_csv(run / "table.tsv", sep="\t", index=False)
    killed = subprocess.Popen([sys.executable, "-c", HANG_SCRIPT, str(Path(__file__).parent), str(model_dir),
                               str(run / "table.tsv"), str(run)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reference = gps_run(model_dir, table, tmp_path / "ref")  # uninterrupted, meanwhile
    deadline = time.time() + 100
    while not (run / "mid_epoch").exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the training run never reached the middle of epoch 2"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert last_checkpoint(run / "ckpt") == checkpoint_path(run / "ckpt", 1)
    assert pd.read_csv(run / "ckpt" / "metrics.tsv", sep="\t")["epoch"].tolist() == [1]
    assert not (run / "metrics.tsv").exists()  # no half-written declared output while the job runs

    resumed = gps_run(model_dir, table, run)  # same checkpoint_dir: continues after epoch 1
    assert reference.keys() == resumed.keys() and any("B_mask" in k for k in reference)
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert (tmp_path / "ref" / "metrics.tsv").read_bytes() == (run / "metrics.tsv").read_bytes()
    metrics = pd.read_csv(run / "metrics.tsv", sep="\t")
    assert metrics["epoch"].tolist() == [1, 2, 3] and metrics["pruning_ratio"].iloc[-1] > 0
    assert metrics["dev_H2H"].notna().all()


@pytest.mark.parametrize("world_size, expected", [(1, 4), (2, 2), (4, 1)])
def test_tokens_per_update_derives_update_freq_from_the_process_count(world_size, expected):
    options = TrainOptions.from_dict({"max_tokens": 4000, "tokens_per_update": 16000})
    freq = options.update_freq_for(world_size)
    assert freq == expected
    assert freq * options.max_tokens * world_size == 16000


def test_tokens_per_update_refuses_an_uneven_split_and_a_second_update_freq():
    with pytest.raises(LsloError, match="not a multiple of max_tokens"):
        TrainOptions.from_dict({"max_tokens": 4000, "tokens_per_update": 16000}).update_freq_for(3)
    with pytest.raises(LsloError, match="not both"):
        TrainOptions.from_dict({"tokens_per_update": 16000, "update_freq": 2})
    assert TrainOptions.from_dict({"update_freq": 3}).update_freq_for(4) == 3


# ---------------------------------------------------------------------------------------------- max_updates

def test_max_updates_stops_after_exactly_that_many_updates_and_writes_the_outputs(world, tmp_path, monkeypatch):
    """train.max_updates = 2 in a run of 3 epochs: two optimizer updates, the weights of epoch 1's first two batches
    applied by hand with train_update, the checkpoint, the metrics TSV (one row, `stopped: max_updates`) and the
    `complete` mark written as at the end of a run."""
    import lslo.train as T
    from lslo.data import Corpus, collate
    from lslo.tokenizer import load_tokenizer

    model_dir, table, _ = world
    tokenizer = load_tokenizer(model_dir)
    opts = small_options(dropout=0.0, attention_dropout=0.0, dev_sentences=0, epochs=3, max_updates=2)
    steps = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    model = lslo_model(model_dir)
    T.train(model, tokenizer, table, LANGUAGES, opts, tmp_path / "ckpt", tmp_path / "metrics.tsv")
    assert len(steps) == 2
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    assert metrics["epoch"].tolist() == [1] and metrics["step"].tolist() == [2]
    assert metrics["stopped"].tolist() == ["max_updates"]
    assert last_checkpoint(tmp_path / "ckpt") == checkpoint_path(tmp_path / "ckpt", 1)
    assert (tmp_path / "ckpt" / "complete").read_text() == "1\n"

    options = TrainOptions.from_dict(opts)
    reference = lslo_model(model_dir)
    trainer = T.make_trainer(reference, options, device=torch.device("cpu"))
    corpus = Corpus.multiparallel(table, LANGUAGES, tokenizer)
    batches = T.epoch_plan(corpus, options, 1)
    assert len(batches) > 2  # the stop is early
    for step, batch in enumerate(batches[:2], start=1):
        T.train_update(reference, trainer.optimizer, [collate(batch, corpus, tokenizer, LANGUAGES)], options,
                       get_lr(step, options.lr, options.warmup_updates), torch.device("cpu"))
    want, got = T.trainable_state(reference), T.trainable_state(model)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_max_updates_reached_with_the_last_batch_is_not_an_early_stop(world, tmp_path):
    from lslo.data import Corpus
    from lslo.tokenizer import load_tokenizer
    import lslo.train as T

    model_dir, table, _ = world
    tokenizer = load_tokenizer(model_dir)
    base = small_options(dev_sentences=0, epochs=1)
    n_batches = len(T.epoch_plan(Corpus.multiparallel(table, LANGUAGES, tokenizer), TrainOptions.from_dict(base), 1))
    T.train(lslo_model(model_dir), tokenizer, table, LANGUAGES, dict(base, max_updates=n_batches), tmp_path / "ckpt",
            tmp_path / "metrics.tsv")
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t", keep_default_na=False)
    assert metrics["step"].tolist() == [n_batches] and metrics["stopped"].tolist() == [""]
