"""Epoch checkpoints of the training stages: what is saved, when a checkpoint may be resumed, and how it is kept.

Layout: ``checkpoint_dir/epoch{e:03d}.pt`` (the two newest epochs are kept), ``checkpoint_dir/metrics.tsv`` (the
metrics rows so far, rewritten every epoch) and, once the run has trained every epoch, ``checkpoint_dir/complete``.
An epoch file is a ``torch.save`` of plain data only (dicts, lists, numbers, strings, tensors), loaded with
``torch.load(weights_only=True)``: a crafted file cannot run code. Fields: format, identity, epoch, step,
trainable_state, optimizer, scaler, rng {python, numpy, torch, cuda}, metrics.

Identity: a checkpoint is resumed only if it would lead to the same result. The identity holds the stage, every
setting the stage passes in (rank and GPS plan, index plan, modules, rank, mode ...), all training options, the
model spec and its ranks per site, the languages, the lslo version, the code that trains (the stage's script and
the lslo modules it imports: lslo.code_identity.stage_code_hash, the hash that reruns the job), the base model
(`model_identity`) and the training and dev data (sha256 of their sentences). The one setting left out is the
process count: with the same effective batch (``max_tokens x update_freq x processes``, which the identity holds) a
run resumed on another number of GPUs continues the same training, with the same batches and updates; only the
dropout masks, drawn from each process's own RNG, differ, as between any multi-process and one-process run (without
dropout, 2 gloo processes end bit-identical to 1 process with twice the update_freq on the tiny test model).

On a mismatch, or when the directory is marked complete (a finished job: Snakemake runs a job again only when its
outputs are missing, outdated or forced, so retraining is what was asked), the whole directory is set aside as a
sibling ``<name>.set-aside-<n>`` (never deleted) with one INFO line naming what differed, and training starts
from scratch. A run that was killed before it finished resumes after its last complete epoch and ends, on CPU with a
fixed seed, bit-identical to an uninterrupted run.

Durability: an epoch file is written under a hidden temporary name, fsynced, renamed, and the directory fsynced;
leftovers of a kill (``.epochNNN.pt.*.tmp/``) are removed before training. A newest file that does not load (a
node crash can truncate it) is skipped with one WARNING naming it, and the newest one that loads is used. A full
disk stops with one LsloError naming the file and "no space left".
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from lslo.errors import LsloError
from lslo.io import write_tsv

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: plain data, weights_only loading, identity
KEEP_CHECKPOINTS = 2
COMPLETE = "complete"  # marker file of a finished run
EPOCH_FILE = re.compile(r"epoch(\d{3,})\.pt")


# ---------------------------------------------------------------------------------------------- identity

# The files of a model directory that decide what a model computes: its config, weights and tokenizer.
# (README.md, generation_config.json and the like do not change training or decoding here.)
MODEL_FILES = re.compile(r"config\.json|.*\.safetensors|.*\.bin|.*\.safetensors\.index\.json|.*\.bin\.index\.json"
                         r"|.*\.model|vocab\.json|tokenizer(_config)?\.json|special_tokens_map\.json"
                         r"|added_tokens\.json")
SAMPLE_BYTES = 4096  # of each tensor's data, at its start and at its end


def model_identity(model_dir) -> str:
    """Content identity of a local HF model directory (sha256 hex), cheap for a multi-GB checkpoint.

    Hashed: the name and bytes of config.json and the tokenizer files; of each safetensors weight file its size,
    its header (every tensor's name, dtype, shape and offsets) and the first and last 4 KiB of every tensor's data,
    about 3 MB read for the 615M-parameter M2M-124 instead of 2.4 GB (measured on a 1.9 GB file of 385 tensors of
    M2M-124's shapes: 0.08 s, where sha256 of the whole file took 31 s on a busy 2-core machine). Another training
    run, another dtype or shape,
    or any edited tensor start/end gives another identity; a copy or a move of the directory keeps it (mtimes and
    paths are not hashed). Other weight files (pytorch_model.bin) are hashed whole.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LsloError(f"{model_dir}: model directory not found")
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and MODEL_FILES.fullmatch(p.name)):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".safetensors":
            _hash_safetensors(path, digest)
        else:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def files_identity(paths, root=None) -> str:
    """Content identity of a list of files (sha256 hex): each file's name (relative to `root` when given, so a
    moved copy keeps it) and bytes, in the given order. For the small inputs the workflow tracks by content:
    FLORES files, a SentencePiece model. A missing file raises an LsloError naming it."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if not path.is_file():
            raise LsloError(f"{path}: file not found")
        name = path.relative_to(root) if root is not None else path.name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _hash_safetensors(path: Path, digest) -> None:
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_size)
        digest.update(header)
        try:
            tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        except (json.JSONDecodeError, AttributeError):
            raise LsloError(f"{path}: not a safetensors file (unreadable header)") from None
        for name in sorted(tensors):
            start, end = tensors[name]["data_offsets"]
            for offset in sorted({start, max(start, end - SAMPLE_BYTES)}):
                f.seek(8 + header_size + offset)
                digest.update(f.read(min(SAMPLE_BYTES, end - offset)))


def data_identity(table, columns: list[str]) -> str:
    """sha256 of the sentences of `columns` in row order (what training sees of a table)."""
    return hashlib.sha256(table[list(columns)].to_csv(sep="\t", index=False).encode("utf-8")).hexdigest()


def plain(value):
    """JSON-normal form (tuples -> lists, dict keys -> str) so identities compare as they are stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differences(saved, current, prefix: str = "") -> list[str]:
    """Dotted names of the identity entries that differ (recursing into dicts)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                out.append(name)
            else:
                out.extend(differences(saved[key], current[key], name))
        return out
    return [] if saved == current else [prefix or "identity"]


# ---------------------------------------------------------------------------------------------- files

def checkpoint_path(checkpoint_dir, epoch: int) -> Path:
    return Path(checkpoint_dir) / f"epoch{epoch:03d}.pt"


def checkpoints(checkpoint_dir) -> list[Path]:
    """The epoch files of a directory, oldest first, ordered by epoch number (epoch999 before epoch1000)."""
    found = []
    for path in Path(checkpoint_dir).glob("epoch*.pt"):
        match = EPOCH_FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def last_checkpoint(checkpoint_dir) -> Path | None:
    found = checkpoints(checkpoint_dir)
    return found[-1] if found else None


def epoch_metrics_path(checkpoint_dir) -> Path:
    """The metrics rows so far, beside the checkpoints (the declared metrics TSV is written once, at the end)."""
    return Path(checkpoint_dir) / "metrics.tsv"


def write_epoch_metrics(checkpoint_dir, frame) -> None:
    write_tsv(frame, epoch_metrics_path(checkpoint_dir))


def mark_complete(checkpoint_dir, epoch: int) -> None:
    """Mark a finished run: a later job finding this sets the directory aside and trains again."""
    path = Path(checkpoint_dir) / COMPLETE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{epoch}\n", encoding="utf-8")


def remove_temporaries(checkpoint_dir) -> None:
    """Hidden temporaries that a kill during a save leaves behind (.epochNNN.pt.<random>.tmp/)."""
    for tmp in Path(checkpoint_dir).glob(".epoch*.pt.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def set_aside(checkpoint_dir) -> Path:
    """Rename the directory to the first free sibling <name>.set-aside-<n> (kept, not deleted)."""
    checkpoint_dir = Path(checkpoint_dir)
    n = 1
    while (target := checkpoint_dir.with_name(f"{checkpoint_dir.name}.set-aside-{n}")).exists():
        n += 1
    os.replace(checkpoint_dir, target)
    return target


# ---------------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Every RNG state as plain data (numpy's array as a list), so the checkpoint loads with weights_only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- save / load

def save_checkpoint(checkpoint_dir, epoch: int, step: int, identity: dict, trainable_state: dict, optimizer,
                    scaler, metrics: list[dict]) -> Path:
    """Write epoch `epoch` durably, then keep only the KEEP_CHECKPOINTS newest epoch files."""
    path = checkpoint_path(checkpoint_dir, epoch)
    state = {"format": CHECKPOINT_FORMAT, "identity": identity, "epoch": epoch, "step": step,
             "trainable_state": trainable_state, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
             "metrics": [dict(row) for row in metrics]}
    write_durably(state, path)
    for old in checkpoints(checkpoint_dir)[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def write_durably(state, path: Path) -> None:
    """torch.save under a hidden temporary name, fsync, rename onto `path`, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        with open(tmp, "wb") as f:  # a Python file object: torch then keeps the OSError (ENOSPC) as context
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        if _no_space(err):
            free = shutil.disk_usage(path.parent).free
            raise LsloError(f"{path}: no space left on device while writing the checkpoint ({free / 2**20:.0f} "
                            "MiB free); free some space and rerun, training resumes from the last epoch") from None
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def fsync_dir(directory) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(err: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or torch's "unexpected pos" (its words for a short write)."""
    while err is not None:
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def load_checkpoint(path) -> dict:
    """One epoch file, without running any pickled code; LsloError naming the file when it does not load."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file would run code if unpickled
        raise LsloError(f"{path}: unreadable checkpoint (it holds pickled objects other than plain data; not "
                        "loaded, since unpickling them could run code)") from None
    except Exception as err:  # truncated or corrupt zip, not a torch file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LsloError(f"{path}: unreadable checkpoint, truncated or corrupt ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise LsloError(f"{path}: checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
    return state


def find_resumable(checkpoint_dir, identity: dict, may_set_aside: bool = True) -> dict | None:
    """The state to resume from, or None to start from scratch.

    Removes temporaries, skips unreadable newest files (one WARNING each), and sets the directory aside (one INFO
    line) when the newest readable checkpoint has another identity, when the run is marked complete, or when no
    file loads. `may_set_aside` False (DDP ranks other than 0, after rank 0 prepared the directory) only reads.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    if may_set_aside:
        remove_temporaries(checkpoint_dir)
    state, reason = None, None
    for path in reversed(checkpoints(checkpoint_dir)):
        try:
            state = load_checkpoint(path)
        except LsloError as err:
            log.warning("%s; falling back to the previous epoch checkpoint", err)
            continue
        differing = differences(state.get("identity"), identity)
        if differing:
            reason = f"{path.name} was trained with other {', '.join(differing)}"
        elif (checkpoint_dir / COMPLETE).exists():
            reason = "it holds a finished run (marked complete)"
        break
    else:
        if not any(checkpoint_dir.iterdir()):
            return None
        reason = "no checkpoint in it loads"
    if reason is None:
        state["path"] = str(path)
        return state
    if may_set_aside:
        moved = set_aside(checkpoint_dir)
        log.info("%s: %s; set aside as %s, training from scratch", checkpoint_dir, reason, moved.name)
    return None
