"""The rehearsal (config `rehearse`, lslo.rehearsal): its options, the full run's update count against a hand count
and against the training loop itself, the projection arithmetic against hand computations, and a rehearsal of the
smoke config that writes only below results/rehearsal/ and leaves the real run to start from scratch."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import lslo.train
from lslo.config import validate_config
from lslo.data import Corpus
from lslo.errors import LsloError
from lslo.options import REHEARSAL_DIR, STOP_OPTION, RehearsalOptions
from lslo.rehearsal import (planned_updates, project_decoding, project_disk, project_training, projected_row,
                            seconds_per_update)
from lslo.train import BatchSource, TrainOptions, epoch_plan, training_epochs
from test_workflow import ROOT, copy_workflow, job_counts, paper_paths, snakemake

# ---------------------------------------------------------------------------------------------- options


def test_rehearse_values():
    assert RehearsalOptions.from_config(None) is None and RehearsalOptions.from_config(False) is None
    assert RehearsalOptions.from_config("false") is None
    assert RehearsalOptions.from_config(True) == RehearsalOptions.from_config("true") == RehearsalOptions(2, 2, 16)
    assert RehearsalOptions.from_config({"updates": 5}) == RehearsalOptions(5, 2, 16)
    for bad in ({"update": 5}, {"updates": 0}, {"updates": "5"}, 3, 0, 1):
        with pytest.raises(LsloError, match="rehearse"):
            RehearsalOptions.from_config(bad)


@pytest.mark.parametrize("value, message", [
    ({"updates": 0}, "config key 'rehearse.updates': 0 is less than the minimum of 1"),
    ({"update": 3}, "config key 'rehearse.update': unknown key"),
    ("yes", "config key 'rehearse': 'yes' does not match"),
])
def test_a_bad_rehearse_value_is_named_by_its_key(value, message):
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for good in (True, "true", False, {"updates": 3}):
        validate_config({**config, "rehearse": good}, ROOT / "config/schema.yaml")
    with pytest.raises(LsloError, match=re.escape(message)):
        validate_config({**config, "rehearse": value}, ROOT / "config/schema.yaml")


def test_the_cut_keeps_smaller_limits_and_the_batch_size():
    rehearsal = RehearsalOptions(updates=3, sentences=4, max_new_tokens=16)
    cut = rehearsal.train_options({"max_tokens": 4096, "epochs": 15, "dev_sentences": None})
    assert cut == {"max_tokens": 4096, "epochs": 15, "dev_sentences": 4, STOP_OPTION: 3}
    assert rehearsal.train_options({STOP_OPTION: 1, "dev_sentences": 0}) == {STOP_OPTION: 1, "dev_sentences": 0}
    assert rehearsal.train_options({})["dev_sentences"] == 4  # the library's 50, cut
    cut = rehearsal.eval_options({"max_sentences": None, "max_len_a": 1.2, "max_len_b": 200, "beam": 5})
    assert cut == {"max_sentences": 4, "max_len_a": 0.0, "max_len_b": 16, "beam": 5}


# ---------------------------------------------------------------------------------------------- the full run


def uniform_corpus(n_sentences: int, ids_per_sentence: int) -> Corpus:
    """Two directions whose every sentence has ids_per_sentence ids (+2 special tokens in a batch)."""
    sentences = [[5] * ids_per_sentence for _ in range(n_sentences)]
    return Corpus({("a", "b"): (sentences, sentences), ("b", "a"): (sentences, sentences)})


@pytest.mark.parametrize("limit, expected", [(None, (9, 3)), (7, (7, 3)), (6, (6, 2)), (1, (1, 1))])
def test_planned_updates_by_hand(limit, expected):
    # 10 sentences x 2 directions = 20 examples an epoch; 8 ids + 2 = 10 tokens, so 40 tokens hold 4 a batch: 5
    # batches, 2 to an update: ceil(5 / 2) = 3 updates an epoch, 9 in 3 epochs; a limit ends the epoch it falls in
    options = TrainOptions.from_dict({"max_tokens": 40, "update_freq": 2, "epochs": 3, STOP_OPTION: limit})
    assert planned_updates(uniform_corpus(10, 8), options) == expected


def test_stages_share_the_batch_counts_of_one_plan_only():
    corpus, cache = uniform_corpus(10, 8), {}
    # another lr, the same batches: counted once; another max_tokens (20: 2 a batch, 10 batches, 5 updates)
    assert planned_updates(corpus, TrainOptions.from_dict({"max_tokens": 40, "update_freq": 2, "epochs": 3}),
                           batches_cache=cache) == (9, 3)
    assert planned_updates(corpus, TrainOptions.from_dict({"max_tokens": 40, "update_freq": 2, "epochs": 3,
                                                           "lr": 1e-4}), batches_cache=cache) == (9, 3)
    assert len(cache) == 3
    assert planned_updates(corpus, TrainOptions.from_dict({"max_tokens": 20, "update_freq": 2, "epochs": 3}),
                           batches_cache=cache) == (15, 3)


@pytest.mark.parametrize("limit", [None, 5])
def test_planned_updates_are_the_training_loops(monkeypatch, limit):
    """On sampled, uneven data: the count equals the updates and epochs lslo.train.training_epochs runs."""
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 30, (40,), generator=rng).tolist()
    sentences = [[5] * n for n in lengths]
    corpus = Corpus({("a", "b"): (sentences, sentences[::-1]), ("b", "a"): (sentences[::-1], sentences),
                     ("a", "c"): (sentences[:25], sentences[:25])})
    options = TrainOptions.from_dict({"max_tokens": 100, "update_freq": 3, "epochs": 4, "temperature": 2.0,
                                      "max_epoch_examples": 70, STOP_OPTION: limit})
    monkeypatch.setattr(lslo.train, "update_step", lambda trainer, source, group, step: (0.0, 1))
    trainer = SimpleNamespace(options=options, model=torch.nn.Linear(1, 1), rank=0, world_size=1,
                              device=torch.device("cpu"), update_freq=options.update_freq)
    source = BatchSource(corpus, None, ["a", "b", "c"], lambda epoch: epoch_plan(corpus, options, epoch))
    epochs = list(training_epochs(trainer, source, range(1, options.epochs + 1)))
    assert planned_updates(corpus, options) == (epochs[-1].step, len(epochs))
    assert limit is None or epochs[-1].step == limit


def clock(**values) -> dict:
    return {"wall_s": 0.0, "updates_s": [], "epochs": 0, "dev_s": [], "dev_sentences": [], "decode_batches": [],
            "output_bytes": 0, "checkpoint_bytes": 0, **values}


def test_training_projection_by_hand():
    measured = clock(wall_s=100.0, updates_s=[5.0, 3.0, 3.0], epochs=1, dev_s=[4.0])
    assert seconds_per_update(measured) == 3.0  # the first update warms up
    # outside updates and dev: 100 - 11 - 4 = 85; 1000 updates x 3 s; 10 epochs' dev scoring x 4 s x 25
    assert project_training(measured, updates=1000, epochs=10, dev_scale=25.0) == pytest.approx(85 + 3000 + 1000)
    # the untrained base model: one dev scoring outside any epoch, in the rehearsal and in the full run
    base = clock(wall_s=10.0, dev_s=[2.0])
    assert project_training(base, updates=0, epochs=0, dev_scale=50.0) == pytest.approx(8 + 100)
    assert seconds_per_update(clock(updates_s=[7.0])) == 7.0
    # epoch checkpoints: 2 of 6 s in the rehearsal, one per epoch in the full run
    saving = clock(wall_s=100.0, updates_s=[5.0, 3.0, 3.0], epochs=2, dev_s=[4.0, 4.0], checkpoint_s=[6.0, 6.0])
    assert project_training(saving, updates=1000, epochs=10, dev_scale=1.0) == pytest.approx(
        (100 - 11 - 8 - 12) + 3000 + 10 * 4 + 10 * 6)


def test_decoding_projection_by_hand():
    batches = [{"s": 2.0, "sentences": 4, "max_new_tokens": 16, "longest_source": 40},
               {"s": 1.0, "sentences": 2, "max_new_tokens": 16, "longest_source": 10}]
    measured = clock(wall_s=20.0, decode_batches=batches)
    # batch 1 stopped at 16 of its 40 steps (2 s x 40/16 = 5 s), batch 2 ended at its 10 steps (1 s): 6 s for 2
    # sentences a direction; the full run decodes 1012, with max_len_b 200 (no cap below 40)
    assert project_decoding(measured, 1012 / 2, 0.0, 200) == pytest.approx(17 + 6 * 506)
    # a full-run cap of 0.5 x 40 + 4 = 24 steps for batch 1, 0.5 x 10 + 4 = 9 for batch 2
    assert project_decoding(measured, 1.0, 0.5, 4) == pytest.approx(17 + 2 * 24 / 16 + 1 * 9 / 10)


def test_a_training_row_projects_from_the_plan_and_refuses_to_guess_without_timed_updates():
    plan = {"kind": "train", "trains": True, "options": {"epochs": 10}, "dev_sentences": None,
            "rehearsed_dev_sentences": 2}
    measured = clock(rule="finetune", wildcards={"variant": "v"}, peak_rss_bytes=1, peak_gpu_bytes=None,
                     wall_s=100.0, updates_s=[5.0, 3.0, 3.0], epochs=1, dev_s=[4.0], output_bytes=1000,
                     checkpoint_bytes=600)
    row = projected_row(measured, plan, lambda options: (1000, 10), devtest_rows=50)
    # dev scoring on all 50 devtest sentences instead of 2: x 25
    assert row["time"] == pytest.approx(85 + 3000 + 10 * 4 * 25) and row["work"] == "1,000 updates, 10 epochs"
    assert row["rate"] == "3 s/update" and row["full_disk"] == 2200 and row["job"] == "finetune/v"
    # updates run in torchrun's processes are not seen by the job's clock: no time rather than a wrong one
    row = projected_row({**measured, "updates_s": []}, plan, lambda options: (1000, 10), devtest_rows=50)
    assert row["time"] is None and row["rate"].startswith("not timed")


def test_disk_projection_by_hand():
    # outputs as measured; one epoch checkpoint of 600 B -> the 2 newest of 15 epochs are kept
    assert project_disk(clock(output_bytes=1000, checkpoint_bytes=600, epochs=1), epochs=15) == 2200
    assert project_disk(clock(output_bytes=1000), scale=2.5) == 2500


# ---------------------------------------------------------------------------------------------- the workflow


def rehearsal_config() -> dict:
    """The smoke config cut to two variants and one decoding shard: every stage, a minute of jobs."""
    config = yaml.safe_load((ROOT / "tests/data/smoke.yaml").read_text())
    config["eval"]["shards"] = 1
    config["variants"] = {key: config["variants"][key] for key in ("pretrain", "lslo-2-2-8-wl-gps0.9")}
    config["tables"] = {"table1": list(config["variants"])}
    config["figure3"] = list(config["variants"])
    return config


def tree(root: Path) -> dict:
    """{path: (size, mtime)} of every file below root, Snakemake's own .snakemake/ left out."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and ".snakemake" not in p.relative_to(root).parts}


@pytest.mark.smoke
def test_a_rehearsal_reports_every_job_and_the_real_run_reuses_nothing(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "config/run.yaml").write_text(yaml.safe_dump(rehearsal_config()))
    real = ["--configfile", "config/run.yaml"]
    before_counts = job_counts(snakemake(workdir, "-n", *real).stdout)
    before = tree(workdir)

    snakemake(workdir, *real, "--config", "rehearse=true", "--cores", "2", "--show-failed-logs", "--set-threads",
              "demo_pretrain=1", "weight_learning=1", "subspace=1", "finetune=1", "finetune_pretrain=1", "decode=1")

    after = tree(workdir)
    written = sorted(path for path in after if before.get(path) != after[path])
    assert written and all(path.startswith(REHEARSAL_DIR + "/") for path in written), written
    assert set(before) <= set(after)  # nothing removed
    # Snakemake's records of outputs (.snakemake/metadata, one file per output, named by its path) are all of
    # the rehearsal's own files
    recorded = [base64.urlsafe_b64decode(p.name).decode() for p in (workdir / ".snakemake/metadata").iterdir()]
    assert recorded and all(path.startswith(REHEARSAL_DIR + "/") for path in recorded)
    # the real run schedules every job, exactly as before the rehearsal
    assert job_counts(snakemake(workdir, "-n", *real).stdout) == before_counts

    # report.md: a row per job of the rehearsal, each with its memory and disk, training and decoding projected
    report = (workdir / REHEARSAL_DIR / "report.md").read_text()
    rows = {cells[0]: cells for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()
        if line.startswith("| ") and not line.startswith("| job") and not line.startswith("| **"))}
    rehearsal_counts = job_counts(snakemake(workdir, "-n", *real, "--config", "rehearse=true", "--forceall").stdout)
    rules = {job.split("/")[0] for job in rows}
    assert sum(rehearsal_counts.values()) == len(rows) + 2  # + rehearsal_report and all
    assert rules == set(rehearsal_counts) - {"rehearsal_report", "all"}
    for job, cells in rows.items():
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB)", cells[2]), (job, cells)  # peak RSS
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB)", cells[4]), (job, cells)  # disk
        assert float(cells[2].split()[0]) > 0 and float(cells[4].split()[0]) > 0
    for job in ("weight_learning", "subspace/ise", "subspace/lsp", "finetune/lslo-2-2-8-wl-gps0.9", "demo_pretrain"):
        assert rows[job][5].endswith("s/update"), rows[job]
    assert rows["decode/lslo-2-2-8-wl-gps0.9/0"][5].endswith("s/sentence")
    # the full run of the smoke config decodes eval.max_sentences 5 of each of the 12 directions
    assert rows["decode/pretrain/0"][6] == "60 sentences"
    # the clocks: 2 updates timed per training stage (the config's epochs allow them)
    wl = json.loads((workdir / REHEARSAL_DIR / "clocks/weight_learning.json").read_text())
    assert len(wl["updates_s"]) == 1 and wl["peak_rss_bytes"] > 0  # weight learning: 1 epoch of 1 update
    finetune = json.loads((workdir / REHEARSAL_DIR / "clocks/finetune/lslo-2-2-8-wl-gps0.9.json").read_text())
    assert len(finetune["updates_s"]) == 2 and all(math.isfinite(s) and s > 0 for s in finetune["updates_s"])
    assert finetune["checkpoint_bytes"] > 0


def test_a_rehearsal_dry_run_keeps_the_real_paths_and_writes_below_its_directory(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    shutil.copy(ROOT / "tests/data/smoke.yaml", workdir / "config/smoke.yaml")
    out = snakemake(workdir, "-n", "--configfile", "config/smoke.yaml", "--config", "rehearse=true").stdout
    paths = re.findall(r"^    (?:output|log): (.*)$", out, flags=re.M)
    assert paths and all(p.startswith(REHEARSAL_DIR + "/") for line in paths for p in line.split(", "))
    assert "rehearsal_report" in job_counts(out)



def test_a_lang12_rehearsal_schedules_the_real_runs_jobs_and_its_report(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    setup = ["-n", "--configfile", "config/lang12.yaml", *paper_paths(tmp_path)]  # ends in --config model=...
    real = job_counts(snakemake(workdir, *setup).stdout)
    out = snakemake(workdir, *setup, "rehearse=true").stdout
    # every job of the real run, and the report; one dev set (the real run's first 50 and all are both cut to 2)
    assert real["dev_set"] == 2 and job_counts(out) == {**real, "dev_set": 1, "rehearsal_report": 1}
    paths = re.findall(r"^    (?:output|log): (.*)$", out, flags=re.M)
    assert paths and all(p.startswith(REHEARSAL_DIR + "/") for line in paths for p in line.split(", "))
    # the dev sets of every training stage are the first 2 devtest sentences (lang12's Figure 3 variants: all)
    assert "results/rehearsal/data/dev/2.tsv" in out and "data/dev/all.tsv" not in out
