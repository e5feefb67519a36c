"""Workflow runs built once per test run and shared by the test modules that start from them (conftest.py's
session fixtures). A module that changes anything works on its own copy (`copy_run`: mtimes kept, so Snakemake
sees the copy as up to date).

With pytest-xdist each worker is a process of its own, so a session fixture runs once per worker: the first
worker that asks builds the run under a file lock in the directory the workers share, the others wait for it and
use what it built (pytest-xdist's documented pattern for session fixtures that must run only once).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock


def build_once(tmp_path_factory, name: str, build) -> Path:
    """The directory `build(path)` fills, built by the first worker that asks and reused by every other one. A
    build that failed leaves no `.done` mark: the next worker that asks builds it again (and fails the same way)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-<n>/: one per test run, shared by its workers
    shared = root / "shared"
    shared.mkdir(exist_ok=True)
    path, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            if path.exists():
                shutil.rmtree(path)
            build(path)
            done.touch()
    return path


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a workflow directory with its results/ and .snakemake/ records; copytree's copy2 keeps the mtimes
    of files and directories, so Snakemake sees in the copy the state it sees in `src`."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
