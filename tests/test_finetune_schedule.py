"""Ft-all's schedule has its own block (the variant's `train`), and stating it there changes no run: the options
the finetune rules pass are the ones they passed when Ft-all took the schedule from the shared `train` block.

The options are read from the workflow itself: a Snakefile that includes ours writes finetune_options(variant),
what the finetune rules pass as their `options` param, for every variant, at DAG-building time.
"""

import copy
import json

import pytest
import yaml
from test_workflow import copy_workflow, paper_paths, snakemake

from lslo.train import TrainOptions

PROBE = """include: "Snakefile"

import json as _json

Path("finetune_options.json").write_text(_json.dumps({v: finetune_options(v) for v in VARIANTS}))
"""


def rule_options(workdir, config: dict, *args) -> dict:
    """{variant: the options param of its finetune rule} for this config."""
    (workdir / "probe.smk").write_text(PROBE)
    (workdir / "config" / "probe.yaml").write_text(yaml.safe_dump(config))
    (workdir / "finetune_options.json").unlink(missing_ok=True)
    snakemake(workdir, "results/data/test.tsv", "-s", "probe.smk", "-n", "--configfile", "config/probe.yaml", *args)
    return json.loads((workdir / "finetune_options.json").read_text())


def shared_schedule(config: dict) -> dict:
    """The config as it was before Ft-all had its own schedule: its `train` held the lr only."""
    old = copy.deepcopy(config)
    old["variants"]["ft-all"]["train"].pop("warmup_updates")
    return old


@pytest.mark.parametrize("name, lr, warmup", [("config", 2.0e-4, 10), ("lang12", 1.0e-4, 1)])
def test_ft_all_schedule_block_keeps_the_rule_options(tmp_path, name, lr, warmup):
    workdir = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((workdir / "config" / f"{name}.yaml").read_text(encoding="utf-8"))
    args = paper_paths(tmp_path) if name != "config" else []
    assert config["variants"]["ft-all"]["method"] == "full"
    # the block states today's values: the shared warmup, the paper's (or the demo's) Ft-all lr
    assert config["variants"]["ft-all"]["train"]["warmup_updates"] == config["train"]["warmup_updates"] == warmup
    now, before = rule_options(workdir, config, *args), rule_options(workdir, shared_schedule(config), *args)
    assert now == before  # every variant's params: nothing reruns
    options = TrainOptions.from_dict(now["ft-all"], "ft-all")
    assert options == TrainOptions.from_dict(before["ft-all"], "ft-all")
    assert (options.lr, options.warmup_updates) == (lr, warmup)
    # and the block is Ft-all's own: another warmup there reaches Ft-all's rule and no other variant's
    changed = copy.deepcopy(config)
    changed["variants"]["ft-all"]["train"]["warmup_updates"] = warmup + 100
    after = rule_options(workdir, changed, *args)
    assert after["ft-all"]["warmup_updates"] == warmup + 100
    assert {v: o for v, o in after.items() if v != "ft-all"} == {v: o for v, o in now.items() if v != "ft-all"}
