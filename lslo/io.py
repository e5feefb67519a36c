"""Atomic file output: every file a stage writes appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd

from lslo.errors import LsloError


# Written into every directory atomic_write(is_dir=True) publishes: the directory is lslo's output, which a later
# run may replace as a whole. A directory without it holds someone else's files, and lslo never deletes it.
OUTPUT_MARKER = ".lslo-output"
_MARKER_HEADER = ("# This directory was written by lslo. A later lslo run may replace it, as long as it holds only\n"
                  "# the files below, the ones lslo wrote.\n")


def _files_below(directory: Path) -> list[str]:
    """Every file (or link) below `directory` but the marker, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if not p.is_dir() and p.name != OUTPUT_MARKER)


def _write_marker(directory: Path) -> None:
    (directory / OUTPUT_MARKER).write_text(_MARKER_HEADER + "".join(f"{name}\n" for name in _files_below(directory)),
                                           encoding="utf-8")


def _foreign_files(directory: Path) -> list[str] | None:
    """Files in an existing output `directory` that lslo did not write there: None when it has no marker (nothing
    in it is lslo's), else the files its marker does not list (a user's note added to an earlier export)."""
    marker = directory / OUTPUT_MARKER
    if not marker.is_file():
        return None
    written = {line for line in marker.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")}
    return [name for name in _files_below(directory) if name not in written]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    The temporary lives in the same directory so the final `os.replace` is atomic on POSIX. A directory
    (is_dir) gets the OUTPUT_MARKER file, listing the files written, and replaces an existing `path` only when that
    is empty or an earlier lslo output holding nothing but the files its marker lists; any other existing
    directory or file stops with an LsloError and is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    if is_dir:
        target.mkdir()
    try:
        yield target
        if is_dir:
            _write_marker(target)
        if is_dir and (path.exists() or path.is_symlink()):
            _refuse_foreign_directory(path)
            previous = tmp / "replaced"
            os.replace(path, previous)  # removed with tmp below, once the new directory is in place
            try:
                os.replace(target, path)
            except BaseException:
                os.replace(previous, path)
                raise
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_foreign_directory(path: Path) -> None:

    if path.is_symlink() or not path.is_dir():
        raise LsloError(f"{path}: exists and is not a directory; lslo writes a directory there and replaces only "
                        "an empty directory or one it wrote")
    if any(path.iterdir()):
        foreign = _foreign_files(path)
        if foreign is None or foreign:
            raise LsloError(f"{path}: directory holds files lslo did not write ({_which(foreign)}); nothing was "
                            "replaced: move them away or choose another output directory")


def _which(foreign: list[str] | None) -> str:
    if foreign is None:
        return f"no {OUTPUT_MARKER}"
    return ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")


def check_output_dir(path: str | os.PathLike, force: bool, option: str = "--out") -> None:
    """Before a command writes directory `path`: it must not exist or be empty; with `force` it may also be an
    earlier output of lslo (OUTPUT_MARKER) that holds only the files lslo wrote, which is then replaced. A
    directory holding anything else is never replaced, with or without force."""

    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise LsloError(f"{option} {path}: exists and is not a directory")
    if not any(path.iterdir()):
        return
    foreign = _foreign_files(path)
    ours = foreign == []
    if not force:
        hint = ("give --force to replace it (it is an earlier lslo output)" if ours
                else "it holds files lslo did not write, so choose another directory")
        raise LsloError(f"{option} {path}: directory exists and is not empty; {hint}")
    if not ours:
        raise LsloError(f"{option} {path}: --force replaces only a directory lslo wrote, holding nothing else; this "
                        f"one holds files lslo did not write ({_which(foreign)}), and nothing in it was changed")


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

    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LsloError(f"{path}: not valid JSON ({err})") from None


def read_tsv(path: str | os.PathLike, columns: list, what: str, allow_empty: bool = True):
    """A stage's TSV with its required columns; a missing file/column names the file and what was expected."""

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


def markdown_cell(value) -> str:
    """A value as the text of one Markdown table cell: a `|` in it (a variant label such as "LSLo | WL") would
    otherwise end the cell and shift the rest of the row."""
    return str(value).replace("|", "\\|")
