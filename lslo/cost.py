"""What training a variant cost, measured: wall-clock hours, GPU hours and peak memory of its training jobs.

    variant_cost(runs) -> {"train_hours", "gpu_hours", "peak_rss_mb", "peak_gpu_mb"}   (Table 1's cost columns)

A run is one training of the variant (one seed): {"benchmarks": [...], "metrics": [...]}, the Snakemake
`benchmark:` TSV and the metrics.tsv of each of its training jobs (weight learning, subspace estimation,
fine-tuning), in the same order. Sources:

- Snakemake's benchmark TSV (snakemake.benchmark, Snakemake 9): header `s h:m:s max_rss max_vms max_uss max_pss
  io_in io_out mean_load cpu_time`, one row per repetition of the job (`repeat("file", n)` runs the job n times; the
  rows are n measurements of one job, so the job's time is their mean and its memory their maximum). `s` is the
  wall-clock time in seconds; memory is in MiB; a statistic Snakemake could not sample is `NA`, one it did not
  record `-`.
- metrics.tsv (lslo.train): `gpus` (processes that trained on CUDA, 0 on CPU) and `peak_gpu_mib` (the largest
  torch.cuda.max_memory_allocated of an epoch, MiB; empty on CPU).

train_hours = mean over runs of the summed job times / 3600; gpu_hours = mean over runs of sum over jobs of
gpus x s / 3600 (gpus = the job's largest `gpus`); peak_rss_mb and peak_gpu_mb = maxima over every job of every run.
A field is None when anything it needs is missing (a file, a column, an NA or -): nothing is estimated.
gpu_hours and peak_gpu_mb are None too when no job trained on a GPU. A value that is not a number is an error
naming the file and column.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lslo.errors import LsloError

COST_FIELDS = ["train_hours", "gpu_hours", "peak_rss_mb", "peak_gpu_mb"]
MISSING = {"NA", "-", ""}  # Snakemake's "not sampled" / "not recorded", and an empty metrics field


def _column(path, column: str) -> np.ndarray | None:
    """The column's numbers; None when the file or the column is absent or any value is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # a file the job never wrote into
        return None
    if column not in frame.columns or frame.empty:
        return None
    values = frame[column].str.strip()
    if values.isin(MISSING).any():
        return None
    try:
        return values.astype(np.float64).to_numpy()
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise LsloError(f"{path}: column '{column}' holds '{bad}', not a number") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _job_seconds(benchmark) -> float | None:
    seconds = _column(benchmark, "s")
    return None if seconds is None else float(seconds.mean())  # repetitions: n measurements of one job


def _job_max(path, column: str) -> float | None:
    values = _column(path, column)
    return None if values is None else float(values.max())


def _peak_gpu(metrics, gpus: float | None) -> tuple[bool, float | None]:
    """(known, peak MiB) of one job: a job that trained on no GPU has no GPU peak, and that is known."""
    if gpus is None:
        return False, None
    if gpus == 0:
        return True, None
    peak = _job_max(metrics, "peak_gpu_mib")
    return peak is not None, peak


def variant_cost(runs: list[dict]) -> dict:
    """{train_hours, gpu_hours, peak_rss_mb, peak_gpu_mb} of one variant over its runs (see the module docstring)."""
    if not runs:
        raise LsloError("cost: no runs given")
    missing = sorted({str(path) for run in runs for path in [*run.get("benchmarks", []), *run.get("metrics", [])]
                      if not Path(path).is_file()})
    if missing:  # results copied without their benchmarks/, a deleted checkpoint folder: its fields read "-"
        logging.getLogger(__name__).warning("training cost without %s: not found", ", ".join(missing))
    hours, gpu_hours, rss, gpu_peaks = [], [], [], []
    known = {field: True for field in COST_FIELDS}
    any_gpu = False
    for number, run in enumerate(runs):
        benchmarks, metrics = list(run.get("benchmarks", [])), list(run.get("metrics", []))
        if len(benchmarks) != len(metrics):
            raise LsloError(f"cost: run {number + 1} has {len(benchmarks)} benchmark file(s) for {len(metrics)} "
                            "metrics file(s); give both for every training job, in the same order")
        run_seconds, run_gpu_seconds = 0.0, 0.0
        for benchmark, metrics_tsv in zip(benchmarks, metrics):
            seconds = _job_seconds(benchmark)
            gpus = _job_max(metrics_tsv, "gpus")
            peak_rss = _job_max(benchmark, "max_rss")
            gpu_known, peak_gpu = _peak_gpu(metrics_tsv, gpus)
            any_gpu |= bool(gpus)
            known["train_hours"] &= seconds is not None
            known["gpu_hours"] &= seconds is not None and gpus is not None
            known["peak_rss_mb"] &= peak_rss is not None
            known["peak_gpu_mb"] &= gpu_known
            run_seconds += seconds or 0.0
            run_gpu_seconds += (gpus or 0.0) * (seconds or 0.0)
            rss.append(peak_rss)
            gpu_peaks.append(peak_gpu)
        hours.append(run_seconds / 3600)
        gpu_hours.append(run_gpu_seconds / 3600)
    known["gpu_hours"] &= any_gpu
    known["peak_gpu_mb"] &= any_gpu
    peak_rss_known = [v for v in rss if v is not None]
    gpu_peaks_known = [v for v in gpu_peaks if v is not None]
    return {"train_hours": float(np.mean(hours)) if known["train_hours"] else None,
            "gpu_hours": float(np.mean(gpu_hours)) if known["gpu_hours"] else None,
            "peak_rss_mb": max(peak_rss_known) if known["peak_rss_mb"] and peak_rss_known else None,
            "peak_gpu_mb": max(gpu_peaks_known) if known["peak_gpu_mb"] and gpu_peaks_known else None}


__all__ = ["variant_cost", "COST_FIELDS"]
