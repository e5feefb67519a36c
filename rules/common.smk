# Config checks and small input/param helpers for the stage files (no science: that lives in lslo/).

import sys

import lslo

LSLO_VERSION = lslo.__version__  # a params entry of every rule: a library release reruns the stages
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
    known = set(VARIANTS)
    summary = list((config.get("summary") or {}).values())
    for name, rows in {**config["tables"], "figure3": config["figure3"], "summary": summary}.items():
        unknown = [v for v in rows if v not in known]
        if unknown:
            sys.exit(f"config key '{name}' ({files}) lists unknown variant(s) {unknown}; variants: {sorted(known)}")


check_config()


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


def all_targets():
    return [
        *expand("results/figures/{figure}.png", figure=FIGURES),
        *expand("results/tables/{table}.{ext}", table=[*config["tables"], *SCORE_TABLES], ext=["tsv", "md"]),
        *groups_of(VARIANTS),
        *(["results/summary.md"] if config.get("summary") else []),
    ]
