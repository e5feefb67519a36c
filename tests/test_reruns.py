"""Reruns recompute: the real workflow on the smoke config, changed or forced, gives what a fresh run gives.

One module-scoped world (the smoke demo's benchmark and tiny base model, and a second base of the same shape with
other weights) and one finished run (flores mode on that world: data, weight learning, ranks and two LSLo
fine-tunings). Each test copies the finished run (results/ and .snakemake/, mtimes kept), changes one thing, reruns
Snakemake there and compares with a fresh run of the new setting (the same copy without any checkpoint). On CPU
with a fixed seed and one thread per job the results are bit-identical.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from shared_runs import copy_run

from test_workflow import GPU_RULES, ROOT, copy_workflow, snakemake

pytestmark = pytest.mark.smoke

LSLO = "lslo-2-2-8-wl-gps0.9"  # learned index plan (weight learning), GPS on H and M
OTHER = "lslo-2-2-8-src"  # another LSLo variant: must stay untouched when LSLO's settings change
ONE_THREAD = ["--set-threads", *[f"{rule}=1" for rule in sorted(GPU_RULES)]]


def run(workdir: Path, config: dict, *args) -> None:
    (workdir / "config/rerun.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir, *args, "--configfile", "config/rerun.yaml", "--cores", "2", *ONE_THREAD, "--show-failed-logs")


def targets(config: dict) -> list[str]:
    return [f"results/finetune/{v}/variant.json" for v in config["variants"]]


@pytest.fixture(scope="module")
def world(smoke_world, tmp_path_factory):
    """(root, base A, base B): the smoke demo's benchmark and base, and a base of the same shape, other weights.
    Any base will do (these tests compare runs on the same base): the smoke world's, copied (conftest.py)."""
    from transformers import M2M100ForConditionalGeneration

    root = copy_run(smoke_world, tmp_path_factory.mktemp("world") / "smoke")
    base_a, base_b = root / "results/demo/model", root / "base_b"
    shutil.copytree(base_a, base_b)
    model = M2M100ForConditionalGeneration.from_pretrained(base_a)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(base_b)
    return root, base_a, base_b


def make_config(world) -> dict:
    """The smoke config in flores mode on the world, with two LSLo variants and no decoding targets."""
    root, base_a, _ = world
    config = yaml.safe_load((ROOT / "tests/data/smoke.yaml").read_text())
    demo = root / "results/demo"
    config["data"].update(mode="flores", flores=str(demo / "benchmark"), language_table=str(demo / "languages.tsv"))
    config["model"] = str(base_a)
    config["eval"]["spm"] = str(demo / "spm.model")
    config["variants"] = {
        LSLO: config["variants"][LSLO],
        OTHER: {"label": "2;2;8+SRC (fc)", "method": "lslo", "ranks": {"H": 2, "M": 2, "V": 8}, "index": "src",
                "modules": "fc", "gps": None},
    }
    config["tables"] = {"table1": [LSLO, OTHER]}
    config["figure3"] = [LSLO, OTHER]
    return config


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("finished"))
    config = make_config(world)
    run(workdir, config, *targets(config))
    return workdir, config


def copy_finished(finished, to: Path) -> Path:
    return copy_run(finished[0], to)  # mtimes kept, so Snakemake sees the same state


def fresh_run(finished, to: Path, config: dict, remove: list[str]) -> Path:
    """The finished run without any checkpoint and without `remove`, run again with `config`."""
    workdir = copy_finished(finished, to)
    for path in ["results/checkpoints", *remove]:
        target = workdir / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    run(workdir, config, *targets(config))
    return workdir


def snapshot(workdir: Path, variant: str) -> dict:
    """Bytes and mtime of every file a variant owns."""
    paths = [workdir / f"results/ranks/{variant}.json"]
    for folder in (f"results/finetune/{variant}", f"results/checkpoints/finetune/{variant}"):
        paths += sorted(p for p in (workdir / folder).rglob("*") if p.is_file())
    return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


class Adapters:
    """An adapter file's tensors and metadata; equal when every tensor is bit-identical and the metadata equal
    (the file bytes are not compared: safetensors writes the metadata keys in an arbitrary order)."""

    def __init__(self, path: Path):
        from lslo.adapters import read_adapters

        self.tensors, self.metadata = read_adapters(path)

    def __eq__(self, other) -> bool:
        return (self.metadata == other.metadata and self.tensors.keys() == other.tensors.keys()
                and all(torch.equal(t, other.tensors[k]) for k, t in self.tensors.items()))


def adapters(workdir: Path, variant: str = LSLO) -> Adapters:
    return Adapters(workdir / f"results/finetune/{variant}/adapters.safetensors")


def metrics(workdir: Path, variant: str = LSLO) -> bytes:
    return (workdir / f"results/finetune/{variant}/metrics.tsv").read_bytes()


@pytest.mark.parametrize("change", ["gps_ratio", "lr"])
def test_changing_one_variant_retrains_it_as_a_fresh_run_and_leaves_the_others(finished, tmp_path, change):
    config = copy.deepcopy(finished[1])
    if change == "gps_ratio":
        config["variants"][LSLO]["gps"]["ratio"] = 0.5
    else:
        config["variants"][LSLO]["train"] = {"lr": 1.0e-2}
    rerun = copy_finished(finished, tmp_path / "rerun")
    other_before = snapshot(rerun, OTHER)
    run(rerun, config, *targets(config))

    assert adapters(rerun) != adapters(finished[0])
    fresh = fresh_run(finished, tmp_path / "fresh", config, [f"results/finetune/{LSLO}", f"results/ranks/{LSLO}.json"])
    assert adapters(rerun) == adapters(fresh)
    assert metrics(rerun) == metrics(fresh)
    assert snapshot(rerun, OTHER) == other_before
    assert (rerun / f"results/checkpoints/finetune/{LSLO}.set-aside-1").is_dir()  # kept, not deleted


def test_another_base_model_retrains_as_a_fresh_run(world, finished, tmp_path):
    config = copy.deepcopy(finished[1])
    config["model"] = str(world[2])
    rerun = copy_finished(finished, tmp_path / "rerun")
    run(rerun, config, *targets(config))

    for variant in (LSLO, OTHER):
        assert adapters(rerun, variant) != adapters(finished[0], variant), variant
    fresh = fresh_run(finished, tmp_path / "fresh", config, ["results/weight_learning", "results/finetune"])
    assert (rerun / "results/weight_learning/plan.json").read_bytes() == \
        (fresh / "results/weight_learning/plan.json").read_bytes()
    for variant in (LSLO, OTHER):
        assert adapters(rerun, variant) == adapters(fresh, variant), variant
        assert metrics(rerun, variant) == metrics(fresh, variant), variant


def test_forcerun_finetune_retrains_a_finished_variant(finished, tmp_path):
    rerun = copy_finished(finished, tmp_path / "rerun")
    other_before = snapshot(rerun, OTHER)
    run(rerun, finished[1], f"results/finetune/{LSLO}/variant.json", "--forcerun", "finetune")

    # the finished run was a fresh run: the forced one trains again from scratch and equals it
    assert (rerun / f"results/checkpoints/finetune/{LSLO}.set-aside-1/complete").is_file()
    log = (rerun / f"logs/finetune/{LSLO}.log").read_text()
    assert "marked complete" in log and "resumed from" not in log and "epoch 2:" in log
    assert adapters(rerun) == adapters(finished[0])
    assert metrics(rerun) == metrics(finished[0])
    assert snapshot(rerun, OTHER) == other_before


def test_forcerun_weight_learning_retrains(finished, tmp_path):
    rerun = copy_finished(finished, tmp_path / "rerun")
    run(rerun, finished[1], "results/weight_learning/plan.json", "--forcerun", "weight_learning")

    assert (rerun / "results/checkpoints/weight_learning/wl.set-aside-1/complete").is_file()
    assert "resumed from" not in (rerun / "logs/weight_learning.log").read_text()
    for name in ("plan.json", "weights.tsv"):
        assert (rerun / "results/weight_learning" / name).read_bytes() == \
            (finished[0] / "results/weight_learning" / name).read_bytes()
