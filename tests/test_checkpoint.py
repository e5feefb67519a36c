"""Epoch checkpoints (lslo.checkpoint): identity, set-aside, durability, retention, safe loading; and the base-model
identity that adapters carry (lslo.adapters, lslo.inference.load_variant).

The tiny world (tokenizer + tiny M2M100 + a 5-language table) is test_train's make_world.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import M2M100ForConditionalGeneration

import lslo.checkpoint as C
import lslo.code_identity
import lslo.train
from conftest import LANGUAGES
from lslo.code_identity import code_hash
from lslo.errors import LsloError
from lslo.train import TrainOptions, run_identity, train, trainable_state
from test_train import lslo_model, make_world, small_options

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def tiny_run(model_dir, table, ckpt, metrics, **options):
    """Two quick epochs of LSLo training; returns the final trainable state."""
    from lslo.tokenizer import load_tokenizer

    model = lslo_model(model_dir)
    train(model, load_tokenizer(model_dir), table, LANGUAGES, small_options(dev_sentences=0, **options), ckpt,
          metrics, identity={"stage": "test", "base_model": C.model_identity(model_dir)})
    return trainable_state(model)


def saved(tmp_path, epochs, identity=None):
    """Checkpoint files for `epochs` with a one-parameter optimizer, as save_checkpoint writes them."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param])
    for epoch in epochs:
        C.save_checkpoint(tmp_path, epoch, epoch * 10, identity or {"stage": "x"}, {"w": param.detach() + epoch},
                          optimizer, None, [{"epoch": epoch}])
    return tmp_path


# ---------------------------------------------------------------------------------------------- identity

def test_model_identity_follows_content_not_location(world, tmp_path, monkeypatch):
    model_dir, _, _ = world
    monkeypatch.setattr(C, "SAMPLE_BYTES", 64)  # tiny tensors: sample 64 bytes at each end, as 4 KiB of a big one
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)  # another path and other mtimes
    os.utime(copy / "model.safetensors", (1, 1))
    assert C.model_identity(copy) == C.model_identity(model_dir)

    # a base of the same shape trained otherwise: same header, other tensor bytes
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tensors = load_file(model_dir / "model.safetensors")
    name = max(tensors, key=lambda k: tensors[k].numel())  # the largest tensor: only its start/end are read
    assert tensors[name].numel() * tensors[name].element_size() > 2 * C.SAMPLE_BYTES
    for position in (0, -1):  # a change at either sampled end is seen
        changed = {k: v.clone() for k, v in tensors.items()}
        changed[name].view(-1)[position] += 1.0
        save_file(changed, other / "model.safetensors", metadata={"format": "pt"})
        assert C.model_identity(other) != C.model_identity(model_dir), position
    # another dtype, another config
    save_file({k: v.half() for k, v in tensors.items()}, other / "model.safetensors", metadata={"format": "pt"})
    assert C.model_identity(other) != C.model_identity(model_dir)
    shutil.copy(model_dir / "model.safetensors", other / "model.safetensors")
    assert C.model_identity(other) == C.model_identity(model_dir)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "dropout": 0.3}))
    assert C.model_identity(other) != C.model_identity(model_dir)


@pytest.mark.parametrize("change, field", [
    (lambda o, t, langs: ({**o, "lr": o["lr"] * 2}, t, langs), "options.lr"),
    (lambda o, t, langs: ({**o, "seed": o["seed"] + 1}, t, langs), "options.seed"),
    (lambda o, t, langs: ({**o, "epochs": o["epochs"] + 1}, t, langs), "options.epochs"),
    (lambda o, t, langs: ({**o, "update_freq": 2}, t, langs), "options.update_freq"),
    (lambda o, t, langs: (o, t.assign(oc=t["oc"].str.upper()), langs), "train_data"),
    (lambda o, t, langs: (o, t, langs[::-1]), "languages"),
])
def test_run_identity_names_each_changed_field(world, change, field):
    model_dir, table, _ = world
    options = small_options()
    model = lslo_model(model_dir)
    base = run_identity({"stage": "t"}, model, TrainOptions.from_dict(options), LANGUAGES, table, table, 1)
    options2, table2, langs2 = change(options, table, list(LANGUAGES))
    other = run_identity({"stage": "t"}, model, TrainOptions.from_dict(options2), langs2, table2, table, 1)
    differing = C.differences(base, other)
    assert field in differing
    # a language order also reorders the spec and the hashed columns, update_freq changes the effective batch;
    # nothing else differs
    also = {"languages": {"model.languages", "train_data", "dev_data"}, "options.update_freq": {"tokens_per_update"}}
    assert set(differing) - {field} <= also.get(field, set())


def test_run_identity_sees_site_ranks_and_keeps_the_effective_batch_across_process_counts(world):
    model_dir, table, _ = world
    options = TrainOptions.from_dict(small_options(max_tokens=100, tokens_per_update=400))
    base = run_identity({}, lslo_model(model_dir), options, LANGUAGES, table, None, 1)
    ranks3 = C.differences(base, run_identity({}, lslo_model(model_dir, ranks=3), options, LANGUAGES, table, None, 1))
    assert {d for d in ranks3 if d.startswith("model.")} == {f"model.ranks.{lang}" for lang in LANGUAGES}
    assert ranks3 and all(d.startswith(("model.ranks.", "site_ranks.")) for d in ranks3)
    # 4 processes x update_freq 1 = 1 process x update_freq 4: the same run
    assert C.differences(base, run_identity({}, lslo_model(model_dir), options, LANGUAGES, table, None, 4)) == []
    fixed = TrainOptions.from_dict(small_options(max_tokens=100, update_freq=1))
    one = run_identity({}, lslo_model(model_dir), fixed, LANGUAGES, table, None, 1)
    assert C.differences(one, run_identity({}, lslo_model(model_dir), fixed, LANGUAGES, table, None, 2)) == \
        ["tokens_per_update"]


def test_a_checkpoint_of_another_identity_is_set_aside_with_one_info_line(tmp_path, caplog):
    ckpt = saved(tmp_path / "ckpt", [1, 2], identity={"stage": "finetune", "settings": {"prune": {"en": 0.9}}})
    (ckpt / "metrics.tsv").write_text("epoch\n1\n2\n")
    with caplog.at_level(logging.INFO, logger="lslo.checkpoint"):
        state = C.find_resumable(ckpt, {"stage": "finetune", "settings": {"prune": {"en": 0.8}}})
    assert state is None and not ckpt.exists()
    kept = tmp_path / "ckpt.set-aside-1"
    assert sorted(p.name for p in kept.iterdir()) == ["epoch001.pt", "epoch002.pt", "metrics.tsv"]
    lines = [r for r in caplog.records if r.name == "lslo.checkpoint"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "settings.prune.en" in lines[0].getMessage() and "ckpt.set-aside-1" in lines[0].getMessage()
    # the same identity resumes (the newest epoch), and a second set-aside takes the next free name
    ckpt = saved(tmp_path / "ckpt", [1, 2], identity={"stage": "a"})
    assert C.find_resumable(ckpt, {"stage": "a"})["epoch"] == 2
    assert C.find_resumable(ckpt, {"stage": "b"}) is None and (tmp_path / "ckpt.set-aside-2").is_dir()


def test_a_finished_run_is_retrained_and_gives_the_fresh_result(world, tmp_path):
    model_dir, table, _ = world
    first = tiny_run(model_dir, table, tmp_path / "ckpt", tmp_path / "m1.tsv")
    assert (tmp_path / "ckpt" / C.COMPLETE).exists()
    again = tiny_run(model_dir, table, tmp_path / "ckpt", tmp_path / "m2.tsv")  # a --forcerun
    assert (tmp_path / "ckpt.set-aside-1" / "epoch002.pt").exists()  # kept, not trained on
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert (tmp_path / "m1.tsv").read_bytes() == (tmp_path / "m2.tsv").read_bytes()
    # an incomplete run with another lr is set aside too, and its result is the fresh one of the new lr
    (tmp_path / "ckpt" / C.COMPLETE).unlink()
    (tmp_path / "ckpt" / "epoch002.pt").unlink()
    changed = tiny_run(model_dir, table, tmp_path / "ckpt", tmp_path / "m3.tsv", lr=3e-2)
    fresh = tiny_run(model_dir, table, tmp_path / "fresh", tmp_path / "m4.tsv", lr=3e-2)
    assert (tmp_path / "ckpt.set-aside-2" / "epoch001.pt").exists()
    assert any(not torch.equal(first[k], changed[k]) for k in first)
    for key in fresh:
        assert torch.equal(fresh[key], changed[key]), key


@pytest.mark.parametrize("stage", ["finetune", "subspace", "weight_learning"])
def test_run_identity_holds_the_code_hash_the_rules_carry(world, stage):
    """The identity's code is the `code` param of the stage's rules (rules/common.smk CODE: code_hash of the
    workflow script), computed here from the script's file, not through lslo.code_identity.stage_entry."""
    model_dir, table, _ = world
    identity = run_identity({"stage": stage}, lslo_model(model_dir), TrainOptions.from_dict(small_options()),
                            LANGUAGES, table, None, 1)
    assert identity["code"] == code_hash(ROOT / "workflow" / "scripts" / f"{stage}.py")


class Killed(Exception):
    """Stands in for a SIGKILL between two epochs (tests/test_train.py kills a real process mid-epoch)."""


def finetune_run(model_dir, table, ckpt, metrics, epoch_hook=None):
    """Three epochs of LSLo training as the finetune stage; returns the final trainable state."""
    from lslo.tokenizer import load_tokenizer

    model = lslo_model(model_dir)
    train(model, load_tokenizer(model_dir), table, LANGUAGES, small_options(epochs=3, dev_sentences=0), ckpt,
          metrics, epoch_hook=epoch_hook, identity={"stage": "finetune", "base_model": C.model_identity(model_dir)})
    return trainable_state(model)


def test_a_killed_run_rerun_after_a_code_change_starts_fresh(world, tmp_path, monkeypatch, caplog):
    """Killed after epoch 2, then one line of lslo/train.py changes (the decay of the lr schedule, halved): the rerun
    sets the old code's checkpoints aside with one INFO line and ends equal to a fresh run of the new code. Resuming
    would train epochs 1-2 with the old code and epoch 3 with the new one: neither result."""
    model_dir, table, _ = world
    repo = tmp_path / "repo"  # lslo/ and workflow/scripts/ side by side, as the rules hash them
    shutil.copytree(ROOT / "lslo", repo / "lslo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "workflow" / "scripts", repo / "workflow" / "scripts")
    monkeypatch.setattr(lslo.code_identity, "PACKAGE_DIR", repo / "lslo")

    def kill_after_epoch_2(epoch):
        if epoch == 3:
            raise Killed
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        finetune_run(model_dir, table, ckpt, tmp_path / "m1.tsv", kill_after_epoch_2)
    assert C.last_checkpoint(ckpt) == C.checkpoint_path(ckpt, 2) and not (ckpt / C.COMPLETE).exists()

    # the change: in the file (what the rules and the identity hash) and in the code that runs
    source = repo / "lslo" / "train.py"
    old_line = "    return lr * math.sqrt(warmup / step)\n"
    assert source.read_text().count(old_line) == 1
    source.write_text(source.read_text().replace(old_line, "    return 0.5 * lr * math.sqrt(warmup / step)\n"))
    old_get_lr = lslo.train.get_lr
    monkeypatch.setattr(lslo.train, "get_lr", lambda step, lr, warmup: (
        0.5 * old_get_lr(step, lr, warmup) if step >= warmup else old_get_lr(step, lr, warmup)))

    with caplog.at_level(logging.INFO, logger="lslo.checkpoint"):
        rerun = finetune_run(model_dir, table, ckpt, tmp_path / "m2.tsv")
    fresh = finetune_run(model_dir, table, tmp_path / "fresh", tmp_path / "m3.tsv")
    assert rerun.keys() == fresh.keys()
    for key in fresh:
        assert torch.equal(rerun[key], fresh[key]), key
    assert (tmp_path / "m2.tsv").read_bytes() == (tmp_path / "m3.tsv").read_bytes()
    lines = [r.getMessage() for r in caplog.records if r.name == "lslo.checkpoint"]
    expected = f"{ckpt}: epoch002.pt was trained with other code; set aside as ckpt.set-aside-1, training from scratch"
    assert lines == [expected]
    assert (tmp_path / "ckpt.set-aside-1" / "epoch002.pt").exists()  # kept, not trained on


# ---------------------------------------------------------------------------------------------- durability

def test_a_truncated_newest_checkpoint_falls_back_with_one_warning(tmp_path, caplog):
    ckpt = saved(tmp_path, [1, 2])
    newest = C.checkpoint_path(ckpt, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="lslo.checkpoint"):
        state = C.find_resumable(ckpt, {"stage": "x"})
    assert state["epoch"] == 1 and torch.equal(state["trainable_state"]["w"], torch.ones(3))
    lines = [r for r in caplog.records if r.name == "lslo.checkpoint"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert f"{newest}: unreadable checkpoint, truncated or corrupt" in lines[0].getMessage()


def test_leftover_temporaries_are_removed(tmp_path):
    ckpt = saved(tmp_path, [1])
    leftover = ckpt / ".epoch002.pt.k3j9x_.tmp"
    leftover.mkdir()
    (leftover / "epoch002.pt").write_bytes(b"PK\x03\x04 half")
    assert C.find_resumable(ckpt, {"stage": "x"})["epoch"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch001.pt"]


def test_save_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    saved(tmp_path, [1])
    assert len(synced) == 2
    assert synced[0].endswith("/epoch001.pt") and ".tmp/" in synced[0]  # the file, before its rename
    assert synced[1] == str(tmp_path)


def test_disk_full_while_saving_is_one_line_naming_the_file(tmp_path, monkeypatch):
    real_open = open

    class FullDisk(io.RawIOBase):
        """A file on a disk with 1000 bytes left: torch's writer gets ENOSPC."""

        def __init__(self, path, mode):
            self.f, self.n = real_open(path, mode), 0

        def write(self, data):
            self.n += len(data)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def close(self):
            self.f.close()

    monkeypatch.setattr(C, "open", FullDisk, raising=False)
    with pytest.raises(LsloError, match=r"epoch001\.pt: no space left on device") as err:
        saved(tmp_path, [1])
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary


# ---------------------------------------------------------------------------------------------- retention, pickle

def test_retention_orders_by_epoch_number(tmp_path):
    saved(tmp_path, [998, 999, 1000, 1001])
    assert [p.name for p in C.checkpoints(tmp_path)] == ["epoch1000.pt", "epoch1001.pt"]
    assert sorted(["epoch999.pt", "epoch1000.pt", "epoch1001.pt"])[-1] == "epoch999.pt"  # what text order keeps
    assert C.last_checkpoint(tmp_path).name == "epoch1001.pt"
    assert C.find_resumable(tmp_path, {"stage": "x"})["epoch"] == 1001


class Payload:
    """Unpickling this opens (creates) a file: code execution."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_a_crafted_pickle_in_a_checkpoint_is_not_executed(tmp_path, caplog):
    ckpt = saved(tmp_path / "ckpt", [1])
    sentinel = tmp_path / "pwned"
    torch.save({"format": C.CHECKPOINT_FORMAT, "identity": {"stage": "x"}, "epoch": 2, "x": Payload(sentinel)},
               C.checkpoint_path(ckpt, 2))
    with caplog.at_level(logging.WARNING, logger="lslo.checkpoint"):
        state = C.find_resumable(ckpt, {"stage": "x"})
    assert not sentinel.exists()
    assert state["epoch"] == 1 and "epoch002.pt: unreadable checkpoint" in caplog.text
    with pytest.raises(LsloError, match=r"epoch002.pt: unreadable checkpoint \(it holds pickled objects"):
        C.load_checkpoint(C.checkpoint_path(ckpt, 2))
    assert not sentinel.exists()
    torch.load(C.checkpoint_path(ckpt, 2), weights_only=False)  # the payload is real: unsafe loading runs it
    assert sentinel.exists()


# ---------------------------------------------------------------------------------------------- adapters' base

def test_adapters_refuse_a_base_of_another_identity(world, tmp_path):
    from lslo.adapters import load_adapters, read_adapters, save_adapters
    from lslo.inference import load_variant

    model_dir, _, _ = world
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    torch.manual_seed(7)
    M2M100ForConditionalGeneration(M2M100ForConditionalGeneration.from_pretrained(model_dir).config) \
        .save_pretrained(other)  # same shape, other weights
    path = save_adapters(lslo_model(model_dir), tmp_path / "adapters.safetensors", base_model=str(model_dir),
                         base_identity=C.model_identity(model_dir))
    assert read_adapters(path)[1]["base_identity"] == C.model_identity(model_dir)
    load_adapters(M2M100ForConditionalGeneration.from_pretrained(model_dir), path,
                  base_identity=C.model_identity(model_dir))
    with pytest.raises(LsloError, match=rf"trained on base model {model_dir} .* not on {other}"):
        load_adapters(M2M100ForConditionalGeneration.from_pretrained(other), path,
                      base_identity=C.model_identity(other), base_model=other)
    variant = tmp_path / "variant.json"
    variant.write_text(json.dumps({"method": "lslo", "base_model": str(other), "adapters": str(path),
                                   "model": None, "languages": LANGUAGES}))
    with pytest.raises(LsloError, match=rf"adapters.safetensors: adapters were trained on base model {model_dir}"):
        load_variant(variant, device="cpu")
    variant.write_text(json.dumps({"method": "lslo", "base_model": str(model_dir), "adapters": str(path),
                                   "model": None, "languages": LANGUAGES}))
    assert load_variant(variant, device="cpu").languages == LANGUAGES


def test_a_tied_embedding_is_saved_once_when_trained_and_never_when_frozen():
    """M2M100's embedding is one parameter under four state-dict names (shared, encoder and decoder embed_tokens,
    lm_head): an epoch checkpoint holds it once for Ft-all and not at all for LSLo, whose base is frozen."""
    from conftest import make_tiny_model
    from lslo.train import load_trainable_state

    full = make_tiny_model()
    assert full.lm_head.weight is full.model.shared.weight  # tied, as in the released checkpoints
    state = trainable_state(full)
    unique = {id(p): p for p in full.parameters()}.values()
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in unique)
    assert [k for k in state if k.endswith(("shared.weight", "embed_tokens.weight", "lm_head.weight"))] == [
        "model.shared.weight"]
    fresh = make_tiny_model(seed=1)
    load_trainable_state(fresh, state)
    for key, value in full.state_dict().items():  # every alias, lm_head included, took the saved values
        assert torch.equal(fresh.state_dict()[key], value), key

    from lslo.model import LSLoSpec, inject_lslo

    lslo = inject_lslo(make_tiny_model(), LSLoSpec(languages=LANGUAGES, ranks={c: 2 for c in LANGUAGES}))
    frozen = {n for n, p in lslo.named_parameters(remove_duplicate=False) if not p.requires_grad}
    saved = trainable_state(lslo)
    assert any(n.endswith("lm_head.weight") for n in frozen) and not set(saved) & frozen
    assert {n for n, p in lslo.named_parameters() if p.requires_grad} <= set(saved)
