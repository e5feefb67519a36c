"""The Snakemake workflow: lint, dry runs of the demo and the paper setups, the SLURM profile's GPU requests,
params-triggered reruns, and (once every library stage exists) a real smoke run on a tiny config.

Each test runs snakemake from the venv in a temporary copy of the workflow, so the repository's results/ and
.snakemake/ are never touched.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from shared_runs import copy_run

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
WORKFLOW_FILES = ["Snakefile", "rules", "workflow", "config", "profiles"]
GPU_RULES = {"demo_pretrain", "weight_learning", "subspace", "finetune", "finetune_full", "decode"}
FINETUNE_RULES = {"lslo": "finetune", "full": "finetune_full", "pretrain": "finetune_pretrain"}
ALLOWED_LINTS = {  # the workflow runs in the environment that has lslo installed (pyproject / environment.yml)
    "Specify a conda environment or container for each rule.",
}


def copy_workflow(dst: Path) -> Path:
    """The workflow's files (Snakefile, rules, scripts, configs, profiles) copied into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)
    return dst


def materialise(workdir: Path, *check_args) -> None:
    """Every output of the workflow as an empty file (a directory for directory outputs), with the metadata of
    every job (--touch), so that a dry run shows exactly what a change reruns."""
    summary = snakemake(workdir, "--summary").stdout.splitlines()[1:]
    for path in (line.split("\t")[0] for line in summary if line.strip()):
        target = workdir / path
        if target.suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        else:
            target.mkdir(parents=True, exist_ok=True)
    snakemake(workdir, "--touch", "--forceall", "--cores", "1")
    assert "Nothing to be done" in snakemake(workdir, "-n", *check_args).stdout


@pytest.fixture
def workdir(tmp_path):
    return copy_workflow(tmp_path)


def snakemake(workdir, *args, check=True, env=None):
    proc = subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def finetune_counts(variants: dict) -> dict:
    """The finetune jobs of a config's variants: one rule per method."""
    counts = {}
    for spec in variants.values():
        counts[FINETUNE_RULES[spec["method"]]] = counts.get(FINETUNE_RULES[spec["method"]], 0) + 1
    return counts


def job_counts(output: str) -> dict:
    """The "Job stats" table of a (dry) run: rule -> number of jobs."""
    counts, table = {}, output.split("Job stats:", 1)[1].splitlines()
    for line in table[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def paper_paths(tmp_path) -> list:
    """Stand-ins for the three paths a paper config must set: a FLORES-101 root with a one-sentence file per table
    language and split, and an empty spm file (the DAG reads their content, not what it means), and a tiny random
    checkpoint with every table language (the pre-check reads it)."""
    from model_dirs import make_m2m100_model_dir

    from lslo.languages import read_language_table

    flores, model, spm = tmp_path / "flores101", tmp_path / "m2m124", tmp_path / "spm.model"
    table = read_language_table(ROOT / "config/languages.tsv")
    for split in ("dev", "devtest"):
        (flores / split).mkdir(parents=True)
        for code in table["flores101"]:
            (flores / split / f"{code}.{split}").write_text(f"{code} {split}\n", encoding="utf-8")
    make_m2m100_model_dir(model, table["code"].tolist())
    spm.write_text("")
    return ["--config", f"model={model}", f"data={{flores: {flores}}}", f"eval={{spm: {spm}}}"]


def test_lint_reports_only_the_conda_hint(workdir):
    proc = snakemake(workdir, "--lint", check=False)
    titles = set(re.findall(r"^    \* (.+?):$", proc.stdout + proc.stderr, flags=re.M))
    assert titles <= ALLOWED_LINTS, titles - ALLOWED_LINTS


def test_demo_dry_run_lists_every_stage(workdir):
    counts = job_counts(snakemake(workdir, "-n").stdout)
    demo = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    n_variants, n_lslo = len(demo["variants"]), sum(v["method"] == "lslo" for v in demo["variants"].values())
    assert counts == {
        "demo_benchmark": 1, "demo_pretrain": 1, "data": 1, "test_set": 1, "dev_set": 1, "weight_learning": 1,
        "subspace": 2, "ranks": n_lslo, **finetune_counts(demo["variants"]), "decoding_options": n_variants,
        "decode": n_variants * demo["eval"]["shards"],
        "score": n_variants, "figure1": 1, "figure3": 1, "score_figure": 4, "table": len(demo["tables"]),
        "score_table": 2, "all": 1, **({"summary": 1} if demo.get("summary") else {}),
    }


def test_lang12_dry_run_covers_the_paper(workdir, tmp_path):
    from lslo.data import directions
    from lslo.evaluate import shard_directions
    from lslo.languages import read_language_table, select

    out = snakemake(workdir, "-n", "--configfile", "config/lang12.yaml", *paper_paths(tmp_path)).stdout
    counts = job_counts(out)
    lang12 = yaml.safe_load((ROOT / "config/lang12.yaml").read_text())
    variants, shards = lang12["variants"], lang12["eval"]["shards"]
    assert "demo_benchmark" not in counts and "demo_pretrain" not in counts
    assert counts["weight_learning"] == 1 and counts["subspace"] == 2
    assert counts["ranks"] == sum(v["method"] == "lslo" for v in variants.values())
    assert {rule: counts.get(rule) for rule in FINETUNE_RULES.values() if rule in counts} == finetune_counts(variants)
    assert counts["score"] == len(variants)
    assert counts["decode"] == len(variants) * shards
    assert counts["table"] == 4 and counts["score_table"] == 2  # Tables 1, 3, 4, 8 and 9, 10
    for vid in variants:
        assert f"results/evaluate/{vid}/groups.tsv" in out
    # Figure 3's variants score the whole devtest each epoch (dev_sentences null), the rest its first 50 sentences
    assert counts["dev_set"] == 2 and "output: results/data/dev/all.tsv" in out
    # Table 3 (index strategies) reads the learned plan for its note; Table 1 does not
    table_inputs = dict((output.split(",")[0], inputs) for inputs, output in re.findall(
        r"^    input: (.*)\n    output: (results/tables/table\d\.tsv.*)$", out, flags=re.M))
    assert "results/weight_learning/plan.json" in table_inputs["results/tables/table3.tsv"]
    assert "results/weight_learning/plan.json" not in table_inputs["results/tables/table1.tsv"]
    # the decode jobs of one variant cover the 132 lang12 directions exactly once
    table = read_language_table(ROOT / "config/languages.tsv")
    all_directions = directions(select(table, "lang12"))
    parts = shard_directions(all_directions, shards)
    assert len(all_directions) == 132 and all(parts)
    assert sorted(d for part in parts for d in part) == sorted(all_directions)


def test_lang30_dry_run_builds_table2(workdir, tmp_path):
    counts = job_counts(snakemake(workdir, "-n", "--configfile", "config/lang30.yaml", *paper_paths(tmp_path)).stdout)
    assert counts["table"] == 1 and sum(counts.get(rule, 0) for rule in FINETUNE_RULES.values()) == 5


def test_unset_paths_stop_with_one_line(workdir):
    proc = snakemake(workdir, "-n", "--configfile", "config/lang12.yaml", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config key 'data.flores' is not set"), proc.stderr


def test_slurm_profile_requests_gpus_for_training_and_decoding_only(workdir):
    out = snakemake(workdir, "-n", "--profile", "profiles/slurm").stdout
    gpu_by_rule = {}
    for rule, resources in re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", out, flags=re.M):
        gpu_by_rule.setdefault(rule, set()).add("gpu=1" in resources.split(", "))
    assert {r for r, flags in gpu_by_rule.items() if True in flags} == GPU_RULES - {"all"}
    assert all(flags == {False} for r, flags in gpu_by_rule.items() if r not in GPU_RULES)
    # what the executor plugin makes of a job's resources: gpu=1 -> --gpus=1, with gpu_model -> --gpus=a100:1
    set_gres_string = pytest.importorskip("snakemake_executor_plugin_slurm.utils").set_gres_string

    class Job:
        def __init__(self, **resources):
            self.resources = type("Resources", (dict,), {"__getattr__": dict.get})(resources)

    assert set_gres_string(Job(gpu=1)).strip() == "--gpus=1"
    assert set_gres_string(Job(gpu=1, gpu_model="a100")).strip() == "--gpus=a100:1"
    assert set_gres_string(Job()).strip() == ""


def test_changing_one_gps_ratio_or_scope_reruns_only_that_variant(demo_materialised, tmp_path):
    # a copy of the materialised demo (conftest.py): each change below is a dry run against the same finished results
    workdir = copy_run(demo_materialised, tmp_path / "wf")
    for key, value in [("ratio", 0.5), ("pool", "language"), ("matrices", ["B"])]:
        config = yaml.safe_load((workdir / "config/config.yaml").read_text())
        config["variants"]["lslo-2-2-8-wl-gps0.9"]["gps"][key] = value
        (workdir / "config/changed.yaml").write_text(yaml.safe_dump(config))  # keys re-ordered too: no effect
        out = snakemake(workdir, "-n", "--configfile", "config/changed.yaml").stdout
        assert job_counts(out) == {"ranks": 1, "finetune": 1, "decode": 2, "score": 1, "table": 1, "figure3": 1,
                                   "summary": 1, "all": 1}, key
        outputs = re.findall(r"^    output: (.*)$", out, flags=re.M)
        assert all("lslo-2-2-8-wl-gps0.9" in line or "results/tables/" in line or "results/figures/" in line
                   or line == "results/summary.md" for line in outputs), (key, outputs)


LIBRARY_STAGES = ["demo", "data", "weight_learning", "subspace", "ranks", "finetune", "evaluate", "figures"]


@pytest.mark.smoke
@pytest.mark.skipif(
    any(importlib.util.find_spec(f"lslo.{m}") is None for m in LIBRARY_STAGES),
    reason="library stages missing: " + ", ".join(
        m for m in LIBRARY_STAGES if importlib.util.find_spec(f"lslo.{m}") is None),
)
def test_smoke_run(smoke_world, tmp_path):
    # from a copy of the smoke config's demo world and data tables (conftest.py), which other test files share
    workdir = copy_run(smoke_world, tmp_path / "wf")
    assert (workdir / "config/smoke.yaml").read_bytes() == (ROOT / "tests/data/smoke.yaml").read_bytes()
    one_thread = [f"{rule}=1" for rule in sorted(GPU_RULES)]  # tiny models: two 1-thread jobs at a time
    snakemake(workdir, "--configfile", "config/smoke.yaml", "--cores", "2", "--set-threads", *one_thread,
              "--show-failed-logs")
    results = workdir / "results"
    for i in range(1, 7):
        assert (results / f"figures/figure{i}.png").stat().st_size > 0
    for table in ("table1", "table9", "table10"):
        assert (results / f"tables/{table}.md").stat().st_size > 0
    groups = (results / "evaluate/lslo-auto-src-fc/groups.tsv").read_text().splitlines()
    assert groups[0].startswith("pair") and groups[-1].startswith("AVG")
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", "config/smoke.yaml").stdout
