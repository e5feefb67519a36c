"""benchmarks/scale.py end to end at the tiny shape (the rehearsal left out): the checkpoint passes lslo's model
checks, every table has its rows, and the sizes it reports agree with formulas computed here another way."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(scale, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    out = tmp / "RESULTS-scale.md"
    results, text = scale.run(["--shape", "tiny", "--skip-rehearsal", "--updates", "1", "--target-tokens", "128",
                               "--threads", "1", "--workdir", str(tmp / "work"), "--out", str(out)])
    return results, text, out, tmp / "work"


def test_tiny_run_writes_every_table(tiny_run, scale):
    results, text, out, work = tiny_run
    assert out.read_text(encoding="utf-8") == text
    rows = scale.SHAPES["tiny"].rows
    assert rows == 4 + 2_996 + 124  # specials + dict.txt lines + M2M-124's language tokens
    for row in (f"| embedding rows | {rows:,} |", "| language tokens (M2M-124's) | 124 |",
                "| lslo.check_model (lang30) |", "| machine | |", "| git |",
                "| plain | ", "| computed checkpoint (sum of numel x element_size) |",
                "| saved file (lslo.checkpoint.save_checkpoint) |", "| adapters.safetensors |",
                "| lang12 | 1 | ", "| lang30 | 1 | ", "## Rehearsal of the lang12 config"):
        assert row in text, row
    assert not work.exists()  # everything the run created is gone (no --keep)
    step = results["steps"]["plain"]
    assert step["target_tokens"] >= 128 and step["peak_mb"] >= step["before_mb"] > 0  # VmHWM >= VmRSS
    assert results["checkpoint"]["vocab_json"] == 4 + 2_996 and results["checkpoint"]["rows"] == rows


def test_ft_all_checkpoint_bytes_match_the_state_the_trainer_saves(tiny_run, scale):
    """The saved file's tensors are exactly trainable_state (every state-dict tensor once: the embedding tied to
    the encoder's and decoder's embed_tokens and lm_head once) + Adam's two fp32 moments and a float32 step per
    parameter tensor + the torch RNG state; the counts come from lslo.params.base_param_count."""
    from lslo.params import base_param_count

    ft = tiny_run[0]["ft_all"]
    config = scale.model_config(scale.SHAPES["tiny"]).to_dict()
    params = base_param_count(config)
    embedding = config["vocab_size"] * config["d_model"]
    assert ft["parameters"] == params
    assert ft["embedding_copies"] == 1  # trainable_state saves the tied embedding once
    assert ft["state_bytes"] == 4 * (params + (ft["embedding_copies"] - 1) * embedding)
    from transformers import M2M100ForConditionalGeneration

    with torch.device("meta"):  # parameter tensors (the tied embedding once): one Adam step counter each
        n_tensors = len(list(M2M100ForConditionalGeneration(scale.model_config(scale.SHAPES["tiny"])).parameters()))
    assert ft["adam_bytes"] == 2 * 4 * params + 4 * n_tensors
    assert ft["saved_tensor_bytes"] == ft["computed_bytes"] + torch.get_rng_state().numel()
    from_shapes = scale.ft_all_from_config(scale.model_config(scale.SHAPES["tiny"]))  # what a run without the save
    assert {k: from_shapes[k] for k in ("state_bytes", "adam_bytes", "computed_bytes", "embedding_copies")} == {
        k: ft[k] for k in ("state_bytes", "adam_bytes", "computed_bytes", "embedding_copies")}  # reports
    assert ft["computed_bytes"] < ft["file_bytes"] < ft["computed_bytes"] + 2**20  # the rest is pickled metadata


def test_lslo_lang30_count_matches_the_rank_formula(tiny_run, scale):
    """Every LoRA of the tiny model is d_model x d_model (the slice fc layout at d 64, ffn 128): r (d + d) entries
    per language and site; 2 encoder layers x 5 modules + 2 decoder layers x 8 modules = 26 sites."""
    from lslo.languages import groups, read_language_table, select

    ls = tiny_run[0]["lslo30"]
    table = read_language_table(REPO / "config" / "languages.tsv")
    codes = select(table, "lang30")
    rank_sum = sum(scale.GROUP_RANKS[g] for g in groups(table, codes).values())
    assert ls["trainable"] == ls["formula"] == 26 * 2 * 64 * rank_sum
    assert ls["adapter_bytes"] >= 4 * ls["trainable"]
    # the checkpoint's state: the LoRA entries in float32, and the copies of the frozen tied embedding it holds
    assert ls["embedding_bytes"] == 4 * 3_124 * 64
    assert ls["state_bytes"] == 4 * ls["trainable"] + ls["embedding_copies"] * ls["embedding_bytes"]
    assert ls["checkpoint_bytes"] > ls["state_bytes"] + ls["adam_bytes"]


def test_the_rehearsal_runs_in_a_fresh_copy_of_the_workflow(scale, tmp_path, monkeypatch):
    """run_rehearsal copies the workflow into work/workflow-run and runs snakemake there; an earlier rehearsal's
    directory is refused (its finished jobs would be reported as this run's)."""
    calls = []

    def fake_snakemake(cmd, cwd, **kwargs):
        calls.append((cmd, Path(cwd)))
        report = Path(cwd) / "results" / "rehearsal" / "report.md"
        report.parent.mkdir(parents=True)
        report.write_text("# report\n\n| job | wall |\n|---|---|\n| finetune | 1 s |\n", encoding="utf-8")
        return scale.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(scale.subprocess, "run", fake_snakemake)
    config = tmp_path / "lang12.yaml"
    config.write_text("data: {}\n", encoding="utf-8")
    result = scale.run_rehearsal(config, tmp_path, timeout=10, settings={"updates": 1})
    (cmd, cwd), = calls
    assert cwd == tmp_path / "workflow-run"
    for name in ("Snakefile", "rules/finetune.smk", "workflow/scripts/rehearsed.py", "config/schema.yaml"):
        assert (cwd / name).read_bytes() == (REPO / name).read_bytes(), name
    assert (cwd / "rehearse.yaml").read_text(encoding="utf-8") == "rehearse:\n  updates: 1\n"
    assert cmd[cmd.index("--configfile") + 1:][:2] == [str(config), str(cwd / "rehearse.yaml")]
    assert result["table"] == ["| job | wall |", "|---|---|", "| finetune | 1 s |"]
    with pytest.raises(RuntimeError, match="workflow-run exists"):
        scale.run_rehearsal(config, tmp_path, timeout=10)


def test_the_full_runs_are_projected_from_the_rehearsed_jobs(scale, tmp_path):
    """project_full_runs on made-up clocks: every job of lang12 and lang30 is counted once, from the clock of its
    kind, and its hours are the clock's arithmetic written out here (the rehearsal's time outside updates, dev
    scores and checkpoints, plus the config's updates x seconds per update, its dev scores x the dev sentences of
    the H2H and V2V directions, its epoch checkpoints)."""
    import json
    import re

    from lslo.config import load_yaml

    work = tmp_path / "work"
    shape = scale.SHAPES["tiny"]
    scale.build_world(work, shape)
    scale.build_checkpoint(work, shape)
    scale.write_configs(work)
    tmp_path = tmp_path / "clocks"
    clock = {"wall_s": 100.0, "updates_s": [10.0, 2.0], "epochs": 1, "dev_s": [6.0], "dev_sentences": [24],
             "checkpoint_s": [1.0], "decode_batches": []}
    decode = {**clock, "updates_s": [], "dev_s": [], "dev_sentences": [], "checkpoint_s": [], "epochs": 0,
              "wall_s": 50.0, "decode_batches": [{"s": 8.0, "sentences": 132, "max_new_tokens": 4,
                                                  "longest_source": 20}]}
    jobs = {"weight_learning": clock, "subspace/ise": clock, "subspace/lsp": clock}
    representatives = {"pretrain": "pretrain", "full": "ft-all", "lslo": "lslo-2-2-8-wl-gps0.9"}
    for variant in representatives.values():
        jobs[f"finetune/{variant}"] = clock
        jobs[f"decode/{variant}/0"] = decode
    for job, content in jobs.items():
        (tmp_path / job).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{job}.json").write_text(json.dumps(content), encoding="utf-8")
    rows = scale.project_full_runs(work, tmp_path, representatives, 500)
    updates_of = {}
    dev_directions = {"lang12": 24, "lang30": 72}  # H*(H-1) + V*(V-1) of config/languages.tsv
    for name in ("lang12", "lang30"):
        config = load_yaml(work / f"{name}.yaml")
        mine = [row for row in rows if row["config"] == name]
        methods = [spec["method"] for spec in config["variants"].values()]
        trained = [row for row in mine if row["kind"].startswith(("Ft-all", "LSLo", "Pretrain"))]
        assert sum(row["jobs"] for row in trained) == len(methods)
        decoded = {row["kind"]: row["jobs"] for row in mine if row["kind"].startswith("decode")}
        assert decoded == {f"decode, {label}": methods.count(method)
                           for method, label in scale.METHOD_NAMES.items()}
        for row in mine:
            if row["kind"].startswith("decode"):
                n = int(row["work"].split()[0].replace(",", ""))
                # 8 s for 132 sentences of at most 4 new tokens; the full run: n sentences of up to 20 tokens
                assert row["hours_each"] == pytest.approx((50 - 8 + 8 * 20 / 4 * n / 132) / 3600)
                continue
            if row["work"] == "dev scores only":
                continue
            updates, epochs = (int(n.replace(",", "")) for n in
                               re.fullmatch(r"([\d,]+) updates, (\d+) epochs", row["work"]).groups())
            every = "every dev sentence" in row["kind"]
            dev = (1012 if every else 50) * dev_directions[name]  # the world's devtest has FLORES' 1012 rows
            expected = (100 - 12 - 6 - 1) + updates * 2.0 + epochs * 6.0 * dev / 24 + epochs * 1.0
            assert row["hours_each"] == pytest.approx(expected / 3600), row
            updates_of[name] = updates
    assert updates_of["lang30"] > updates_of["lang12"]  # each config's own corpus: 30 languages give more batches
