"""lslo.jobs: one-line errors in job scripts, the code hash that reruns a stage, N training processes per job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lslo.code_identity
from lslo.data import write_parallel
from lslo.finetune import run_finetune
from lslo.io import write_json
from lslo.errors import LsloError
from lslo.code_identity import code_hash, imported_modules
from lslo.jobs import run_processes
from lslo.tables import runs_per_row
from lslo.data import Corpus
from lslo.train import TrainOptions, epoch_plan
from test_train import LANGUAGES, make_world

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"


# ---------------------------------------------------------------------------------------------- one-line errors

JOB = textwrap.dedent("""
    import sys
    from lslo.errors import LsloError
    from lslo.jobs import stage_job
    with stage_job(sys.argv[1]):
        import logging
        logging.getLogger("lslo.stage").info("reading the table")
        if sys.argv[2] == "lslo":
            raise LsloError("results/data/train.tsv: column 'jp' not found;\\nexpected a language of data.languages")
        raise KeyError("not an input error")
""")


def run_job(tmp_path, kind):
    log = tmp_path / f"{kind}.log"
    proc = subprocess.run([sys.executable, "-c", JOB, str(log), kind], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return proc, log.read_text()


def test_an_lslo_error_is_one_line_in_the_log_and_on_stderr(tmp_path):
    proc, log = run_job(tmp_path, "lslo")
    line = "error: results/data/train.tsv: column 'jp' not found; expected a language of data.languages"
    assert proc.returncode == 1
    assert proc.stderr == line + "\n"
    assert "Traceback" not in log and log.splitlines()[-1] == line
    assert "INFO reading the table" in log.splitlines()[0]  # logging goes to the rule log


def test_any_other_error_keeps_its_traceback_in_the_log(tmp_path):
    proc, log = run_job(tmp_path, "bug")
    assert proc.returncode == 1
    assert "Traceback" in log and "KeyError: 'not an input error'" in log


# ---------------------------------------------------------------------------------------------- code hash

# finetune and decode import several lslo modules; score_figure imports the figures submodule by `from lslo import`
@pytest.mark.parametrize("script", ["finetune.py", "decode.py", "score_figure.py"])
def test_the_hash_covers_every_lslo_module_python_loads_for_a_script(script):
    """Import what the script imports (its top-level lslo imports), in a fresh interpreter: every lslo module that
    ends up in sys.modules must be in the hashed set."""
    imports = [line.strip() for line in (SCRIPTS / script).read_text().splitlines()
               if line.strip().startswith(("from lslo", "import lslo"))]
    probe = "\n".join(imports) + "\nimport sys\nprint(' '.join(m for m in sys.modules if m.split('.')[0] == 'lslo'))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout.split()
    hashed = imported_modules(SCRIPTS / script)
    assert set(loaded) <= set(hashed), set(loaded) - set(hashed)
    assert "lslo.jobs" in hashed


def test_the_hash_changes_with_the_library_code_a_stage_runs_only(tmp_path, monkeypatch):
    package = tmp_path / "lslo"
    shutil.copytree(ROOT / "lslo", package, ignore=shutil.ignore_patterns("__pycache__"))
    script = tmp_path / "finetune.py"
    shutil.copy(SCRIPTS / "finetune.py", script)
    monkeypatch.setattr(lslo.code_identity, "PACKAGE_DIR", package)
    before = code_hash(script)
    os.utime(script, (1, 1))  # a checkout that rewrites the same bytes
    assert code_hash(script) == before
    assert "lslo.convert" not in imported_modules(script)  # finetune never runs the fairseq converter
    (package / "convert.py").write_text((package / "convert.py").read_text() + "\n# changed\n")
    assert code_hash(script) == before
    assert "lslo.pruning" in imported_modules(script)  # through lslo.finetune (GPS, eq. 4)
    pruning = (package / "pruning.py").read_text()
    edited = pruning.replace("\nimport ", "\n# a comment\n\nimport ", 1).replace('"""', '"""A ', 1)
    (package / "pruning.py").write_text(edited)
    assert code_hash(script) == before  # a comment, a docstring, a line break: the same code
    (package / "pruning.py").write_text(pruning.replace("def ", "def _unused(): pass\n\n\ndef ", 1))
    after = code_hash(script)
    assert after != before
    script.write_text(script.read_text() + "\nx = 1\n")
    assert code_hash(script) != after


def test_a_rules_inputs_split_back_into_rows_of_runs():
    # Table 1 with Pretrain (one run), Ft-all at three seeds, LSLo at two: the rule lists every run in turn
    paths = ["pretrain", "full", "full.seed3", "full.seed4", "lslo", "lslo.seed3"]
    assert runs_per_row(paths, [1, 3, 2]) == ["pretrain", ["full", "full.seed3", "full.seed4"], ["lslo", "lslo.seed3"]]
    with pytest.raises(LsloError, match=r"6 input\(s\) for rows of \[1, 3\] runs \(4 in all\)"):  # too many
        runs_per_row(paths, [1, 3])
    with pytest.raises(LsloError, match=r"6 input\(s\) for rows of \[1, 3, 3\] runs \(7 in all\)"):  # too few
        runs_per_row(paths, [1, 3, 3])


@pytest.mark.parametrize("script", ["table.py", "summary.py", "figure1.py", "figure3.py", "score_table.py",
                                    "score_figure.py"])
def test_the_table_and_figure_jobs_load_no_model_code(script):
    # each job is a process of its own: torch and transformers cost it seconds of CPU it does not need (the index
    # plans and option names it reads are in lslo.options)
    assert not {"lslo.model", "lslo.inference", "lslo.train", "lslo.layer"} & set(imported_modules(SCRIPTS / script))


def test_a_module_a_function_imports_on_call_is_not_in_a_scripts_code():
    """Every script imports lslo.jobs, whose dispatcher imports the training stages only when called: a decode job
    does not depend on the training code, nor the data stage on the decoder."""
    assert "lslo.finetune" not in imported_modules(SCRIPTS / "decode.py")
    assert "lslo.inference" not in imported_modules(SCRIPTS / "data.py")
    assert "lslo.finetune" in imported_modules(SCRIPTS / "finetune.py")


# ---------------------------------------------------------------------------------------------- N processes

OPTIONS = dict(epochs=2, lr=1e-2, max_tokens=120, warmup_updates=2, dropout=0.0, attention_dropout=0.0, dev_sentences=0,
               seed=2)


def even_epoch_examples(train_table, model_dir, options: dict) -> int:
    """An epoch size whose batch count is even in every epoch, so 2 processes see exactly the batches one
    process sees (train.shard drops a remainder batch that the single process would train on)."""
    from lslo.tokenizer import load_tokenizer

    corpus = Corpus.multiparallel(train_table, LANGUAGES, load_tokenizer(model_dir))
    for size in range(40, 120, 4):
        opts = TrainOptions.from_dict(dict(options, max_epoch_examples=size))
        if all(len(epoch_plan(corpus, opts, e)) % 2 == 0 for e in range(1, options["epochs"] + 1)):
            return size
    raise AssertionError("no epoch size with an even batch count")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    model_dir, table, lang_table = make_world(root)
    write_parallel(table, root / "train.tsv")
    return model_dir, table, lang_table, root / "train.tsv"


def test_two_gloo_processes_train_the_weights_of_one_with_the_same_effective_batch(world, tmp_path):
    model_dir, table, lang_table, train_tsv = world
    ranks = tmp_path / "ranks.json"
    write_json({"ranks": {lang: 2 for lang in LANGUAGES}, "prune": {}, "gps": None}, ranks)
    # tokens_per_update = 2 x max_tokens: update_freq 2 in one process, 1 in each of two
    options = dict(OPTIONS, tokens_per_update=2 * OPTIONS["max_tokens"])
    options["max_epoch_examples"] = even_epoch_examples(table, model_dir, options)
    common = dict(method="lslo", model_dir=str(model_dir), train_tsv=str(train_tsv), dev_tsv=None,
                  language_table=str(lang_table), languages="tiny", index_plan="src", plan_json=None,
                  ranks_json=str(ranks), modules="all", options=options)
    adapters = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        out.mkdir()
        run_processes(run_finetune, n, log_path=out / "job.log", threads=2, **common, out_dir=str(out),
                      out_metrics=str(out / "metrics.tsv"), checkpoint_dir=str(out / "ckpt"))
        adapters[n] = load_file(out / "adapters.safetensors")
    log = (tmp_path / "n2" / "job.log").read_text()
    assert "[rank 0]" in log and "[rank 1]" in log and "process 1 of 2" in log
    assert adapters[1].keys() == adapters[2].keys()
    moved = 0
    for key, single in adapters[1].items():
        torch.testing.assert_close(adapters[2][key], single, rtol=1e-4, atol=1e-5, msg=key)
        moved += int(".B." in key and bool(single.abs().sum() > 0))
    assert moved > 0  # B starts at zero: the runs trained
    one, two = (np.loadtxt(tmp_path / f"n{n}" / "metrics.tsv", skiprows=1, usecols=(1, 2)) for n in (1, 2))
    assert (one[:, 0] == two[:, 0]).all()  # the same number of optimizer updates
    np.testing.assert_allclose(one[:, 1], two[:, 1], rtol=1e-4)  # the same loss per target token


def test_an_input_error_in_the_processes_is_raised_with_its_message(world, tmp_path):
    model_dir, _, lang_table, train_tsv = world
    from lslo.errors import LsloError

    with pytest.raises(LsloError, match="ranks.json: file not found"):
        run_processes(run_finetune, 2, log_path=tmp_path / "job.log", method="lslo", model_dir=str(model_dir),
                      train_tsv=str(train_tsv), dev_tsv=None, language_table=str(lang_table),
                      languages="tiny", index_plan="src", plan_json=None, ranks_json=str(tmp_path / "ranks.json"),
                      modules="all", options=OPTIONS, out_dir=str(tmp_path / "out"),
                      out_metrics=str(tmp_path / "out" / "metrics.tsv"), checkpoint_dir=str(tmp_path / "ckpt"))
    assert not (tmp_path / "out" / "adapters.safetensors").exists()
