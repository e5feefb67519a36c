"""What a workflow job needs around a stage function: one-line errors and N training processes.

- `stage_job(log_path)`: the body of every workflow/scripts/*.py runs inside it. Log records and stray stderr go
  to the rule log; an LsloError ends the job with its one-line message in the log and on stderr (no traceback:
  the message already names the file, field or language at fault); any other exception keeps its traceback.
- `run_processes(fn, n_processes, ...)`: fn(**kwargs) in n_processes DDP processes started by torchrun
  (lslo.train.distributed_setup then uses NCCL on GPUs and gloo on CPU); one process runs fn in the job's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from lslo.errors import LsloError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- one-line errors

@contextlib.contextmanager
def stage_job(log_path, rank: int | None = None) -> Iterator[None]:
    """Run a job's body with stderr and logging sent to `log_path`; an LsloError exits 1 with one line.

    rank: set in the processes of a multi-process job; they append to the log and tag their lines.
    """
    if rank is None:
        Path(log_path).write_text("", encoding="utf-8")  # a fresh log per job, then appends only: the
        # processes of a multi-process job write to the same file
    stream = open(log_path, "a", buffering=1, encoding="utf-8")
    original_stderr = sys.stderr
    sys.stderr = stream
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(stream=stream, level=logging.INFO, format=prefix + LOG_FORMAT, force=True)
    try:
        yield
    except LsloError as err:
        line = f"error: {err}".replace("\n", " ")
        print(line, file=stream, flush=True)
        if rank is None:  # the job's own process speaks for the job; worker processes only log
            print(line, file=original_stderr, flush=True)
        raise SystemExit(1) from None
    # any other exception propagates with its traceback, which Python prints to sys.stderr: the rule log


# ---------------------------------------------------------------------------------------------- N processes

def run_processes(fn: Callable, n_processes: int, log_path=None, threads: int | None = None, **kwargs) -> None:
    """fn(**kwargs) in `n_processes` DDP processes on this machine (one per GPU), or here when n_processes <= 1.

    The processes are started by torchrun (`python -m torch.distributed.run --standalone`), which sets RANK,
    WORLD_SIZE, LOCAL_RANK and a free rendezvous port, and stops them all when one fails. kwargs must be JSON
    values (paths as strings). The effective batch stays the configured one whatever the process count when the
    options set tokens_per_update (TrainOptions.update_freq_for). An LsloError in any process is raised here
    with its message; the processes' output goes to log_path.
    """
    import torch

    if n_processes <= 1:
        if threads:
            torch.set_num_threads(threads)
        fn(**kwargs)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < n_processes:
        raise LsloError(f"the job asks for {n_processes} GPU processes (resources gpu={n_processes}) but sees "
                        f"{torch.cuda.device_count()} GPU(s)")
    function = f"{fn.__module__}:{fn.__qualname__}"
    if function not in _training_stages():
        raise LsloError(f"{function} is not a training stage; run_processes starts only {sorted(_training_stages())}")
    with tempfile.TemporaryDirectory(prefix="lslo-processes-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({
            "function": function, "kwargs": kwargs,
            "log": str(log_path) if log_path else None, "error": str(Path(tmp) / "error"),
            "threads": max(1, threads // n_processes) if threads else None}))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_processes}",
                   "-m", "lslo.jobs", str(job)]
        log.info("starting %d processes: %s", n_processes, " ".join(command))
        with open(log_path or os.devnull, "a", encoding="utf-8") as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False)
        error = Path(tmp) / "error"
        if error.is_file():  # the first LsloError of any process, already one line
            raise LsloError(error.read_text(encoding="utf-8"))
        if done.returncode:
            raise RuntimeError(f"{n_processes} training processes ended with exit code {done.returncode}"
                               + (f"; their output: {log_path}" if log_path else ""))


def _training_stages() -> dict:
    """The stage functions a job file may name: the training stages, and nothing else is ever imported by name."""
    from lslo.finetune import run_finetune
    from lslo.subspace import run_subspace
    from lslo.weight_learning import run_weight_learning

    return {f"{fn.__module__}:{fn.__qualname__}": fn for fn in (run_finetune, run_subspace, run_weight_learning)}


def _process(job_json: str) -> None:
    """One torchrun process: fn(**kwargs) from the job file, LsloError messages to the shared error file."""
    job = json.loads(Path(job_json).read_text(encoding="utf-8"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    fn = _training_stages()[job["function"]]
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    with stage_job(job["log"], rank=rank) if job["log"] else contextlib.nullcontext():
        log.info("process %d of %d", rank, world_size)
        try:
            fn(**job["kwargs"])
        except LsloError as err:
            with contextlib.suppress(FileExistsError), open(job["error"], "x", encoding="utf-8") as first:
                first.write(str(err))
            raise


if __name__ == "__main__":
    _process(sys.argv[1])
