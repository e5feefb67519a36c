"""Mixed precision in the training loop (lslo.train): train.amp_dtype fp16 is fairseq's --amp, bf16 lslo's option.

fairseq's --amp (fairseq/optim/amp_optimizer.py, fairseq/trainer.py train_step, fairseq/dataclass/configs.py): a
GradScaler at init scale 2**7; a try whose gradients are not finite leaves weights and Adam's state as they were and
halves the scale; the same batch is tried again while the Trainer's retry count is below amp_batch_retries (2),
else the batch is skipped and the update not counted (num_updates, and so the lr schedule, stay); a scale at or below
min_loss_scale (1e-4) stops training.

The CPU tests run the loop with torch's CPU GradScaler in float32 and inject a non-finite gradient with a tensor
hook, so the policy is checked without a GPU; the `cuda` tests run real float16 and bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch
from transformers import M2M100ForConditionalGeneration

import lslo.train as T
from conftest import LANGUAGES
from lslo.checkpoint import load_checkpoint, save_checkpoint
from lslo.config import load_yaml
from lslo.data import Corpus, collate
from lslo.errors import LsloError
from lslo.tokenizer import load_tokenizer
from lslo.train import BatchSource, TrainOptions, epoch_plan, get_lr, make_adam, make_trainer, training_epochs
from test_train import make_world

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
cuda = pytest.mark.cuda


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model_dir, table, _ = make_world(tmp_path_factory.mktemp("amp_world"))
    tokenizer = load_tokenizer(model_dir)
    return model_dir, tokenizer, Corpus.multiparallel(table, LANGUAGES, tokenizer)


def options(**kw) -> TrainOptions:
    base = dict(lr=1e-2, epochs=3, max_tokens=200, warmup_updates=3, dropout=0.0, attention_dropout=0.0,
                dev_sentences=0, seed=3, max_epoch_examples=60)
    return TrainOptions.from_dict({**base, **kw})


def model_of(model_dir):
    """The tiny HF model, every parameter trained: the shared embedding gets a gradient from every batch."""
    torch.manual_seed(0)
    return M2M100ForConditionalGeneration.from_pretrained(model_dir)


def source_of(world, opts: TrainOptions) -> BatchSource:
    _, tokenizer, corpus = world
    return BatchSource(corpus, tokenizer, LANGUAGES, lambda epoch: epoch_plan(corpus, opts, epoch))


class Tries:
    """Wraps lslo.train.train_update: records each try (its micro-batches, lr, the scale after it) and makes the
    gradient of the shared embedding `poison` (inf or nan) on the tries numbered in `overflow` (0-based), checking
    that such a try leaves the weights and Adam's state exactly as they were."""

    def __init__(self, monkeypatch, model, overflow: set[int], poison: float = float("inf")):
        self.overflow, self.poison, self.model = overflow, poison, model
        self.batches, self.lrs, self.scales, self.inject = [], [], [], False
        self.real = T.train_update
        model.model.shared.weight.register_hook(lambda g: g + self.poison if self.inject else g)
        monkeypatch.setattr(T, "train_update", self)

    def __call__(self, model, optimizer, micro, opts, lr, device, scaler=None, *args, **kwargs):
        number = len(self.lrs)
        self.inject = number in self.overflow
        before = self.snapshot(optimizer)
        result = self.real(model, optimizer, micro, opts, lr, device, scaler, *args, **kwargs)
        self.inject = False
        self.batches.append(micro)  # kept, so that no later batch list takes its id
        self.lrs.append(lr)
        self.scales.append(scaler.get_scale() if scaler is not None else None)
        if number in self.overflow:
            after = self.snapshot(optimizer)
            for key in after:  # fused Adam creates its state (zeros, step 0) at the first try, even a skipped one
                want = before[key] if key in before else torch.zeros_like(after[key])
                assert key.startswith("adam") or key in before
                assert torch.equal(after[key], want), f"try {number} changed {key}"
        return result

    def snapshot(self, optimizer) -> dict:
        state = {f"weight {n}": p.detach().clone() for n, p in self.model.named_parameters()}
        for i, p in enumerate(optimizer.param_groups[0]["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                state[f"adam {i} {key}"] = value.detach().clone()
        return state

    @property
    def consumed(self) -> int:
        """Batches used: a retry passes the same collated micro-batches again."""
        return len({id(micro) for micro in self.batches})


def run(world, monkeypatch, overflow: set[int], init_scale: float = 128.0, poison: float = float("inf"), **kw):
    """(counted updates, tries, trainer) of one run through training_epochs with a CPU GradScaler."""
    opts = options(**kw)
    model = model_of(world[0])
    trainer = make_trainer(model, opts, device=torch.device("cpu"))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2000)
    tries = Tries(monkeypatch, model, overflow, poison)
    counted = [s for done in training_epochs(trainer, source_of(world, opts), range(1, opts.epochs + 1))
               for s, _, _ in done.updates]
    return counted, tries, trainer


# ---------------------------------------------------------------------------------------------- fp16: fairseq's --amp

@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_an_overflowed_try_keeps_the_weights_halves_the_scale_and_is_not_counted(world, monkeypatch, poison):
    """Update 2's first try overflows: weights and Adam moments stay (checked in Tries), the scale goes 128 -> 64,
    the step does not advance: the same batch is tried again at update 2's lr and counted as update 2."""
    counted, tries, trainer = run(world, monkeypatch, overflow={1}, poison=poison, max_updates=4)
    lr = lambda step: get_lr(step, 1e-2, 3)  # noqa: E731
    assert tries.lrs == [lr(1), lr(2), lr(2), lr(3), lr(4)]  # the retry has the lr the overflowed try had
    assert counted == [1, 2, 3, 4]
    assert tries.scales == [128.0, 64.0, 64.0, 64.0, 64.0]
    assert tries.batches[1] is tries.batches[2] and tries.consumed == 4  # the same batch, none extra
    assert trainer.amp_retries == 1  # fairseq resets its count only when it skips a batch


def test_a_batch_that_overflows_on_every_try_is_skipped_and_the_run_still_counts_max_updates(world, monkeypatch,
                                                                                          caplog):
    """Update 2 overflows on its first try and both retries (fairseq's amp_batch_retries = 2): its batch is skipped
    (scale 128 -> 16), the next batch is update 2 at update 2's lr, and the run ends after max_updates counted updates
    with one batch more consumed."""
    with caplog.at_level(logging.INFO, logger="lslo.train"):
        counted, tries, trainer = run(world, monkeypatch, overflow={1, 2, 3}, max_updates=4)
    lr = lambda step: get_lr(step, 1e-2, 3)  # noqa: E731
    assert tries.lrs == [lr(1), lr(2), lr(2), lr(2), lr(2), lr(3), lr(4)]
    assert counted == [1, 2, 3, 4]
    assert tries.scales == [128.0, 64.0, 32.0, 16.0, 16.0, 16.0, 16.0]
    assert tries.batches[1] is tries.batches[2] is tries.batches[3] and tries.consumed == 4 + 1
    assert trainer.amp_retries == 0
    lines = [r.getMessage() for r in caplog.records if "overflow" in r.getMessage()]
    assert len(lines) == 3  # one line per overflowed try
    assert "setting loss scale to: 64" in lines[0] and "again (retry 1 of 2)" in lines[0]
    assert "setting loss scale to: 16" in lines[2] and "batch skipped" in lines[2] and "not counted" in lines[2]


def test_a_retry_that_succeeds_leaves_fairseqs_retry_count(world, monkeypatch):
    """fairseq's Trainer resets _amp_retries only when it skips a batch: after update 2's retry succeeded, update
    3's batch gets one retry, not two, and is skipped on its second overflow."""
    counted, tries, _ = run(world, monkeypatch, overflow={1, 3, 4}, max_updates=4)
    assert counted == [1, 2, 3, 4]
    assert tries.scales == [128.0, 64.0, 64.0, 32.0, 16.0, 16.0, 16.0]
    assert tries.batches[1] is tries.batches[2] and tries.batches[3] is tries.batches[4]
    assert tries.batches[4] is not tries.batches[5]
    assert tries.consumed == 4 + 1


def test_an_epoch_of_skipped_batches_counts_only_its_updates(world, monkeypatch):
    """Without max_updates the epoch's batches run out: the skipped one is consumed and not counted."""
    opts = options(epochs=1)
    n_batches = len(epoch_plan(world[2], opts, 1))
    counted, tries, _ = run(world, monkeypatch, overflow={0, 1, 2}, epochs=1)
    assert tries.consumed == n_batches and counted == list(range(1, n_batches))


def test_a_loss_scale_at_fairseqs_minimum_stops_training(world, monkeypatch):
    """2**-12 halves to 2**-13 (1.2e-4, above fairseq's min_loss_scale 1e-4: retried), then to 2**-14 (6.1e-5):
    stop, naming the option to change."""
    with pytest.raises(LsloError, match=r"update 1: fp16 gradients overflow at every loss scale \(now 6.10352e-05, "
                                        r"at or below fairseq's minimum 0.0001\).*train\.amp_dtype: bf16"):
        run(world, monkeypatch, overflow={0, 1, 2}, init_scale=2.0**-12, max_updates=2)


def test_a_normal_scaled_update_equals_the_float32_update(world):
    """Without overflow the scaler changes nothing: the gradients are unscaled before Adam's step (128 is a power
    of two, so scaling and unscaling are exact in float32), and three updates give the float32 run's weights."""
    _, tokenizer, corpus = world
    opts = options()
    groups = epoch_plan(corpus, opts, 1)[:3]
    weights = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=128.0)):
        model = model_of(world[0]).train()
        optimizer = make_adam([p for p in model.parameters() if p.requires_grad], opts.lr)
        for step, batch in enumerate(groups, start=1):
            micro = [collate(batch, corpus, tokenizer, LANGUAGES)]
            T.train_update(model, optimizer, micro, opts, get_lr(step, opts.lr, 3), torch.device("cpu"), scaler)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if scaler is not None:
            assert scaler.get_scale() == 128.0
    start = model_of(world[0]).state_dict()
    assert any(not torch.equal(weights[0][n], start[n]) for n in weights[0])  # the updates did something
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-6, atol=1e-7)


def test_fairseq_grad_scaler_is_fairseqs():
    state = T.fairseq_grad_scaler("cpu").state_dict()
    assert state == {"scale": 128.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                     "_growth_tracker": 0}


def test_the_scalers_state_is_checkpointed_and_resumed(world, tmp_path):
    model = model_of(world[0])
    optimizer = make_adam(list(model.parameters()), 1e-3)
    scaler = T.fairseq_grad_scaler("cpu")
    scaler.scale(torch.ones(()))  # the scale tensor exists once something was scaled
    scaler.update(16.0)  # as after three overflows
    path = save_checkpoint(tmp_path, 1, 7, {"x": 1}, T.trainable_state(model), optimizer, scaler, [])
    fresh = T.fairseq_grad_scaler("cpu")
    T.resume(load_checkpoint(path), model, optimizer, fresh)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 16.0


# ---------------------------------------------------------------------------------------------- options, bf16

def test_amp_dtype_option():
    assert TrainOptions().amp_dtype == "fp16"
    assert TrainOptions.from_dict({"amp_dtype": "bf16"}).amp_dtype == "bf16"
    with pytest.raises(LsloError, match=r"train\.amp_dtype is 'fp32', expected one of fp16, bf16"):
        TrainOptions.from_dict({"amp_dtype": "fp32"}, "train")


@pytest.mark.parametrize("name", ["lang12", "lang30"])
def test_paper_configs_state_fairseqs_amp(name):
    train = load_yaml(CONFIG_DIR / f"{name}.yaml")["train"]
    assert train["amp"] is True and train["amp_dtype"] == "fp16"


def test_bf16_on_a_gpu_without_bfloat16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(LsloError, match=r"^train\.amp_dtype is bf16, but Tesla V100-SXM2-32GB has no native "
                                        r"bfloat16; set train\.amp_dtype: fp16"):
        T.amp_setup(TrainOptions(amp_dtype="bf16"), torch.device("cuda"))


def test_no_amp_on_cpu_or_when_off():
    for opts, device in ((TrainOptions(), "cpu"), (TrainOptions(amp_dtype="bf16"), "cpu"),
                         (TrainOptions(amp=False), "cuda")):
        autocast, scaler = T.amp_setup(opts, torch.device(device))
        assert scaler is None and autocast is contextlib.nullcontext


# ---------------------------------------------------------------------------------------------- on a GPU

@cuda
def test_fp16_amp_on_gpu_scales_from_128_and_skips_overflowed_updates(world, monkeypatch):
    """make_trainer on a GPU with amp_dtype fp16: float16 autocast, fairseq's scaler at 128; an injected overflow
    on every try of update 2 is skipped as on CPU; the counted updates leave finite weights that moved."""
    opts = options(amp_dtype="fp16", max_updates=4)
    model = model_of(world[0])
    trainer = make_trainer(model, opts, device=torch.device("cuda"))
    assert trainer.scaler is not None and trainer.scaler.get_scale() == 128.0
    with trainer.autocast():
        assert torch.get_autocast_dtype("cuda") == torch.float16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tries = Tries(monkeypatch, model, overflow={1, 2, 3})
    counted = [s for done in training_epochs(trainer, source_of(world, opts), range(1, 4)) for s, _, _ in done.updates]
    assert counted == [1, 2, 3, 4] and tries.consumed == 5
    assert tries.scales[:4] == [128.0, 64.0, 32.0, 16.0]
    lr = lambda step: get_lr(step, 1e-2, 3)  # noqa: E731
    assert tries.lrs == [lr(1), lr(2), lr(2), lr(2), lr(2), lr(3), lr(4)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@cuda
def test_fp16_amp_update_on_gpu_is_close_to_float32():
    """One float16-autocast update with the scaler at 128 moves the weights as the float32 update does, within
    float16's precision."""
    from conftest import make_batch, make_tiny_model

    batch = make_batch([("fr", "oc"), ("en", "wo"), ("oc", "de")])
    labels = batch["input_ids"].roll(1, dims=1)
    micro = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
             "n_tokens": labels.numel()}
    deltas = []
    for amp in (False, True):
        model = make_tiny_model(0).cuda().train()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        autocast, scaler = T.amp_setup(TrainOptions(amp=amp, amp_dtype="fp16"), torch.device("cuda"))
        T.train_update(model, optimizer, [micro], TrainOptions(), 1.0, torch.device("cuda"), scaler, autocast)
        deltas.append({n: p.detach() - start[n] for n, p in model.named_parameters()})
        if amp:
            assert scaler.get_scale() == 128.0
    for name, want in deltas[0].items():
        torch.testing.assert_close(deltas[1][name], want, rtol=2e-2, atol=2e-3 * want.abs().max().item() + 1e-6)


@cuda
def test_bf16_amp_on_gpu_has_no_scaler_and_counts_every_update(world):
    opts = options(amp_dtype="bf16", max_updates=4)
    model = model_of(world[0])
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        with pytest.raises(LsloError, match=r"train\.amp_dtype is bf16"):
            make_trainer(model, opts, device=torch.device("cuda"))
        return
    trainer = make_trainer(model, opts, device=torch.device("cuda"))
    assert trainer.scaler is None
    with trainer.autocast():
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16
    counted = [s for done in training_epochs(trainer, source_of(world, opts), range(1, 4)) for s, _, _ in done.updates]
    assert counted == [1, 2, 3, 4]
    assert all(torch.isfinite(p).all() for p in model.parameters())
