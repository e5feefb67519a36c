"""Training cost (lslo.cost.variant_cost) from Snakemake benchmark TSVs and metrics.tsv, on synthetic files."""

import pandas as pd
import pytest

from lslo.cost import variant_cost
from lslo.errors import LsloError

BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"


def benchmark(path, rows):
    """A benchmark TSV as Snakemake 9 writes it (snakemake.benchmark.print_benchmark_tsv): floats with 2 decimals,
    one row per repetition; rows: [(s, max_rss)]."""
    lines = [BENCHMARK_HEADER] + [f"{s:.4f}\t0:00:01\t{rss}\t900.00\t400.00\t410.00\t1.00\t2.00\t95.00\t12.00"
                                  for s, rss in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics(path, gpus, peaks):
    pd.DataFrame({"epoch": range(1, len(peaks) + 1), "step": 10, "gpus": gpus, "peak_gpu_mib": peaks}).to_csv(
        path, sep="\t", index=False)
    return path


def test_hours_are_summed_job_seconds_averaged_over_runs(tmp_path):
    seed1 = {"benchmarks": [benchmark(tmp_path / "wl1.tsv", [(1800.0, "512.25")]),
                            benchmark(tmp_path / "ft1.tsv", [(5400.0, "2048.50")])],
             "metrics": [metrics(tmp_path / "wl1.m.tsv", 2, [100.0, 300.0]),
                         metrics(tmp_path / "ft1.m.tsv", 4, [1000.0, 1500.5])]}
    seed2 = {"benchmarks": [benchmark(tmp_path / "wl2.tsv", [(3600.0, "700.00")]),
                            benchmark(tmp_path / "ft2.tsv", [(7200.0, "1024.00")])],
             "metrics": [metrics(tmp_path / "wl2.m.tsv", 2, [120.0]), metrics(tmp_path / "ft2.m.tsv", 4, [900.0])]}
    cost = variant_cost([seed1, seed2])
    assert cost["train_hours"] == pytest.approx(((1800 + 5400) + (3600 + 7200)) / 3600 / 2)
    assert cost["gpu_hours"] == pytest.approx(((2 * 1800 + 4 * 5400) + (2 * 3600 + 4 * 7200)) / 3600 / 2)
    assert cost["peak_rss_mb"] == pytest.approx(2048.5)
    assert cost["peak_gpu_mb"] == pytest.approx(1500.5)


def test_repetitions_are_measurements_of_one_job(tmp_path):
    run = {"benchmarks": [benchmark(tmp_path / "b.tsv", [(100.0, "10.00"), (140.0, "30.00"), (120.0, "20.00")])],
           "metrics": [metrics(tmp_path / "m.tsv", 1, [5.0])]}
    cost = variant_cost([run])
    assert cost["train_hours"] == pytest.approx(120.0 / 3600) and cost["peak_rss_mb"] == 30.0


def test_cpu_runs_and_missing_pieces_give_none(tmp_path):
    cpu = {"benchmarks": [benchmark(tmp_path / "b.tsv", [(360.0, "NA")])],
           "metrics": [metrics(tmp_path / "m.tsv", 0, [float("nan")])]}
    assert variant_cost([cpu]) == {"train_hours": 0.1, "gpu_hours": None, "peak_rss_mb": None,
                                   "peak_gpu_mb": None}  # no GPU job; NA: Snakemake sampled no memory
    absent = {"benchmarks": [tmp_path / "b.tsv", tmp_path / "gone.tsv"],
              "metrics": [tmp_path / "m.tsv", tmp_path / "gone.m.tsv"]}
    assert variant_cost([absent]) == dict.fromkeys(["train_hours", "gpu_hours", "peak_rss_mb", "peak_gpu_mb"])
    pd.DataFrame({"epoch": [1], "trainable_params": [5]}).to_csv(tmp_path / "old.tsv", sep="\t", index=False)
    no_column = {"benchmarks": [benchmark(tmp_path / "g.tsv", [(3600.0, "-")])], "metrics": [tmp_path / "old.tsv"]}
    cost = variant_cost([no_column])  # a metrics.tsv from before the gpus column: GPU use unknown
    assert cost == {"train_hours": 1.0, "gpu_hours": None, "peak_rss_mb": None, "peak_gpu_mb": None}


def test_bad_content_names_the_file_and_column(tmp_path):
    path = benchmark(tmp_path / "b.tsv", [(10.0, "12.00")])
    path.write_text(path.read_text().replace("12.00", "lots"))
    with pytest.raises(LsloError, match=r"b\.tsv: column 'max_rss' holds 'lots', not a number"):
        variant_cost([{"benchmarks": [path], "metrics": [metrics(tmp_path / "m.tsv", 1, [1.0])]}])
    with pytest.raises(LsloError, match="1 benchmark file"):
        variant_cost([{"benchmarks": [path], "metrics": []}])
