"""The workflow's rerun and recovery promises, tried as a user would (README "Rerunning one stage", "When things go
wrong"): deleted artifacts, code changes, a results directory moved elsewhere, a SIGKILL mid-finetune, two
training processes in one job, the SLURM profile's submissions (a fake sbatch that records its arguments).

Dry-run tests use a workflow whose outputs are empty files with recorded metadata (`materialise`); the others
run the real workflow on a tiny demo config (tests/data/smoke.yaml cut to two variants).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from shared_runs import copy_run

from test_workflow import ROOT, SNAKEMAKE, copy_workflow, job_counts, snakemake

VARIANT = "lslo-src"  # the LSLo variant of the run config
# --set-threads takes several values: the options after it keep the targets apart
LOCAL = ["--profile", "profiles/local", "--configfile", "config/run.yaml",
         "--set-threads", "demo_pretrain=1", "finetune=1", "finetune_pretrain=1", "decode=1", "--cores", "2"]
ADAPTERS = f"results/finetune/{VARIANT}/adapters.safetensors"
GROUPS = f"results/evaluate/{VARIANT}/groups.tsv"


# ---------------------------------------------------------------------------------------------- dry runs

@pytest.fixture
def materialised(demo_materialised, tmp_path):
    """A fresh copy (mtimes kept) of the materialised demo workflow (conftest.py, shared with test_workflow.py)."""
    return copy_run(demo_materialised, tmp_path / "wf")


@pytest.mark.parametrize("variant, artifact, rule", [
    ("lslo-2-2-8-wl-gps0.9", "adapters.safetensors", "finetune"),
    ("ft-all", "model", "finetune_full"),
])
def test_a_deleted_artifact_reruns_its_finetune_and_dependents_only(materialised, variant, artifact, rule):
    path = materialised / "results/finetune" / variant / artifact
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    out = snakemake(materialised, "-n").stdout
    # the demo's summary reads every Table 1 variant's scores
    assert job_counts(out) == {rule: 1, "decode": 2, "score": 1, "table": 1, "figure3": 1, "summary": 1, "all": 1}
    outputs = re.findall(r"^    output: (.*)$", out, flags=re.M)
    assert all(variant in line or line.startswith(("results/tables/", "results/figures/", "results/summary.md"))
               for line in outputs)


def test_library_code_reruns_the_stages_that_run_it_and_a_touched_script_reruns_nothing(materialised):
    workdir = materialised
    shutil.copytree(ROOT / "lslo", workdir / "lslo")  # the workflow imports this copy (same bytes, same hashes)
    env = dict(os.environ, PYTHONPATH=str(workdir))
    assert "Nothing to be done" in snakemake(workdir, "-n", "--profile", "profiles/local", env=env).stdout
    for script in (workdir / "workflow/scripts").glob("*.py"):  # a checkout that rewrites the same bytes
        os.utime(script)
    assert "Nothing to be done" in snakemake(workdir, "-n", "--profile", "profiles/local", env=env).stdout
    # lslo.tables: the tables, the figures through lslo.figures, which re-exports its functions, and the summary
    tables = workdir / "lslo/tables.py"
    tables.write_text(tables.read_text() + "\n# a comment reruns nothing\n")
    assert "Nothing to be done" in snakemake(workdir, "-n", "--profile", "profiles/local", env=env).stdout
    tables.write_text(tables.read_text().replace("def ", "def _unused():\n    pass\n\n\ndef ", 1))  # new code
    out = snakemake(workdir, "-n", "--profile", "profiles/local", env=env).stdout
    demo = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert job_counts(out) == {"table": len(demo["tables"]), "score_table": 2, "score_figure": 4, "figure1": 1,
                               "figure3": 1, "summary": 1, "all": 1}
    assert "params" in out.split("Reasons:", 1)[1]


# ---------------------------------------------------------------------------------------------- real runs

def run_config() -> dict:
    config = yaml.safe_load((ROOT / "tests/data/smoke.yaml").read_text())
    # dropout 0: one and two processes see the same computation; tokens_per_update: the same effective batch
    config["train"].update(epochs=3, max_tokens=96, tokens_per_update=192, dropout=0.0, attention_dropout=0.0)
    config["variants"] = {
        "pretrain": {"label": "Pretrain", "method": "pretrain"},
        VARIANT: {"label": "2;2;8+SRC+GPS", "method": "lslo", "ranks": {"H": 2, "M": 2, "V": 8}, "index": "src",
                  "modules": "all", "gps": {"groups": ["H", "M"], "ratio": 0.5, "start": 0, "duration": 2}},
    }
    config["tables"] = {"table1": ["pretrain", VARIANT]}
    config["figure3"] = ["pretrain", VARIANT]
    return config


def even_epoch_size(workdir: Path, config: dict) -> int:
    """An epoch size whose batch count is even in every epoch: two processes then train on exactly the batches
    one process trains on (lslo.train.shard drops a remainder batch)."""
    from lslo.data import Corpus, read_parallel
    from lslo.languages import read_language_table, select
    from lslo.tokenizer import load_tokenizer
    from lslo.train import TrainOptions, epoch_plan

    codes = select(read_language_table(workdir / "results/demo/languages.tsv"), config["data"]["languages"])
    corpus = Corpus.multiparallel(read_parallel(workdir / "results/data/train.tsv", codes), codes,
                                  load_tokenizer(workdir / "results/demo/model"))
    for size in range(16, 64, 2):
        options = TrainOptions.from_dict({**config["train"], "max_epoch_examples": size})
        counts = [len(epoch_plan(corpus, options, epoch)) for epoch in range(1, options.epochs + 1)]
        if all(count % 2 == 0 and count >= 4 for count in counts):
            return size
    raise AssertionError("no epoch size gives an even batch count")


@pytest.fixture(scope="module")
def world(smoke_world, tmp_path_factory):
    """The demo world of the run config up to the finetune inputs (benchmark, tiny model, data, ranks): a copy of
    the smoke config's world (conftest.py; the run config has its demo and data settings), and the ranks."""
    workdir = copy_run(smoke_world, tmp_path_factory.mktemp("runs") / "world")
    config = run_config()
    config["train"]["max_epoch_examples"] = even_epoch_size(workdir, config)
    (workdir / "config/run.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir, *LOCAL, f"results/ranks/{VARIANT}.json", "results/data/test.tsv", "results/demo/spm.model")
    return workdir


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted single-process run of the LSLo variant, decoded and scored."""
    workdir = copy_run(world, tmp_path_factory.mktemp("runs") / "reference")
    snakemake(workdir, *LOCAL, GROUPS)
    return workdir


def test_a_results_copy_decodes_and_scores_where_it_is(reference, tmp_path):
    first = copy_run(reference, tmp_path / "first")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    for name in ("results", ".snakemake"):
        shutil.copytree(first / name, moved / name, symlinks=True)
    copy_workflow(moved)
    shutil.copy(first / "config/run.yaml", moved / "config/run.yaml")
    shutil.rmtree(first)  # nothing may be read from the old place
    assert "Nothing to be done" in snakemake(moved, *LOCAL, "-n", GROUPS).stdout
    (moved / GROUPS).unlink()
    snakemake(moved, *LOCAL, GROUPS, "--forcerun", "decode", "score")
    assert (moved / GROUPS).read_bytes() == (reference / GROUPS).read_bytes()
    old = str(first).encode()
    for path in (moved / "results").rglob("*"):  # stage files name each other by relative paths
        if path.is_file() and "checkpoints" not in path.parts:
            assert old not in path.read_bytes(), path


def test_sigkill_of_snakemake_mid_finetune_then_the_readme_recovery_ends_bit_identical(world, reference,
                                                                                      tmp_path):
    from lslo.checkpoint import last_checkpoint

    workdir = copy_run(world, tmp_path / "killed")
    checkpoints = workdir / "results/checkpoints/finetune" / VARIANT
    run = subprocess.Popen([SNAKEMAKE, *LOCAL, ADAPTERS], cwd=workdir, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while last_checkpoint(checkpoints) is None:
        assert run.poll() is None, run.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the finetune job never finished its first epoch"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # Snakemake and its job, as a node loss or `kill -9` would
    run.wait()
    run.stderr.close()
    assert not (workdir / ADAPTERS).exists()
    assert snakemake(workdir, *LOCAL, ADAPTERS, check=False).returncode != 0  # locked: README says --unlock

    snakemake(workdir, *LOCAL, "--unlock")  # the README's recovery commands
    snakemake(workdir, *LOCAL, ADAPTERS)
    assert "resumed from" in (workdir / f"logs/finetune/{VARIANT}.log").read_text()
    resumed, uninterrupted = load_file(workdir / ADAPTERS), load_file(reference / ADAPTERS)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
    metrics = f"results/finetune/{VARIANT}/metrics.tsv"
    assert (workdir / metrics).read_bytes() == (reference / metrics).read_bytes()


def test_gpu_2_trains_in_two_processes_with_the_weights_of_one(world, reference, tmp_path):
    workdir = copy_run(world, tmp_path / "two")
    snakemake(workdir, *LOCAL, ADAPTERS, "--set-resources", "finetune:gpu=2", "--resources", "gpu=2")
    log = (workdir / f"logs/finetune/{VARIANT}.log").read_text()
    assert "process 0 of 2" in log and "process 1 of 2" in log
    two, one = load_file(workdir / ADAPTERS), load_file(reference / ADAPTERS)
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------- SLURM profile

FAKE_SBATCH = """#!/bin/sh
echo "$@" >> "$SBATCH_LOG"
echo "sbatch: error: this is a test" >&2
exit 1
"""


def fake_slurm(tmp_path) -> dict:
    """PATH with an sbatch that records its arguments and fails (nothing runs), and silent sinfo/squeue/sacct."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    for name in ("sinfo", "squeue", "sacct", "sacctmgr", "sshare", "scontrol"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_LOG=str(tmp_path / "sbatch.log"))


def test_slurm_submissions_ask_for_gpus_for_training_and_decoding_only(materialised, tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    env = fake_slurm(tmp_path)
    targets = {  # each forced alone: none depends on another
        "finetune_pretrain": "results/finetune/pretrain/variant.json",
        "score": "results/evaluate/ft-all/groups.tsv",
        "finetune": "results/finetune/lslo-2-2-8-wl/adapters.safetensors",
        "decode": "results/evaluate/lslo-8-8-8-wl/hyps/0.tsv",
    }
    snakemake(materialised, "--profile", "profiles/slurm", "--force", *targets.values(), env=env, check=False)
    submitted = {}
    for line in Path(env["SBATCH_LOG"]).read_text().splitlines():
        rule = re.search(r"--allowed-rules (\w+)", line).group(1)
        submitted[rule] = line
    assert set(submitted) == set(targets)
    assert "--gpus=1" in submitted["finetune"] and "--gpus=1" in submitted["decode"]
    for rule in ("finetune_pretrain", "score"):  # CPU jobs on the cluster
        assert "--gpus" not in submitted[rule] and "--gres" not in submitted[rule]
    assert "-t 240 " in submitted["finetune_pretrain"] and "--mem 16000" in submitted["finetune_pretrain"]


def test_an_unedited_slurm_placeholder_stops_before_any_submission(materialised, tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    env = fake_slurm(tmp_path)
    profile = materialised / "profiles/slurm/config.yaml"
    profile.write_text(profile.read_text().replace('# slurm_account: "<your_account>"',
                                                   'slurm_account: "<your_account>"'))
    proc = snakemake(materialised, "--profile", "profiles/slurm", "--force", "results/evaluate/ft-all/groups.tsv",
                     env=env, check=False)
    assert proc.returncode != 0 and not Path(env["SBATCH_LOG"]).exists()
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "profile key 'default-resources: slurm_account' still holds the placeholder <your_account>: set it, or "
        "delete the line to use the cluster's default")
