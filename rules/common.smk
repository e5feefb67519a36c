# Config checks and small input/param helpers for the stage files (no science: that lives in lslo/).

import re
import sys
from pathlib import Path

from lslo.check_model import workflow_problems
from lslo.jobs import code_hash

# A params entry of every rule: the hash of its script and of every lslo module the script imports
# (lslo.jobs.code_hash), computed once per DAG build. A change in the library code a stage runs reruns the stage
# and its dependents; the profiles leave out the `code` rerun trigger (the script's mtime), so a touched or
# checked-out but unchanged script reruns nothing.
CODE = {path.stem: code_hash(path) for path in Path(workflow.basedir, "workflow/scripts").glob("*.py")}
DEMO = config["data"]["mode"] == "demo"
VARIANTS = config["variants"]
ISE_MODES = ["ise", "lsp"]  # intrinsic subspace estimation (§4.2) and language-specific pruning (§7.3)
FIGURES = [f"figure{i}" for i in range(1, 7)]
SCORE_TABLES = ["table9", "table10"]  # Pearson score vs bitext, encoder / decoder (appendix C)

# Paths every flores-mode run must set, with what belongs there.
REQUIRED_PATHS = {
    "data.flores": "the FLORES-101/200 root directory (holding dev/ and devtest/)",
    "model": "a local HF checkpoint directory (M2M-124 615M, M2M100 or NLLB-200)",
    "eval.spm": "the SentencePiece model of spBLEU (flores101 or flores200 spm)",
}


def config_value(key):
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_config():
    """Stop with one line naming the key to set, before any DAG is built (sys.exit: no traceback)."""
    files = ", ".join(map(str, workflow.overwrite_configfiles)) or "config/config.yaml"
    if not DEMO:
        for key, what in REQUIRED_PATHS.items():
            if not config_value(key):
                sys.exit(f"config key '{key}' is not set ({files}, data.mode flores): set it to {what}")
        # Language codes against the table, the model directory against the languages (lslo check-model).
        table = config["data"]["language_table"] or "config/languages.tsv"
        problems = workflow_problems(config["data"]["languages"], table, config["model"], files)
        if problems:
            sys.exit("\n".join(problems))
    known = set(VARIANTS)
    summary = list((config.get("summary") or {}).values())
    for name, rows in {**config["tables"], "figure3": config["figure3"], "summary": summary}.items():
        unknown = [v for v in rows if v not in known]
        if unknown:
            sys.exit(f"config key '{name}' ({files}) lists unknown variant(s) {unknown}; variants: {sorted(known)}")


PLACEHOLDER = re.compile(r"^['\"]?<[^<>]*>['\"]?$")  # profiles/slurm ships `<your_account>` style values


def check_profile():
    """An unedited profile placeholder stops the run before any job is submitted, naming the profile key."""
    settings = workflow.resource_settings
    keys = [(f"default-resources: {name}", value) for name, value in (settings.default_resources or {}).items()]
    keys += [(f"set-resources: {rule}: {name}", value)
             for rule, values in settings.overwrite_resources.items() for name, value in values.items()]
    for key, value in keys:
        raw = getattr(value, "raw", value)
        if isinstance(raw, str) and PLACEHOLDER.match(raw.strip()):
            sys.exit(f"profile key '{key}' still holds the placeholder {raw}: set it, or delete the line to use "
                     "the cluster's default")


check_config()
check_profile()


# ----------------------------------------------------------------------------- inputs that depend on the mode


def get_flores_root():
    return "results/demo/benchmark" if DEMO else config["data"]["flores"]


def get_language_table():
    if config["data"]["language_table"]:
        return config["data"]["language_table"]
    return "results/demo/languages.tsv" if DEMO else "config/languages.tsv"


def get_model():
    return "results/demo/model" if DEMO else config["model"]


def get_spm():
    return "results/demo/spm.model" if DEMO else config["eval"]["spm"]


# ----------------------------------------------------------------------------- variants and options


def canonical(value):
    """Dicts with sorted keys (recursively): params compare by value, so key order in a config file never
    triggers a rerun."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    return value


def train_options(*overrides):
    """TrainOptions dict: the config's `train` block updated by stage/variant overrides (later wins)."""
    options = dict(config["train"])
    for override in overrides:
        options.update(override or {})
    return canonical(options)


def variant_options(wildcards):
    return train_options(VARIANTS[wildcards.variant]["train"])


def variant_param(key):
    """A params function: the variant's config entry `key` (dicts canonical)."""
    return lambda wildcards: canonical(VARIANTS[wildcards.variant].get(key))


def lslo_variants():
    return [v for v, spec in VARIANTS.items() if spec["method"] == "lslo"]


def variants_pattern(method):
    """A wildcard constraint matching the variants of one method (a pattern that matches nothing if none)."""
    names = [v for v, spec in VARIANTS.items() if spec["method"] == method]
    return "|".join(re.escape(v) for v in names) if names else "(?!)"


def get_finetune_input(wildcards):
    spec = VARIANTS[wildcards.variant]
    inputs = {
        "model": get_model(),
        "train": "results/data/train.tsv",
        "dev": "results/data/test.tsv",  # per-epoch monitoring only (Figure 3); no model selection on it
        "table": get_language_table(),
    }
    if spec["method"] == "lslo":
        inputs["ranks"] = f"results/ranks/{wildcards.variant}.json"
        if spec["index"] == "learned":
            inputs["plan"] = "results/weight_learning/plan.json"
        elif spec["index"].endswith(".json"):  # another run's plan (lslo.finetune.resolve_index_plan)
            inputs["plan"] = spec["index"]
    return inputs


def get_decode_input(wildcards):
    """variant.json and every file it names: new adapters or a new model rerun the decoding."""
    inputs = {"variant": f"results/finetune/{wildcards.variant}/variant.json",
              **finetune_artifacts(wildcards.variant)}
    if VARIANTS[wildcards.variant]["method"] != "full":
        inputs["base"] = get_model()
    return inputs


def get_rank_scores(wildcards):
    if VARIANTS[wildcards.variant]["rank_policy"] == "subspace":
        return "results/subspace/ise/scores.tsv"
    return []


def get_hyps(wildcards):
    return expand(
        "results/evaluate/{variant}/hyps/{shard}.tsv",
        variant=wildcards.variant,
        shard=range(config["eval"]["shards"]),
    )


def groups_of(variants):
    return expand("results/evaluate/{variant}/groups.tsv", variant=variants)


def stats_of(variants):
    return expand("results/evaluate/{variant}/sentence_stats.npz", variant=variants)


def metrics_of(variants):
    return expand("results/finetune/{variant}/metrics.tsv", variant=variants)


def table_labels(variants):
    return [VARIANTS[v]["label"] for v in variants]


# ----------------------------------------------------------------------------- targets


def finetune_artifacts(variant):
    """The files a finetune job writes besides variant.json and metrics.tsv, by method (rules/finetune.smk)."""
    method = VARIANTS[variant]["method"]
    return {"lslo": {"adapters": f"results/finetune/{variant}/adapters.safetensors"},
            "full": {"model": f"results/finetune/{variant}/model"}}.get(method, {})


def stage_files():
    """Every file one stage writes and a later one reads. Snakemake regenerates a missing intermediate file only
    when a job that reads it has to run, or when a target needs it: as inputs of `all`, a deleted adapter file
    (or plan, rank file, hyps shard, ...) is seen by `snakemake -n` and reruns its job and the jobs after it."""
    files = [
        "results/data/train.tsv", "results/data/test.tsv",
        "results/weight_learning/weights.tsv", "results/weight_learning/plan.json",
        *expand("results/subspace/{mode}/scores.tsv", mode=ISE_MODES),
        *expand("results/ranks/{variant}.json", variant=lslo_variants()),
        *expand("results/finetune/{variant}/{name}", variant=VARIANTS, name=["variant.json", "metrics.tsv"]),
        *expand("results/evaluate/{variant}/hyps/{shard}.tsv", variant=VARIANTS,
                shard=range(config["eval"]["shards"])),
    ]
    for variant in VARIANTS:
        files += finetune_artifacts(variant).values()
    if DEMO:
        files += ["results/demo/benchmark", "results/demo/languages.tsv", "results/demo/model",
                  "results/demo/spm.model"]
    return files


def all_targets():
    return [
        *expand("results/figures/{figure}.png", figure=FIGURES),
        *expand("results/tables/{table}.{ext}", table=[*config["tables"], *SCORE_TABLES], ext=["tsv", "md"]),
        *groups_of(VARIANTS),
        *stage_files(),
        *(["results/summary.md"] if config.get("summary") else []),
    ]

