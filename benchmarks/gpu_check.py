"""One prepared GPU check (run it through benchmarks/gpu_check.sh): every GPU-only path of lslo in one command.

    benchmarks/gpu_check.sh                 # on a GPU machine: at most ~8 minutes, writes benchmarks/RESULTS-gpu.md
    benchmarks/gpu_check.sh --cpu-smoke     # no GPU: the same steps at a tiny shape, checks the script itself

Steps, in this order, each a subprocess with its own time limit (the benchmark gets what the first two left of
the budget). A step that fails or runs out of time is reported as such and the others still run; the exit
status is 1 when a step failed or ran out of time, or, on a GPU, when the CUDA tests were skipped; a missed
performance target is reported, not failed:

1. ``pytest -m cuda tests/test_precision.py tests/test_train_amp.py``: every mixed-batch kernel and merged decoding
   in fp32, bf16 and fp16 autocast against the float64 per-sample formula (outputs and gradients), one AMP update
   with a forced GradScaler overflow, and the training loop under train.amp_dtype fp16 (fairseq's scaler at 2**7,
   an overflowed batch retried then skipped) and bf16. Without CUDA they are skipped (and --cpu-smoke reports them
   as skipped).
2. DDP through the workflow's own launch path: the finetune rule of a tiny demo config (ft-all) run by
   Snakemake with ``--set-resources finetune_full:gpu=N`` (N = every GPU present); the world size is read from the
   job's log (``lslo.train`` logs it). --cpu-smoke: a dry run that checks the job is scheduled with gpu=N.
3. The training loss's memory (``benchmarks/scale.py --step-of``): one lang12 LSLo update (ranks 2;2;8,
   ``lslo.train.train_update``) of a random-weight model at the m2m124-615m shape (256,125 embedding rows) on
   4000 target tokens (the paper's --max-tokens 4000) under fp16 AMP with fairseq's GradScaler, once per training
   loss (``train.loss``: plain, the full logits; chunked, the memory-lean one), each in a fresh process:
   torch.cuda.max_memory_allocated and the median update time; the chunked / plain ratios against their targets
   (<= 0.6 x memory, <= 1.1 x time) and whether the plain update fits a 24 GB GPU. --cpu-smoke: the tiny shape
   on the CPU, 128 target tokens. A loss the checkout does not offer is reported, not failed.
4. ``benchmarks/bench.py`` at the m2m124-615m shape with random weights under bf16 autocast: training steps of
   floor, PEFT, LSLo one-direction, LSLo mixed-12 (every kernel) and full fine-tuning (ms, tokens/s,
   torch.cuda.max_memory_allocated per system, ratios to PEFT, floor and full fine-tuning) and mixed beam-5
   decoding against PEFT ``adapter_names``, with the targets. --cpu-smoke: the tiny shape, one repetition.

The summary table is printed and written, with each step's own report, to the output (default
benchmarks/RESULTS-gpu.md; with --cpu-smoke nothing is written unless --out is given). Every number in it comes
from this run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "workflow", "config", "profiles"]
DDP_VARIANT = "ft-all"  # the smoke config's full fine-tuning: the shortest training job of the workflow
DDP_RULE = "finetune_full"  # the rule that trains a full fine-tuning variant
BUDGET_S = {"gpu": 480, "cpu-smoke": 600}  # whole script; the issue allows 8 minutes on one GPU
STEP_LIMIT_S = {"tests": 150, "ddp": 200, "loss": 150}  # the benchmark, run last, gets what is left of the budget
LOSSES = ("plain", "chunked")  # train.loss, old and new
LOSS_TARGETS = {"memory": 0.6, "time": 1.1}  # chunked / plain
PAPER_GPU_BYTES = 24 * 10**9  # "24 GB": the paper's batch on a 24 GB GPU


@dataclass
class Step:
    name: str
    status: str = "not run"  # PASS, FAIL, TIMEOUT; SKIP (CUDA tests without CUDA); MISS, RAN (benchmark)
    seconds: float = 0.0
    rows: list = field(default_factory=list)  # (check, result, detail) rows of the summary table
    report: str = ""  # markdown appended below the summary


def run(cmd: list, timeout: float, cwd=REPO) -> tuple[int | None, str, float]:
    """(exit status, or None when out of time, stdout + stderr, seconds). Out of time, the command's whole process
    group is killed (Snakemake's jobs and torchrun's workers included)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.perf_counter() - start


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---- 1. CUDA tests ----------------------------------------------------------------------------------------
def junit_counts(xml_path: Path) -> dict:
    """{"passed", "failed", "skipped", "amp": outcome of the GradScaler-overflow tests} from pytest's junit XML."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "amp": []}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        counts[outcome] += 1
        if "gradscaler_overflow" in case.get("name", ""):
            counts["amp"].append(f"{case.get('name').split('[')[-1].rstrip(']')} {outcome}")
    return counts


def cuda_tests(args, timeout: float) -> Step:
    step = Step("cuda tests")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda.xml"
        code, out, step.seconds = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                       "tests/test_precision.py", "tests/test_train_amp.py", f"--junitxml={xml}"],
                                      timeout)
        if code is None or not xml.exists():
            step.status = "TIMEOUT" if code is None else "FAIL"
            step.rows.append(("pytest -m cuda", step.status, "no result"))
            step.report = f"```\n{tail(out)}\n```"
            return step
        counts = junit_counts(xml)
    if counts["failed"] or code not in (0, 5):  # 5: nothing collected
        step.status = "FAIL"
    elif counts["passed"] == 0:
        step.status = "SKIP"  # no CUDA: every variant skipped
    else:
        step.status = "PASS"
    step.rows.append(("pytest -m cuda: kernels, merged decoding (fp32, bf16, fp16 autocast)", step.status,
                      f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"))
    step.rows.append(("AMP update with a forced GradScaler overflow keeps the weights", step.status,
                      ", ".join(counts["amp"]) or "not collected"))
    step.report = f"pytest output (last lines):\n\n```\n{tail(out, 15)}\n```"
    return step


# ---- 2. benchmark ------------------------------------------------------------------------------------------
TARGET_ROW = re.compile(r"^\| (?P<label>[^|]+?) \| (?P<ratio>[\d.]+) \| (?P<bound>[<>]= [\d.]+) "
                        r"\| (?P<verdict>PASS|MISS) \|$", re.M)
TRAIN_ROW = re.compile(r"^\| (?P<name>floor|peft|lslo_\w+|full) \| (?P<ms>[\d.]+) \| (?P<x_peft>[\d.]+) \| "
                       r"(?P<x_floor>[\d.]+) \| (?P<x_full>[\d.]+) \| (?P<tps>\d+) \| (?P<mb>[\d-]+) \|$", re.M)


def bench_args(args) -> list:
    """The GPU run: the m2m124-615m shape, lang12's per-GPU training budget (4096 tokens), bf16 autocast as
    lslo.train on GPUs; peak memory of the issue's five training systems. --cpu-smoke: the tiny shape, one
    repetition, no memory subprocesses."""
    common = ["--amp", "bf16", "--no-sweep", "--no-directions"]
    if args.cpu_smoke:
        return ["--shape", "tiny", "--steps", "1", "--warmup", "0", "--decode-steps", "1", "--sweep-steps", "1",
                "--batch-tokens", "128", "--decode-sentences", "4", "--new-tokens", "2", "--no-memory", *common]
    return ["--shape", "m2m124-615m", "--batch-tokens", "4096", "--steps", "6", "--warmup", "2",
            "--decode-steps", "3", "--sweep-steps", "3", "--memory-kinds", "train",
            "--memory-systems", "floor,peft,lslo_one,lslo_mixed,full", *common]


def benchmark(args, timeout: float) -> Step:
    step = Step("benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        out_md = Path(tmp) / "bench.md"
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), *bench_args(args), "--out", str(out_md)]
        code, out, step.seconds = run(cmd, timeout)
        report = out_md.read_text(encoding="utf-8") if out_md.exists() else ""
    if code != 0 or not report:
        step.status = "TIMEOUT" if code is None else "FAIL"
        step.rows.append(("bench.py " + " ".join(bench_args(args)), step.status, "no report"))
        step.report = f"```\n{tail(out)}\n```"
        return step
    targets = list(TARGET_ROW.finditer(report))
    # A missed performance target is a result, not a failure of the check; at --cpu-smoke's tiny shape the
    # verdicts mean nothing, so the step only has to produce its report.
    step.status = ("RAN" if args.cpu_smoke else
                   "PASS" if targets and all(t["verdict"] == "PASS" for t in targets) else "MISS")
    shape = re.search(r"^### Shape `([^`]+)`", report, re.M)
    for row in TRAIN_ROW.finditer(report):
        step.rows.append((f"train step {row['name']} ({shape[1] if shape else '?'})", f"{row['ms']} ms",
                          f"{row['tps']} tokens/s, peak {row['mb']} MB, x PEFT {row['x_peft']}, "
                          f"x floor {row['x_floor']}, x full {row['x_full']}"))
    for t in targets:
        step.rows.append((f"target: {t['label']}", t["verdict"], f"{t['ratio']} {t['bound']}"))
    step.report = report.split("\nDefinitions\n")[0].split("\n", 2)[-1]  # without its title and definitions
    return step


# ---- the training loss's memory --------------------------------------------------------------------------------
def loss_step_args(args, loss: str) -> list:
    """scale.py's one-update measurement: the 615M shape, 4000 target tokens, fp16 AMP on the GPU; --cpu-smoke:
    the tiny shape on the CPU (autocast is CUDA-only in lslo.train, so fp32 there)."""
    if args.cpu_smoke:
        return ["--step-of", loss, "--shape", "tiny", "--device", "cpu", "--target-tokens", "128", "--updates", "1",
                "--threads", "1"]
    return ["--step-of", loss, "--shape", "m2m124-615m", "--device", "cuda", "--amp", "fp16", "--target-tokens",
            "4000", "--updates", "3"]


def loss_memory(args, timeout: float) -> Step:
    import json

    step = Step("loss memory")
    start, results, absent, rows = time.perf_counter(), {}, [], {}
    for loss in LOSSES:
        cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), *loss_step_args(args, loss)]
        code, out, _ = run(cmd, timeout - (time.perf_counter() - start))
        if code == 0:
            results[loss] = json.loads(out.strip().splitlines()[-1])
        elif code is not None and "has no `loss` option" in out:
            absent.append(loss)
            rows[loss] = (f"train update, {loss} loss", "ABSENT", "train.loss is not an option of lslo.train in "
                          "this checkout")
        else:
            step.status = "TIMEOUT" if code is None else "FAIL"
            rows[loss] = (f"train update, {loss} loss", step.status, "no result")
            step.report += f"```\n{' '.join(cmd)}\n{tail(out)}\n```\n"
    step.seconds = time.perf_counter() - start
    for loss, r in results.items():
        rows[loss] = (f"train update, {loss} loss ({'tiny' if args.cpu_smoke else 'm2m124-615m'}, "
                      f"{r['target_tokens']} target tokens, {r['amp']})", f"{r['median_s'] * 1000:.0f} ms",
                      f"peak {r['peak_mb']:.0f} MiB ({r['how']}), {r['step_peak_mb']:.0f} MiB above the model "
                      f"and Adam state; {r['sentences']} sentences")
    step.rows += [rows[loss] for loss in LOSSES if loss in rows]
    if set(results) == set(LOSSES):
        p, c = results["plain"], results["chunked"]
        for label, value, bound in (("peak memory", c["peak_mb"] / p["peak_mb"], LOSS_TARGETS["memory"]),
                                    ("update time", c["median_s"] / p["median_s"], LOSS_TARGETS["time"])):
            verdict = "PASS" if value <= bound else "MISS"
            step.rows.append((f"target: chunked / plain {label}", verdict, f"{value:.3f} <= {bound}"))
    if "plain" in results and not args.cpu_smoke:
        fits = results["plain"]["peak_mb"] * 2**20 <= PAPER_GPU_BYTES
        step.rows.append(("the paper's batch (4000 tokens, plain loss) fits a 24 GB GPU", "yes" if fits else "no",
                          f"peak {results['plain']['peak_mb'] * 2**20 / 1e9:.1f} GB"))
    if step.status == "not run":
        step.status = "RAN" if args.cpu_smoke or absent else (
            "PASS" if all(r[1] == "PASS" for r in step.rows if r[0].startswith("target: ")) else "MISS")
    return step


# ---- 3. DDP through the workflow ----------------------------------------------------------------------------
def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def world_sizes(log_text: str) -> list:
    """World sizes that lslo.train logged ("training: world size N, rank R, ...")."""
    return [int(n) for n in re.findall(r"training: world size (\d+), rank \d+", log_text)]


def scheduled_gpus(dry_run: str, rule: str) -> list:
    """gpu=N of each job of ``rule`` in a Snakemake dry run's job listing."""
    jobs = re.findall(rf"^(?:local)?rule {rule}:\n(?:    .*\n)*?    resources: (.*)$", dry_run, flags=re.M)
    return [int(m[1]) for resources in jobs for m in [re.search(r"(?:^|, )gpu=(\d+)", resources)] if m]


def ddp(args, timeout: float) -> Step:
    n = args.processes or max(gpu_count(), 1)
    step = Step("ddp")
    target = f"results/finetune/{DDP_VARIANT}/variant.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in WORKFLOW_FILES:
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
        shutil.copy(REPO / "tests" / "data" / "smoke.yaml", work / "config" / "smoke.yaml")
        cmd = [sys.executable, "-m", "snakemake", "--configfile", "config/smoke.yaml", "--cores", str(max(n, 2)),
               "--resources", f"gpu={n}", "--set-resources", f"{DDP_RULE}:gpu={n}", "--show-failed-logs", target]
        if args.cpu_smoke and not args.ddp_run:
            code, out, step.seconds = run([*cmd, "-n"], timeout, cwd=work)
            gpus = scheduled_gpus(out, DDP_RULE)
            step.status = "PASS" if code == 0 and gpus == [n] else "FAIL"
            step.rows.append((f"{DDP_RULE} rule scheduled with --set-resources {DDP_RULE}:gpu={n} (dry run)",
                              step.status, f"gpu per finetune job: {gpus}"))
            step.report = f"```\n{' '.join(cmd)} -n\n```"
            return step
        code, out, step.seconds = run(cmd, timeout, cwd=work)
        log_path = work / "logs" / "finetune" / f"{DDP_VARIANT}.log"
        log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
        sizes = world_sizes(log_text)
        bench = work / "results" / "benchmarks" / "finetune" / f"{DDP_VARIANT}.tsv"
        job_s = bench.read_text().splitlines()[1].split("\t")[0] if bench.exists() else "?"
    step.status = ("TIMEOUT" if code is None else "PASS" if code == 0 and sizes and set(sizes) == {n} else "FAIL")
    step.rows.append((f"DDP: {DDP_RULE} rule, --set-resources {DDP_RULE}:gpu={n}", step.status,
                      f"world size logged: {sorted(set(sizes)) or 'none'} (expected {n}); job {job_s} s"))
    step.report = (f"```\n{' '.join(cmd)}\n```\n\nfinetune log (last lines):\n\n```\n{tail(log_text, 12)}\n```"
                   + ("" if step.status == "PASS" else f"\n\nsnakemake (last lines):\n\n```\n{tail(out)}\n```"))
    return step


# ---- report --------------------------------------------------------------------------------------------------
def machine() -> str:
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    if torch.cuda.is_available():
        info["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["git"] = out.stdout.strip() or "unknown"
    return "; ".join(f"{k} {v}" for k, v in info.items())


def summary_table(steps: list) -> str:
    lines = ["| step | check | result | detail |", "|---|---|---|---|"]
    for step in steps:
        lines += [f"| {step.name} | {check} | {result} | {detail} |" for check, result, detail in step.rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="One prepared GPU check of lslo (see the module docstring).")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: tiny shape, one repetition, DDP as a dry run")
    p.add_argument("--out", default=None, help="markdown (default benchmarks/RESULTS-gpu.md; none with --cpu-smoke)")
    p.add_argument("--processes", type=int, default=0, help="DDP processes (default: every GPU present, 1 on CPU)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 480; smoke 600)")
    p.add_argument("--ddp-run", action="store_true",
                   help="with --cpu-smoke: run the DDP step for real (gloo on CPU; minutes) instead of a dry run")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: tests, loss, bench, ddp")
    args = p.parse_args(argv)
    if args.out is None and not args.cpu_smoke:
        args.out = str(REPO / "benchmarks" / "RESULTS-gpu.md")
    if args.budget is None:
        args.budget = BUDGET_S["cpu-smoke" if args.cpu_smoke else "gpu"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and gpu_count() == 0:
        print("gpu_check: no CUDA device; run with --cpu-smoke to check the script on a CPU", file=sys.stderr)
        return 2
    start, skip, steps = time.perf_counter(), set(args.skip.split(",")) - {""}, []
    left = lambda: args.budget - (time.perf_counter() - start)
    if "tests" not in skip:
        steps.append(cuda_tests(args, min(STEP_LIMIT_S["tests"], left())))
    if "ddp" not in skip:
        steps.append(ddp(args, min(STEP_LIMIT_S["ddp"], left())))
    if "loss" not in skip:
        steps.append(loss_memory(args, min(STEP_LIMIT_S["loss"], left())))
    if "bench" not in skip:
        steps.append(benchmark(args, left()))
    table = summary_table(steps)
    mode = ("GPU" if not args.cpu_smoke else
            f"no GPU: tiny shape, DDP {'on CPU (gloo)' if args.ddp_run else 'as a dry run'}")
    total = time.perf_counter() - start
    header = ["# lslo GPU check", "", f"Written by `benchmarks/gpu_check.sh {' '.join(argv or sys.argv[1:])}` "
              f"({mode}) in {total:.0f} s. Every number below was measured by that run.", "",
              "Machine: " + machine(), ""]
    print(table)
    if args.out:
        from lslo.io import atomic_write

        sections = [f"## {s.name} ({s.status}, {s.seconds:.0f} s)\n\n{s.report}\n" for s in steps]
        with atomic_write(args.out) as tmp:
            tmp.write_text("\n".join(header + [table, ""] + sections), encoding="utf-8")
    return 0 if all(s.status in ("PASS", "MISS", "RAN", "SKIP" if args.cpu_smoke else "PASS") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
