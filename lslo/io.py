"""Atomic file output: every file a stage writes appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    The temporary lives in the same directory so the final `os.replace` is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    if is_dir:
        target.mkdir()
    try:
        yield target
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_write_all(paths: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """`atomic_write` for a stage with several outputs: all of them appear, or none.

    Every output is written to its temporary sibling first; only when the block has written them all are they
    renamed onto their final names. A rename that fails part-way removes the ones already renamed."""
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(_temporary_sibling(Path(p))) for p in paths]
        yield temporaries
        published = []
        try:
            for tmp, path in zip(temporaries, paths):
                os.replace(tmp, path)
                published.append(Path(path))
        except BaseException:
            for path in published:
                path.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _temporary_sibling(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp / path.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def portable_path(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """How a stage file in directory `start` names `path`: relative to `start`, so a results directory copied
    elsewhere keeps pointing into itself. A path given absolute (a model outside the working directory, set so in
    the config) stays absolute. Read it back with `stage_path`."""
    if os.path.isabs(path):
        return str(path)
    return os.path.relpath(path, start)


def stage_path(value: str, stage_file: str | os.PathLike) -> Path:
    """A path named inside `stage_file` (see portable_path): relative ones are relative to its directory."""
    return Path(value) if os.path.isabs(value) else Path(stage_file).parent / value


def write_tsv(df, path: str | os.PathLike, **kwargs) -> None:
    """Write a pandas DataFrame as TSV atomically (no index)."""
    with atomic_write(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, **kwargs)


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike):
    from lslo.errors import LsloError

    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LsloError(f"{path}: not valid JSON ({err})") from None


def read_tsv(path: str | os.PathLike, columns: list, what: str, allow_empty: bool = True):
    """A stage's TSV with its required columns; a missing file/column names the file and what was expected."""
    import pandas as pd

    from lslo.errors import LsloError

    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: {what} not found")
    frame = pd.read_csv(path, sep="\t")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LsloError(f"{path}: {what} lacks column(s) {missing}; expected {columns}")
    if frame.empty and not allow_empty:
        raise LsloError(f"{path}: {what} has no rows")
    return frame
