"""The workflow on a brought checkpoint: a tiny NLLB-200-format model, a user's own language table (NLLB codes,
no flores101 column), FLORES-200 files found by layout auto, spBLEU with the checkpoint's spm; and the pre-check
that stops a run before any job when a language code or the model directory is wrong."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from model_dirs import make_nllb_model_dir, syllable_sentences, train_spm
from test_workflow import WORKFLOW_FILES, ROOT, snakemake

LANGS = {"en": ("H", "eng_Latn"), "fr": ("H", "fra_Latn"), "oc": ("V", "oci_Latn")}


@pytest.fixture
def world(tmp_path):
    """Workflow copy + FLORES-200 files + language table + tiny NLLB checkpoint + a config for them."""
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    ext = tmp_path / "external"
    spm_model = train_spm(ext / "spm")
    model = make_nllb_model_dir(ext / "nllb-tiny", [nllb for _, nllb in LANGS.values()], spm_model=spm_model,
                                 init_std=0.5)
    for split, n in (("dev", 12), ("devtest", 6)):
        for i, (_, nllb) in enumerate(LANGS.values()):
            path = ext / "flores200" / split / f"{nllb}.{split}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(syllable_sentences(n, seed=f"{split}{i}", words=5)) + "\n", encoding="utf-8")
    table = ext / "languages.tsv"
    table.write_text("code\tresource\tflores200\tnllb\tsubsets\n" + "".join(
        f"{code}\t{group}\t{nllb}\t{nllb}\tmine\n" for code, (group, nllb) in LANGS.items()), encoding="utf-8")
    config = {
        "data": {"mode": "flores", "layout": "auto", "flores": str(ext / "flores200"), "language_table": str(table),
                 "languages": "mine"},
        "model": str(model),
        "eval": {"spm": str(spm_model), "beam": 2, "max_tokens": 500, "max_len_b": 8, "shards": 1},
        "train": {"lr": 3.0e-3, "epochs": 1, "max_tokens": 256, "warmup_updates": 1, "max_epoch_examples": 12,
                  "dev_sentences": 2, "dev_beam": 1, "seed": 1},
        "weight_learning": {}, "subspace": {},
        "variants": {"lslo": {"label": "2;8 SRC", "method": "lslo", "index": "src", "ranks": {"H": 2, "V": 8}}},
        "tables": {},
    }
    (tmp_path / "config" / "nllb.yaml").write_text(yaml.safe_dump(config))
    return tmp_path, config


@pytest.mark.smoke
def test_nllb_checkpoint_end_to_end(world):
    workdir, config = world
    targets = [f"results/evaluate/{v}/groups.tsv" for v in config["variants"]]
    snakemake(workdir, *targets, "--configfile", "config/nllb.yaml", "--cores", "2", "--show-failed-logs")
    variant = yaml.safe_load((workdir / "results/finetune/lslo/variant.json").read_text())
    assert variant["nllb_codes"] == {code: nllb for code, (_, nllb) in LANGS.items()}
    for name in config["variants"]:
        groups = pd.read_csv(workdir / f"results/evaluate/{name}/groups.tsv", sep="\t")
        # en, fr in H and oc in V: 2 directions each in H2H, H2V, V2H; none in V2V
        assert groups["pair"].tolist() == ["H2H", "H2V", "V2H", "AVG"]
        assert groups["n_directions"].tolist() == [2, 2, 2, 6]
    hyps = pd.concat(pd.read_csv(p, sep="\t", keep_default_na=False)
                     for p in (workdir / "results/evaluate/lslo/hyps").glob("*.tsv"))
    assert len(hyps) == 6 * 6 and set(zip(hyps.src, hyps.tgt)) == {
        (s, t) for s in LANGS for t in LANGS if s != t}
    assert "Nothing to be done" in snakemake(workdir, *targets, "-n", "--configfile", "config/nllb.yaml").stdout


def _last_line(proc):
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_precheck_stops_before_any_job(world):
    workdir, config = world
    config["data"]["languages"] = ["en", "jp"]
    (workdir / "config" / "bad.yaml").write_text(yaml.safe_dump(config))
    line = _last_line(snakemake(workdir, "-n", "--configfile", "config/bad.yaml", check=False))
    assert line.startswith("config key 'data.languages' (")
    assert "config/bad.yaml): unknown language code(s) ['jp']; not in the language table" in line
    assert config["data"]["language_table"] in line
    config["data"]["languages"] = "mine"
    model = config["model"]
    for name in ("tokenizer.json", "tokenizer_config.json", "sentencepiece.bpe.model"):
        (Path(model) / name).unlink()
    (workdir / "config" / "bad.yaml").write_text(yaml.safe_dump(config))
    line = _last_line(snakemake(workdir, "-n", "--configfile", "config/bad.yaml", check=False))
    assert line.startswith("config key 'model' (")
    assert f"config/bad.yaml): {model}: not a tokenizer directory" in line
    assert not (workdir / "results").exists()
