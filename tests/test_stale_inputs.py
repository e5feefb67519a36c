"""Nothing stale, nothing lost: every input a stage reads is seen by content, each stage depends on what it reads
and nothing more, and every file a later rule reads is a declared output.

One flores-mode world (lang12 with a few variants): FLORES-101 files of the twelve languages, the repository's
language table, a tiny M2M100 checkpoint and an spm file, all under the work directory. Each test copies the world
with every output materialised (empty files with their job metadata, `snakemake --touch`), changes one thing and
reads what a dry run schedules; the FLORES test runs the data stage for real.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from model_dirs import make_m2m100_model_dir, syllable_sentences
from test_workflow import ROOT, copy_workflow, job_counts, snakemake

from lslo.languages import read_language_table, select

TRAINING = {"weight_learning", "subspace", "finetune", "finetune_full", "finetune_pretrain"}
UNTABLED = "lslo-4-4-4-wl"  # a variant in no table and no figure: only `all` asks for its scores
CONFIG = ["--configfile", "config/stale.yaml"]


def write_world(workdir: Path) -> None:
    """FLORES-101 files, checkpoint and spm under workdir/external, and config/stale.yaml pointing at them."""
    table = read_language_table(ROOT / "config/languages.tsv")
    codes = select(table, "lang12")
    external = workdir / "external"
    for split, n in (("dev", 4), ("devtest", 3)):
        for i, code in enumerate(codes):
            path = external / "flores101" / split / f"{table.loc[code, 'flores101']}.{split}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(syllable_sentences(n, seed=f"{split}{i}", words=4)) + "\n", encoding="utf-8")
    make_m2m100_model_dir(external / "model", codes)
    (external / "spm.model").write_bytes(b"spm, first version")
    config = yaml.safe_load((ROOT / "config/lang12.yaml").read_text(encoding="utf-8"))
    config["data"]["flores"] = "external/flores101"
    config["model"] = "external/model"
    config["eval"].update(spm="external/spm.model", shards=1)
    keep = ["pretrain", "ft-all", "lslo-8-8-8-wl", "lslo-2-2-8-wl-gps0.5", UNTABLED]
    config["variants"] = {name: config["variants"][name] for name in keep}
    config["tables"] = {"table1": keep[:-1]}
    config["figure3"] = keep[:-1]
    config.pop("summary", None)
    (workdir / "config/stale.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def touch_all(workdir: Path) -> None:
    """Every output as an empty file (a directory for directory outputs) with its job's metadata."""
    summary = snakemake(workdir, "--summary", *CONFIG).stdout.splitlines()[1:]
    for path in (line.split("\t")[0] for line in summary if line.strip()):
        target = workdir / path
        if target.suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        else:
            target.mkdir(parents=True, exist_ok=True)
    snakemake(workdir, "--touch", "--forceall", "--cores", "1", *CONFIG)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("fresh"))
    write_world(workdir)
    return workdir


@pytest.fixture(scope="module")
def finished(fresh, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(fresh, workdir, symlinks=True)
    touch_all(workdir)
    assert "Nothing to be done" in dry_run(workdir).stdout
    return workdir


def copy_of(workdir: Path, tmp_path: Path) -> Path:
    to = tmp_path / "run"
    shutil.copytree(workdir, to, symlinks=True)  # copy2: mtimes kept, Snakemake sees the same state
    return to


def dry_run(workdir: Path, *args):
    return snakemake(workdir, "-n", *CONFIG, *args)


def scheduled(workdir: Path, *args) -> dict:
    out = dry_run(workdir, *args).stdout
    return {} if "Nothing to be done" in out else job_counts(out)


def replace_keeping_mtime(path: Path, write) -> None:
    """Rewrite a file and give it back its old mtime: what `cp -p`, `rsync -a` or `tar x` of another file does."""
    before = path.stat()
    write(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def edit_config(workdir: Path, edit) -> None:
    path = workdir / "config/stale.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(config)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def test_flores_file_edited_in_place_reruns_the_data_stage(fresh, tmp_path):
    workdir = copy_of(fresh, tmp_path)
    snakemake(workdir, "results/data/test.tsv", "--cores", "1", *CONFIG)
    devtest = workdir / "external/flores101/devtest/fra.devtest"
    lines = devtest.read_text(encoding="utf-8").splitlines()
    assert lines[0] in (workdir / "results/data/test.tsv").read_text(encoding="utf-8")
    # sed -i: the file's mtime changes, its directory's does not
    devtest.write_text("\n".join(["une phrase corrigée", *lines[1:]]) + "\n", encoding="utf-8")
    snakemake(workdir, "results/data/test.tsv", "--cores", "1", *CONFIG)
    test = (workdir / "results/data/test.tsv").read_text(encoding="utf-8")
    assert "une phrase corrigée" in test and lines[0] not in test
    # the same edit with the old mtime kept (cp -p of a corrected copy) is seen too
    replace_keeping_mtime(devtest, lambda p: p.write_text(p.read_text(encoding="utf-8").replace(
        "une phrase corrigée", "une autre phrase"), encoding="utf-8"))
    snakemake(workdir, "results/data/test.tsv", "--cores", "1", *CONFIG)
    assert "une autre phrase" in (workdir / "results/data/test.tsv").read_text(encoding="utf-8")


def test_flores_file_edited_reruns_every_stage_after_data(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    replace_keeping_mtime(workdir / "external/flores101/dev/deu.dev",
                          lambda p: p.write_text("ein neuer Satz\n" + p.read_text(encoding="utf-8").split("\n", 1)[1],
                                                 encoding="utf-8"))
    counts = scheduled(workdir)
    assert counts.get("data") == 1 and TRAINING <= counts.keys() and counts["score"] == 5, counts


def overwrite_model_keeping_mtime(workdir: Path, tmp_path: Path) -> dict:
    """Another model's weights over the run's model file (`cp -p`): the jobs a dry run then schedules."""
    other = make_m2m100_model_dir(tmp_path / "other", select(read_language_table(ROOT / "config/languages.tsv"),
                                                              "lang12"), seed=1)
    replace_keeping_mtime(workdir / "external/model/model.safetensors",
                          lambda p: shutil.copyfile(other / "model.safetensors", p))
    counts = scheduled(workdir)
    assert TRAINING <= counts.keys(), counts
    assert counts["subspace"] == 2 and counts["decode"] == 5 and "data" not in counts
    return counts


def test_base_model_overwritten_with_its_mtime_kept_retrains_everything(finished, tmp_path):
    overwrite_model_keeping_mtime(copy_of(finished, tmp_path), tmp_path)


def test_results_copied_without_snakemakes_record_next_to_another_model_retrain(finished, tmp_path):
    """`cp -a results/` into a working directory whose model is another one: no .snakemake/ record to compare the
    params with, and mtimes see nothing; the stamp of the other model's identity (rules/common.smk) is missing, so
    every stage that read the model reruns. The same model without the record reruns nothing."""
    workdir = copy_of(finished, tmp_path)
    shutil.rmtree(workdir / ".snakemake")
    assert "Nothing to be done" in dry_run(workdir).stdout
    assert overwrite_model_keeping_mtime(workdir, tmp_path)["input_identity"] == 1


def test_spm_replaced_with_its_mtime_kept_rescores(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    replace_keeping_mtime(workdir / "external/spm.model", lambda p: p.write_bytes(b"spm, second version"))
    counts = scheduled(workdir)
    assert counts.get("score") == 5 and not TRAINING & counts.keys() and "decode" not in counts, counts


def test_eval_max_sentences_reruns_no_training(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    edit_config(workdir, lambda config: config["eval"].update(max_sentences=2))
    counts = scheduled(workdir)
    assert not TRAINING & counts.keys() and "data" not in counts and "dev_set" not in counts, counts
    assert counts["test_set"] == 1 and counts["decode"] == 5 and counts["score"] == 5


def test_language_table_edits_outside_what_a_stage_reads_rerun_nothing(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    path = workdir / "config/languages.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    name, bitext, code = header.index("name"), header.index("bitext"), header.index("code")
    lang12 = set(select(read_language_table(path), "lang12"))
    edited = [lines[0]]
    for line in lines[1:]:
        fields = line.split("\t")
        if fields[code] == "fr":
            fields[name] = "Français"  # a name of a run language
        elif fields[code] not in lang12 and fields[bitext]:
            fields[bitext] = str(int(fields[bitext]) + 1)  # a bitext count of a language outside the run
        edited.append("\t".join(fields))
    edited.append("\t".join({"code": "xx", "name": "Extra", "resource": "V"}.get(h, "") for h in header))
    path.write_text("\n".join(edited) + "\n", encoding="utf-8")
    assert scheduled(workdir) == {}
    # a bitext count of a run language: Tables 9 and 10 only
    lines = path.read_text(encoding="utf-8").splitlines()
    fields = next(line.split("\t") for line in lines if line.split("\t")[code] == "fr")
    path.write_text("\n".join(line if line.split("\t")[code] != "fr" else "\t".join(
        fields[:bitext] + [str(int(fields[bitext]) + 1)] + fields[bitext + 1:]) for line in lines) + "\n",
        encoding="utf-8")
    assert scheduled(workdir) == {"score_table": 2, "all": 1}


def test_train_seed_does_not_rerun_the_pretrain_variant(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    edit_config(workdir, lambda config: config["train"].update(seed=3))
    counts = scheduled(workdir)
    assert "finetune_pretrain" not in counts, counts
    assert counts["weight_learning"] == 1 and counts["finetune_full"] == 1, counts  # the seed is theirs


@pytest.mark.parametrize("name", ["sentence_stats.npz", "directions.tsv", "groups.signature.json"])
def test_a_deleted_score_file_is_regenerated(finished, tmp_path, name):
    workdir = copy_of(finished, tmp_path)
    (workdir / f"results/evaluate/{UNTABLED}/{name}").unlink()
    assert scheduled(workdir) == {"score": 1, "all": 1}


def test_a_deleted_decoding_record_is_regenerated(finished, tmp_path):
    """decoding.json is read by decode and by `lslo translate`: deleted, it is written again (and decoding, whose
    input it is, reruns)."""
    workdir = copy_of(finished, tmp_path)
    (workdir / f"results/finetune/{UNTABLED}/decoding.json").unlink()
    counts = scheduled(workdir)
    assert counts["decoding_options"] == 1 and not TRAINING & counts.keys(), counts


def test_a_test_cut_longer_than_devtest_stops_with_one_line(fresh, tmp_path):
    workdir = copy_of(fresh, tmp_path)
    edit_config(workdir, lambda config: config["eval"].update(max_sentences=10))  # devtest has 3 sentences
    proc = snakemake(workdir, "results/data/test.tsv", "--cores", "1", *CONFIG, check=False)
    assert proc.returncode != 0 and not (workdir / "results/data/test.tsv").exists()
    assert ("error: results/data/devtest.tsv: eval.max_sentences asks for the first 10 sentences, it has 3"
            in proc.stderr), proc.stderr

# ---------------------------------------------------------------------------------------------- the helpers

def test_language_rows_hold_the_run_languages_with_the_asked_columns_only(tmp_path):
    from lslo.errors import LsloError
    from lslo.languages import language_rows, row_codes

    table = tmp_path / "languages.tsv"
    table.write_text("code\tname\tresource\tbitext\tsubsets\nfr\tFrench\tH\t289\tmine\nen\tEnglish\tH\t\tmine\n"
                     "oc\tOccitan\tV\t12\t\n", encoding="utf-8")
    assert language_rows(table, "mine", ["code", "bitext"]) == [{"code": "fr", "bitext": "289"},
                                                                {"code": "en", "bitext": ""}]
    assert row_codes(language_rows(table, ["oc", "fr"], ["code", "resource"])) == ["oc", "fr"]
    with pytest.raises(LsloError, match="not written yet"):
        row_codes("results/demo/languages.tsv: language table not written yet")


def test_files_identity_follows_content_and_relative_names(tmp_path):
    from lslo.checkpoint import files_identity

    for root in ("a", "b"):
        (tmp_path / root / "dev").mkdir(parents=True)
        (tmp_path / root / "dev" / "fra.dev").write_text("une phrase\n", encoding="utf-8")
    first = files_identity([tmp_path / "a/dev/fra.dev"], root=tmp_path / "a")
    assert first == files_identity([tmp_path / "b/dev/fra.dev"], root=tmp_path / "b")  # a moved copy
    (tmp_path / "b/dev/fra.dev").write_text("une phrase.\n", encoding="utf-8")
    assert first != files_identity([tmp_path / "b/dev/fra.dev"], root=tmp_path / "b")
