"""Config `seeds`: every trained variant fine-tuned and evaluated once per seed, on the real workflow.

One module-scoped run of a tiny demo config (tests/data/smoke.yaml cut to Pretrain and one LSLo variant with a
learned index plan, one decoding shard): first with `seeds: null`, then with `seeds: [1, 2]`. The tests check that
adding a seed runs that seed's jobs only, that Table 1 reports the mean of the two runs with their spread and the
training hours of the benchmark files, that a third seed adds only its own jobs, that removing a seed deletes
nothing and keeps the one-seed run's results valid, and that a bad `seeds` stops with one line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_workflow import ROOT, copy_workflow, snakemake

pytestmark = pytest.mark.smoke

LSLO = "lslo-wl"  # learned index plan: its training cost includes the weight learning
LABEL = "2;2;8+WL"
TARGETS = ["results/tables/table1.md", "results/figures/figure3.png"]
ONE_THREAD = ["--set-threads", *[f"{rule}={1}" for rule in ("demo_pretrain", "weight_learning", "finetune",
                                                              "finetune_pretrain", "decode")]]
RUN_RULES = {"finetune", "finetune_pretrain", "decoding_options", "decode", "score"}  # one job per run
AGGREGATES = {"table", "figure3"}


def seeds_config(seeds) -> dict:
    config = yaml.safe_load((ROOT / "tests/data/smoke.yaml").read_text())
    config["eval"]["shards"] = 1
    config["demo"]["pretrain_steps"] = 400  # a base that translates a little: spBLEU above 0, seeds that differ
    config["variants"] = {
        "pretrain": {"label": "Pretrain", "method": "pretrain"},
        LSLO: {"label": LABEL, "method": "lslo", "ranks": {"H": 2, "M": 2, "V": 8}, "index": "learned",
               "modules": "all", "gps": None},
    }
    config["tables"] = {"table1": ["pretrain", LSLO]}
    config["figure3"] = ["pretrain", LSLO]
    config["seeds"] = seeds
    return config


def run(workdir: Path, config: dict, *args):
    (workdir / "config/seeds.yaml").write_text(yaml.safe_dump(config))
    return snakemake(workdir, *args, "--configfile", "config/seeds.yaml", "--cores", "2", *ONE_THREAD,
                     "--show-failed-logs", *TARGETS)


def jobs(output: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a (dry) run lists; wildcards "" for a job without any."""
    found = set()
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", output, flags=re.M):
        wildcards = re.search(r"^    wildcards: (.*)$", body, flags=re.M)
        found.add((rule, wildcards.group(1) if wildcards else ""))
    return found


def run_jobs(run: str, trains: bool = True) -> set[tuple[str, str]]:
    """The jobs of one run (one decoding shard)."""
    return {("finetune" if trains else "finetune_pretrain", f"variant={run}"),
            ("decoding_options", f"variant={run}"), ("decode", f"variant={run}, shard=0"),
            ("score", f"variant={run}")}


def files_of(workdir: Path, run: str) -> dict:
    """mtime of every file a run owns."""
    paths = [p for folder in (f"results/finetune/{run}", f"results/evaluate/{run}")
             for p in (workdir / folder).rglob("*") if p.is_file()]
    paths.append(workdir / f"results/benchmarks/finetune/{run}.tsv")
    return {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """(workdir, dry run of adding seed 2 to a finished one-seed run, the one-seed run's files before it)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("seeds") / "wf")
    run(workdir, seeds_config(None))
    one_seed = files_of(workdir, LSLO)
    added = run(workdir, seeds_config([1, 2]), "-n").stdout
    run(workdir, seeds_config([1, 2]))
    return workdir, added, one_seed


def test_adding_a_seed_runs_only_that_seeds_jobs(seeded):
    workdir, added, one_seed = seeded
    # the seed-1 run keeps the variant's name and options: its results stay valid, and are not rewritten
    assert jobs(added) == run_jobs(f"{LSLO}.seed2") | {("table", "table=table1"), ("figure3", "")}
    assert files_of(workdir, LSLO) == one_seed


def test_table1_reports_the_seed_mean_with_its_spread_and_the_training_hours(seeded):
    workdir = seeded[0]
    table = pd.read_csv(workdir / "results/tables/table1.tsv", sep="\t").set_index("method")
    runs = {run: pd.read_csv(workdir / f"results/evaluate/{run}/groups.tsv", sep="\t").set_index("pair")
            for run in (LSLO, f"{LSLO}.seed2", "pretrain")}
    avg = [runs[run].loc["AVG", "spbleu"] for run in (LSLO, f"{LSLO}.seed2")]
    assert avg[0] != avg[1]  # two seeds, two fine-tunings
    assert table.loc[LABEL, "seeds"] == 2 and table.loc["Pretrain", "seeds"] == 1
    assert table.loc[LABEL, "AVG"] == pytest.approx(sum(avg) / 2, abs=0.005)
    assert table.loc["Pretrain", "AVG"] == pytest.approx(runs["pretrain"].loc["AVG", "spbleu"], abs=0.005)
    md = (workdir / "results/tables/table1.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {LABEL} "))
    assert f"{sum(avg) / 2:.2f} ({min(avg):.2f}–{max(avg):.2f})" in row  # the mean and the two seeds' range
    # hours: the mean over the seeds of (weight learning + that seed's fine-tuning), from the benchmark files
    seconds = {name: pd.read_csv(workdir / f"results/benchmarks/{name}.tsv", sep="\t")["s"].mean()
               for name in ("weight_learning", f"finetune/{LSLO}", f"finetune/{LSLO}.seed2")}
    hours = (seconds["weight_learning"] + (seconds[f"finetune/{LSLO}"] + seconds[f"finetune/{LSLO}.seed2"]) / 2) / 3600
    assert table.loc[LABEL, "train_hours"] == pytest.approx(hours, abs=6e-5)  # written at 4 decimals
    assert pd.isna(table.loc["Pretrain", "train_hours"])  # nothing trained
    # two trainings from two seeds: every adapter tensor differs (the A init comes from the seed)
    from lslo.adapters import read_adapters

    first, second = (read_adapters(workdir / f"results/finetune/{run}/adapters.safetensors")[0]
                     for run in (LSLO, f"{LSLO}.seed2"))
    assert first.keys() == second.keys() and not any(first[k].equal(second[k]) for k in first)


def test_a_third_seed_adds_only_its_own_jobs(seeded):
    workdir = seeded[0]
    # as `make demo SEEDS=3` gives it: snakemake --config reads the list's items as strings
    out = run(workdir, seeds_config([1, 2]), "-n", "--config", "seeds=[1, 2, 3]").stdout
    assert jobs(out) == run_jobs(f"{LSLO}.seed3") | {("table", "table=table1"), ("figure3", "")}


def test_removing_a_seed_deletes_nothing_and_trains_nothing(seeded, tmp_path):
    workdir = shutil.copytree(seeded[0], tmp_path / "wf", symlinks=True)  # mtimes kept
    second = files_of(workdir, f"{LSLO}.seed2")
    out = run(workdir, seeds_config([1])).stderr  # a run reports its jobs on stderr, a dry run on stdout
    assert {rule for rule, _ in jobs(out)} == AGGREGATES  # the table and figure over one run; no training
    assert files_of(workdir, f"{LSLO}.seed2") == second  # the removed seed's run is still there, untouched
    table = pd.read_csv(workdir / "results/tables/table1.tsv", sep="\t").set_index("method")
    assert "seeds" not in table.columns
    groups = pd.read_csv(workdir / f"results/evaluate/{LSLO}/groups.tsv", sep="\t").set_index("pair")
    assert table.loc[LABEL, "AVG"] == pytest.approx(groups.loc["AVG", "spbleu"], abs=0.005)
    # seeds [1] is the one-seed run of seeds null: the same jobs, the same params
    assert "Nothing to be done" in run(workdir, seeds_config(None), "-n").stdout


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(seeds=[1, 2, 1]), "config key 'seeds': 1 listed more than once"),
    (lambda c: c["variants"][LSLO].update(train={"seed": 3}), f"config key 'variants.{LSLO}.train.seed'"),
    (lambda c: c["variants"].update({f"{LSLO}.seed2": {**c["variants"][LSLO], "label": "other"}}),
     f"seed 2 of variant '{LSLO}' is the run '{LSLO}.seed2', which is also a declared variant"),
], ids=["seed-twice", "variant-own-seed", "run-name-taken"])
def test_a_bad_seeds_config_stops_with_one_line(tmp_path, change, message):
    workdir = copy_workflow(tmp_path)
    config = seeds_config([1, 2])
    change(config)
    (workdir / "config/seeds.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workdir, "-n", "--configfile", "config/seeds.yaml", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
