"""benchmarks/gpu_check.sh: its --cpu-smoke mode end to end (so the GPU check cannot rot between GPU loans), and
the parsers that turn each step's output into the summary table."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_runs_every_step_and_writes_the_table(tmp_path):
    out = tmp_path / "RESULTS-gpu.md"
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = out.read_text(encoding="utf-8")
    table = proc.stdout.strip()
    assert table in report  # the printed table is the written one
    rows = re.findall(r"^\| (cuda tests|loss memory|benchmark|ddp) \| ([^|]+) \| ([^|]+) \| ([^|]*) \|$", table,
                      re.M)
    by_step = {}
    for step, check, result, detail in rows:
        by_step.setdefault(step, []).append((check.strip(), result.strip(), detail.strip()))
    assert set(by_step) == {"cuda tests", "loss memory", "benchmark", "ddp"}
    losses = {c.split(",")[1].split("(")[0].strip(): (c, r, d) for c, r, d in by_step["loss memory"]
              if c.startswith("train update, ")}
    check, result, detail = losses["plain loss"]
    assert "(tiny, " in check and re.fullmatch(r"\d+ ms", result)
    peak, rise = (float(x) for x in re.match(r"peak ([\d.]+) MiB .*, ([\d.]+) MiB above", detail).groups())
    assert 0 <= rise < peak  # the update's own memory is part of the process's peak
    assert re.fullmatch(r"ABSENT|\d+ ms", losses["chunked loss"][1])  # ABSENT: train.loss not in this checkout
    tests = dict((c.split(":")[0], (r, d)) for c, r, d in by_step["cuda tests"])
    if not torch_cuda():
        assert tests["pytest -m cuda"][0] == "SKIP" and re.fullmatch(r"0 passed, 0 failed, \d+ skipped",
                                                                     tests["pytest -m cuda"][1])
    bench = {c: (r, d) for c, r, d in by_step["benchmark"]}
    for system in ("floor", "peft", "lslo_one", "lslo_mixed", "lslo_grouped", "full"):
        result, detail = bench[f"train step {system} (tiny)"]
        ms, tokens_per_s = float(result.removesuffix(" ms")), float(detail.split(" tokens/s")[0])
        # tokens/s follows from the ms: 4 sentences x 32 tokens, source and target
        assert tokens_per_s == pytest.approx(2 * 4 * 32 / (ms / 1000), rel=0.01, abs=1)
    assert sum(c.startswith("target: ") for c in bench) == 9
    assert by_step["ddp"] == [("finetune_full rule scheduled with --set-resources finetune_full:gpu=1 (dry run)",
                               "PASS", "gpu per finetune job: [1]")]
    assert "bf16 autocast" in report and "### Shape `tiny`" in report


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_junit_counts_and_amp_outcome(gpu_check, tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase name="test_training_kernels_equal_per_sample_formula[cuda-fp32-grouped]"/>
      <testcase name="test_training_kernels_equal_per_sample_formula[cuda-bf16-grouped]"><failure/></testcase>
      <testcase name="test_amp_update_with_gradscaler_overflow_keeps_the_weights[cuda-fp16]"><skipped/></testcase>
    </testsuite></testsuites>""")
    assert gpu_check.junit_counts(xml) == {"passed": 1, "failed": 1, "skipped": 1, "amp": ["cuda-fp16 skipped"]}


def test_world_size_and_scheduled_gpus_parsers(gpu_check):
    log = ("2026-11-29 lslo.train INFO training: world size 2, rank 0, device cuda:0\n"
           "2026-11-29 lslo.train INFO training: world size 2, rank 1, device cuda:1\n")
    assert gpu_check.world_sizes(log) == [2, 2]
    dry_run = ("rule data:\n    output: a\n    resources: tmpdir=/tmp\n\n"
               "rule finetune:\n    input: a\n    output: b\n    resources: tmpdir=/tmp, gpu=4, runtime=1440\n")
    assert gpu_check.scheduled_gpus(dry_run, "finetune") == [4]
    assert gpu_check.scheduled_gpus(dry_run, "data") == []


def test_the_training_log_names_the_world_size(gpu_check, caplog, tmp_path):
    """gpu_check reads the world size from the line lslo.train logs before training starts (here the run then
    stops at its missing data)."""
    import logging

    import lslo.train as T

    with caplog.at_level(logging.INFO, logger="lslo.train"), pytest.raises(AttributeError):  # no data
        T.train(None, None, None, ["en"], {}, tmp_path, tmp_path / "metrics.tsv")
    assert gpu_check.world_sizes(caplog.text) == [1]
