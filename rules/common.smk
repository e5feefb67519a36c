# Config checks and small input/param helpers for the stage files (no science: that lives in lslo/).

import re
import sys
from pathlib import Path

from lslo.check_model import workflow_problems
from lslo.checkpoint import files_identity, model_identity
from lslo.errors import LsloError
from lslo.code_identity import code_hash
from lslo.languages import file_code, language_rows, read_language_table, select
from lslo.options import REHEARSAL_DIR, RehearsalOptions, TrainOptions
from lslo.variant import METHODS

# config `rehearse` (lslo.rehearsal): every stage of this config on its model and data, cut to a few updates and
# sentences, measured, and projected to the full run in results/rehearsal/report.md. Every path a rule writes is
# under RESULTS (its logs too), so a rehearsal shares no file, and no file record in .snakemake/, with the real
# run: the real run after it starts from scratch. Paths the user brings (model, FLORES, spm, language table) are
# the same in both.
try:
    REHEARSAL = RehearsalOptions.from_config(config.get("rehearse"))
except LsloError as err:
    sys.exit(str(err))
RESULTS = REHEARSAL_DIR if REHEARSAL else "results"
LOGS = f"{RESULTS}/logs" if REHEARSAL else "logs"


def result_path(path):
    """`path` under the run's results directory: results/, or results/rehearsal/ in a rehearsal."""
    return f"{RESULTS}/{path}"


def log_path(path):
    """`path` under the run's log directory: logs/, or results/rehearsal/logs/ in a rehearsal."""
    return f"{LOGS}/{path}"


# A params entry of every rule: the hash of its script and of every lslo module the script imports
# (lslo.code_identity.code_hash), computed once per DAG build. A change in the library code a stage runs reruns the stage
# and its dependents; the profiles leave out the `code` rerun trigger (the script's mtime), so a touched or
# checked-out but unchanged script reruns nothing.
CODE = {path.stem: code_hash(path) for path in Path(workflow.basedir, "workflow/scripts").glob("*.py")}
DEMO = config["data"]["mode"] == "demo"
VARIANTS = config["variants"]  # the declared variants: ranks and tables are per variant
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
    keys += [
        (f"set-resources: {rule}: {name}", value)
        for rule, values in settings.overwrite_resources.items()
        for name, value in values.items()
    ]
    for key, value in keys:
        raw = getattr(value, "raw", value)
        if isinstance(raw, str) and PLACEHOLDER.match(raw.strip()):
            sys.exit(
                f"profile key '{key}' still holds the placeholder {raw}: set it, or delete the line to use "
                "the cluster's default"
            )


check_config()
check_profile()


# ----------------------------------------------------------------------------- runs: a variant once per seed
# config `seeds`: every variant that trains is fine-tuned, decoded and scored once per seed, each such run a
# `variant` wildcard value of its own. The run with the variant's own train.seed keeps the variant's name, so a
# one-seed run's paths and results stay what they are; seed s of variant v is the run "v.seed<s>". Adding a seed
# adds that seed's jobs only; removing one removes its run from the targets and deletes nothing. Everything before
# fine-tuning (data, weight learning, subspace, ranks) and the untrained Pretrain runs once.


def variant_runs(variants, seeds):
    """({run: spec}, {run: variant}, {run: seed}); stops with one line naming the variant on a conflict."""
    files = ", ".join(map(str, workflow.overwrite_configfiles)) or "config/config.yaml"
    runs, run_variant, run_seed = {}, {}, {}
    for variant, spec in variants.items():
        own = spec.get("train") or {}
        if seeds is not None and "seed" in own:
            sys.exit(
                f"config key 'variants.{variant}.train.seed' ({files}): set with `seeds` {seeds}; a variant "
                "trains once per seed of `seeds`: drop its train.seed, or set `seeds: null`"
            )
        seed = {**config["train"], **own}.get("seed", TrainOptions.seed)
        if seeds is None or not METHODS[spec["method"]].trains:
            runs[variant], run_variant[variant], run_seed[variant] = spec, variant, seed
            continue
        for s in seeds:
            # the variant's own seed keeps its spec as it is: its options, and so its results, stay the one-seed run's
            run = variant if s == seed else f"{variant}.seed{s}"
            if run != variant and run in variants:
                sys.exit(
                    f"config key 'seeds' ({files}): seed {s} of variant '{variant}' is the run '{run}', which is "
                    f"also a declared variant; rename variant '{run}'"
                )
            runs[run] = spec if run == variant else {**spec, "train": {**own, "seed": s}}
            run_variant[run], run_seed[run] = variant, s
    return runs, run_variant, run_seed


SEEDS = None if config.get("seeds") is None else [int(seed) for seed in config["seeds"]]  # --config: strings
RUNS, RUN_VARIANT, RUN_SEED = variant_runs(VARIANTS, SEEDS)


def runs_of(variant):
    """The runs of a declared variant, in seed order."""
    return [run for run, of in RUN_VARIANT.items() if of == variant]


# ----------------------------------------------------------------------------- inputs that depend on the mode


def get_flores_root():
    return result_path("demo/benchmark") if DEMO else config["data"]["flores"]


def get_language_table():
    if config["data"]["language_table"]:
        return config["data"]["language_table"]
    return result_path("demo/languages.tsv") if DEMO else "config/languages.tsv"


def get_model():
    return result_path("demo/model") if DEMO else config["model"]


def get_spm():
    return result_path("demo/spm.model") if DEMO else config["eval"]["spm"]


# ----------------------------------------------------------------------------- inputs by content
# Snakemake compares a file's mtime (and, for a newer file, its checksum), and of a directory only the
# directory's own mtime, which a file rewritten inside it does not change. So in flores mode every input the user
# brings is also tracked by content, in params: the FLORES files of the run's languages, the base model
# (lslo.checkpoint.model_identity: config, tokenizer, tensor headers and samples) and the spBLEU SentencePiece
# model. An edit in place, an mtime-keeping copy (cp -p, rsync -a, tar x) or another model under the same path
# reruns every stage that read it. Computed once per DAG build. In demo mode the pipeline writes these files
# itself, and Snakemake's own provenance reruns what follows a job that ran again (None: nothing to compare).


def flores_files():
    """flores mode: the dev and devtest file of every run language, as the data stage finds them (the layout
    detected once here when data.layout is auto); a missing file stops the run with one line naming it."""
    from lslo.data import LAYOUTS, SPLIT_FILES, detect_layout, flores_path

    root, layout = config["data"]["flores"], config["data"]["layout"]
    try:
        table = read_language_table(get_language_table())
        codes = select(table, config["data"]["languages"])
        if layout == "auto":
            layout = detect_layout(root, table, codes)
        paths = [
            (code, flores_path(root, layout, file_code(table, code, LAYOUTS[layout][0]), split))
            for code in codes
            for split in SPLIT_FILES.values()
        ]
    except LsloError as err:
        sys.exit(f"config key 'data.flores': {err}")
    for code, path in paths:
        if not path.is_file():
            sys.exit(f"config key 'data.flores': {path}: FLORES file for language '{code}' not found")
    return [str(path) for _, path in paths]


def content_identities():
    if DEMO:
        return [], None, None, None
    files = flores_files()
    spm = Path(get_spm())
    if not spm.is_file():
        sys.exit(f"config key 'eval.spm': {spm}: SentencePiece model file not found")
    return files, files_identity(files, root=get_flores_root()), model_identity(get_model()), files_identity([spm])


FLORES_FILES, FLORES_IDENTITY, MODEL_IDENTITY, SPM_IDENTITY = content_identities()


# Params are compared with the record Snakemake keeps in .snakemake/. A results/ directory copied without it (cp -a
# results/ next to another model) has no record, and mtimes alone see nothing. So each identity also names a stamp
# file, results/inputs/<kind>-<identity>.json (rule input_identity), which the rules that read the input take as an
# input: another model is another stamp, missing until it is written, and its new file reruns every stage that
# read the model, with or without the record.
def identity_stamp(kind, identity):
    return result_path(f"inputs/{kind}-{identity[:16]}.json") if identity else []


STAMPS = {"flores": FLORES_IDENTITY, "model": MODEL_IDENTITY, "spm": SPM_IDENTITY}
FLORES_STAMP, MODEL_STAMP, SPM_STAMP = (identity_stamp(kind, identity) for kind, identity in STAMPS.items())

# The language-table columns each stage reads (every reader also validates code and resource). A rule's params
# hold these columns of the run's languages, and the table itself is no input in flores mode: a name, a bitext
# count of a language that no Table 9/10 uses, or a language outside the run reruns nothing. In demo mode the
# table is also an input, as rule demo_benchmark writes it.
TABLE_COLUMNS = {
    "data": ["code", "flores101", "flores200", "floresplus"],  # which files (and, by `subsets`, which languages)
    "train": ["code", "resource", "nllb"],  # resource groups (dev H2H/V2V, LSLo groups), NLLB language tokens
    "ranks": ["code", "resource"],
    "decode": ["code"],  # the directions; the variant's own variant.json holds its NLLB codes
    "score": ["code", "resource"],  # group pairs
    "score_table": ["code", "resource", "bitext"],  # Tables 9, 10: bitext with English
}
_ROWS = {}


def table_rows(stage):
    """A params function: the run's rows of the language table, with the columns `stage` reads. Evaluated when
    the DAG is built and again just before the job runs. In demo mode the table may not be written yet, or not be
    readable: then the reason, as a string, stands in for the rows (lslo.languages.row_codes raises it in a job
    that gets it); the job after demo_benchmark reads the rows. Cached by the table's path, mtime and size."""
    columns = TABLE_COLUMNS[stage]

    def rows(wildcards):
        path = Path(get_language_table())
        if DEMO and not path.is_file():
            return f"{path}: language table not written yet"
        key = (str(path), path.stat().st_mtime_ns, path.stat().st_size, stage)
        if key not in _ROWS:
            try:
                _ROWS[key] = language_rows(path, config["data"]["languages"], columns)
            except (LsloError, ValueError) as err:  # pandas: an empty or malformed file
                if not DEMO:  # flores mode: check_config has read this table already
                    raise
                _ROWS[key] = f"{path}: language table not readable ({err})"
        return _ROWS[key]

    return rows


def table_input():
    """The language table as an input: demo mode only (the demo_benchmark job writes it)."""
    return get_language_table() if DEMO else []


def path_of(get_path):
    """A params function giving a path the job reads whose content is tracked otherwise (the table by a stage's
    `languages` rows, the FLORES files as inputs and by content). A function of `input`, so Snakemake does not
    record it as a param: the same content under another path reruns nothing."""
    return lambda wildcards, input: get_path()


# ----------------------------------------------------------------------------- variants and options


def canonical(value):
    """Dicts with sorted keys (recursively): params compare by value, so key order in a config file never
    triggers a rerun."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    return value


def train_options(*overrides, full_run=False):
    """TrainOptions dict: the config's `train` block updated by stage/variant overrides (later wins). The dev
    scores decode with the evaluate stage's beam search (eval.search) unless a `train` block says otherwise. In a
    rehearsal, cut to its updates and dev sentences, unless full_run (what the real run will train)."""
    options = {"dev_search": config["eval"]["search"], **config["train"]}
    for override in overrides:
        options.update(override or {})
    if REHEARSAL and not full_run:
        options = REHEARSAL.train_options(options)
    return canonical(options)


def variant_options(wildcards):
    """The training options of a declared variant (the ranks rule: its epochs)."""
    return train_options(VARIANTS[wildcards.variant]["train"])


# The options the untrained base model's dev scores read (lslo.train.dev_scores): a pretrain variant depends on
# nothing else of the `train` block.
PRETRAIN_OPTIONS = ["dev_sentences", "dev_beam", "dev_search"]


def finetune_options(run, full_run=False):
    options = train_options(RUNS[run]["train"], full_run=full_run)
    if not METHODS[RUNS[run]["method"]].trains:
        return {key: options[key] for key in PRETRAIN_OPTIONS if key in options}
    return options


def stage_options(full_run=False):
    """{stage: train options} of every training stage (weight learning, the two subspace modes, each run)."""
    return {
        "weight_learning": train_options(config["weight_learning"]["train"], full_run=full_run),
        "subspace": train_options(config["subspace"]["train"], full_run=full_run),
        **{run: finetune_options(run, full_run) for run in RUNS},
    }


# The `eval` options the rules read: a rehearsal decodes its first sentences with a short length cap.
EVAL = REHEARSAL.eval_options(config["eval"]) if REHEARSAL else config["eval"]


def dev_file(options):
    """The dev subset a training stage reads: the first `dev_sentences` devtest sentences, a file of their own
    (written by the dev_set rule), so that eval.max_sentences, which cuts the test table, retrains nothing;
    results/data/dev/all.tsv for dev_sentences null (the whole devtest); [] for 0 (no dev scores)."""
    n = options.get("dev_sentences", TrainOptions.dev_sentences)
    if n is None:
        return result_path("data/dev/all.tsv")
    return result_path(f"data/dev/{n}.tsv") if n else []


def variant_param(key):
    """A params function of the per-variant ranks rule, the variant's config entry `key` (dicts canonical)."""
    return lambda wildcards: canonical(VARIANTS[wildcards.variant].get(key))


def run_param(key):
    """A params function of the per-run rules finetune and score, the run's variant entry `key` (dicts canonical)."""
    return lambda wildcards: canonical(RUNS[wildcards.variant].get(key))


def lslo_variants():
    return [v for v, spec in VARIANTS.items() if spec["method"] == "lslo"]


def variants_pattern(method):
    """A wildcard constraint matching the runs of one method's variants (a pattern that matches nothing if none)."""
    names = [run for run, spec in RUNS.items() if spec["method"] == method]
    return "|".join(re.escape(v) for v in names) if names else "(?!)"


def get_finetune_input(wildcards):
    spec = RUNS[wildcards.variant]
    inputs = {
        "model": get_model(),
        "model_stamp": MODEL_STAMP,
        "train": result_path("data/train.tsv"),
        "dev": dev_file(finetune_options(wildcards.variant)),  # per-epoch monitoring only (Figure 3)
        "table": table_input(),
    }
    if spec["method"] == "lslo":
        inputs["ranks"] = result_path(f"ranks/{RUN_VARIANT[wildcards.variant]}.json")  # one per variant, all seeds
        if spec["index"] == "learned":
            inputs["plan"] = result_path("weight_learning/plan.json")
        elif spec["index"].endswith(".json"):  # another run's plan (lslo.finetune.resolve_index_plan)
            inputs["plan"] = spec["index"]
    return inputs


def get_decode_input(wildcards):
    """variant.json and every file it names: new adapters or a new model rerun the decoding. The base model is
    read by every method (its tokenizer; Ft-all's weights are its own model/)."""
    return {
        "variant": result_path(f"finetune/{wildcards.variant}/variant.json"),
        **finetune_artifacts(wildcards.variant),
        "base": get_model(),
        "model_stamp": MODEL_STAMP,
    }


def get_rank_scores(wildcards):
    if VARIANTS[wildcards.variant]["rank_policy"] == "subspace":
        return result_path("subspace/ise/scores.tsv")
    return []


def get_hyps(wildcards):
    return expand(
        result_path("evaluate/{variant}/hyps/{shard}.tsv"),
        variant=wildcards.variant,
        shard=range(config["eval"]["shards"]),
    )


def groups_of(runs):
    return expand(result_path("evaluate/{variant}/groups.tsv"), variant=runs)


def stats_of(runs):
    return expand(result_path("evaluate/{variant}/sentence_stats.npz"), variant=runs)


def metrics_of(runs):
    return expand(result_path("finetune/{variant}/metrics.tsv"), variant=runs)


def rows_runs(variants):
    """Every run of the rows `variants` of a table or figure, row after row (their scripts split them back by
    run_counts)."""
    return [run for variant in variants for run in runs_of(variant)]


def run_counts(variants):
    return [len(runs_of(variant)) for variant in variants]


def variant_cost_runs(variant):
    """What training one variant took, per run (lslo.cost.variant_cost): the `benchmark:` file and metrics.tsv of
    each job that trained for it: its finetune, and the weight learning of a learned index plan and the ISE run of
    the subspace rank policy, which every seed shares. None for a variant that does not train (Pretrain).
    Read by path, not as inputs: a benchmark file is an output of its training job, so as an input a missing one
    would retrain the variant; the table prints "-" instead."""
    spec = VARIANTS[variant]
    if not METHODS[spec["method"]].trains:
        return None
    shared_benchmarks, shared_metrics = [], []
    if spec["method"] == "lslo" and spec["index"] == "learned":
        shared_benchmarks.append(result_path("benchmarks/weight_learning.tsv"))
        shared_metrics.append(result_path("checkpoints/weight_learning/wl/metrics.tsv"))
    if spec["method"] == "lslo" and spec["rank_policy"] == "subspace":
        shared_benchmarks.append(result_path("benchmarks/subspace/ise.tsv"))
        shared_metrics.append(result_path("checkpoints/subspace/ise/metrics.tsv"))
    return [
        {
            "benchmarks": [result_path(f"benchmarks/finetune/{run}.tsv"), *shared_benchmarks],
            "metrics": [result_path(f"finetune/{run}/metrics.tsv"), *shared_metrics],
        }
        for run in runs_of(variant)
    ]


def learned_plan_of(table):
    """Table 3 (the index strategies) with a WL row: its notes compare the learned plan with the paper's."""
    if table == "table3" and any(VARIANTS[v].get("index") == "learned" for v in config["tables"][table]):
        return result_path("weight_learning/plan.json")
    return []


def table_labels(variants):
    return [VARIANTS[v]["label"] for v in variants]


# ----------------------------------------------------------------------------- rehearsal (lslo.rehearsal)
# In a rehearsal every rule runs its script through workflow/scripts/rehearsed.py, which measures the job into its
# `clock` output; outside one, rules run their scripts as they are and have no clock.


def stage_script(name):
    """A rule's script: workflow/scripts/<name>.py, or in a rehearsal rehearsed.py, which runs it measured."""
    return f"../workflow/scripts/{'rehearsed' if REHEARSAL else name}.py"


def rehearsal_params(script, timed=False):
    """A rehearsal's params of a rule: its own script, and whether its updates and decoding batches are timed."""
    return {"stage_script": script, "timed": timed} if REHEARSAL else {}


def clock_path(job):
    return result_path(f"clocks/{job}.json")


def rehearsal_clock(job):
    """A rehearsal's output of a rule: the job's clock (lslo.rehearsal.measured_job)."""
    return {"clock": clock_path(job)} if REHEARSAL else {}


def demo_pretrain_steps():
    steps = config["demo"]["pretrain_steps"]
    return min(steps, REHEARSAL.updates) if REHEARSAL else steps


def rehearsal_plans():
    """{the clock of every job of the rehearsal: what the full run does in that job} (lslo.rehearsal.projected_row):
    the full run's training options of each training job, its sentences and length cap of each decode job."""
    measured = {"kind": "measured"}
    rehearsed, full = stage_options(), stage_options(full_run=True)
    dev_default = TrainOptions.dev_sentences

    def training(stage, trains=True):
        return {
            "kind": "train",
            "trains": trains,
            "options": full[stage],
            "dev_sentences": full[stage].get("dev_sentences", dev_default),
            "rehearsed_dev_sentences": rehearsed[stage].get("dev_sentences", dev_default),
        }

    jobs = {}
    if DEMO:
        jobs["demo_benchmark"] = measured
        jobs["demo_pretrain"] = {"kind": "pretrain", "updates": config["demo"]["pretrain_steps"]}
    else:
        jobs.update({f"input_identity/{kind}-{identity[:16]}": measured for kind, identity in STAMPS.items()})
    jobs["data"] = jobs["test_set"] = measured
    jobs.update({f"dev_set/{Path(path).stem}": measured for path in map(dev_file, rehearsed.values()) if path})
    jobs["weight_learning"] = training("weight_learning")
    jobs.update({f"subspace/{mode}": training("subspace") for mode in ISE_MODES})
    jobs.update({f"ranks/{variant}": measured for variant in lslo_variants()})
    decoding = {
        "kind": "decode",
        "sentences": config["eval"]["max_sentences"],
        "rehearsed_sentences": EVAL["max_sentences"],
        "max_len_a": config["eval"]["max_len_a"],
        "max_len_b": config["eval"]["max_len_b"],
    }
    for run in RUNS:
        jobs[f"finetune/{run}"] = training(run, METHODS[RUNS[run]["method"]].trains)
        jobs[f"decoding_options/{run}"] = jobs[f"score/{run}"] = measured
        jobs.update({f"decode/{run}/{shard}": decoding for shard in range(config["eval"]["shards"])})
    jobs["figure1"] = jobs["figure3"] = measured
    jobs.update({f"score_figure/{figure}": measured for figure in SCORE_FIGURES})
    jobs.update({f"table/{table}": measured for table in config["tables"]})
    jobs.update({f"score_table/{table}": measured for table in SCORE_TABLES})
    if config.get("summary"):
        jobs["summary"] = measured
    return {clock_path(job): canonical(plan) for job, plan in jobs.items()}


# ----------------------------------------------------------------------------- targets


def finetune_artifacts(run):
    """The file a finetune job writes besides variant.json and metrics.tsv, by method (lslo.variant.METHODS)."""
    return artifact_output(RUNS[run]["method"], run)


def artifact_output(method, variant="{variant}"):
    """{variant.json field: path} of what a method's finetune job writes (rules/finetune.smk declares it)."""
    spec = METHODS[method]
    return {spec.artifact: result_path(f"finetune/{variant}/{spec.artifact_path}")} if spec.artifact else {}


def stage_files():
    """Every file one stage writes and a later one reads, and the input stamps (flores mode). Snakemake
    regenerates a missing intermediate file only when a job that reads it has to run, or when a target needs it:
    as inputs of `all`, a deleted adapter file (or plan, rank file, hyps shard, ...) is seen by `snakemake -n` and
    reruns its job and the jobs after it."""
    files = [
        result_path("data/train.tsv"),
        result_path("data/devtest.tsv"),
        result_path("data/test.tsv"),
        *sorted({path for path in map(dev_file, stage_options().values()) if path}),
        result_path("weight_learning/weights.tsv"),
        result_path("weight_learning/plan.json"),
        *expand(result_path("subspace/{mode}/scores.tsv"), mode=ISE_MODES),
        *expand(result_path("ranks/{variant}.json"), variant=lslo_variants()),
        *expand(
            result_path("finetune/{variant}/{name}"),
            variant=RUNS,
            name=["variant.json", "metrics.tsv", "decoding.json"],
        ),
        *expand(
            result_path("evaluate/{variant}/hyps/{shard}.tsv"), variant=RUNS, shard=range(config["eval"]["shards"])
        ),
        *expand(
            result_path("evaluate/{variant}/{name}"),
            variant=RUNS,
            name=["directions.tsv", "groups.signature.json", "sentence_stats.npz"],
        ),
    ]
    for run in RUNS:
        files += finetune_artifacts(run).values()
    if DEMO:
        files += [
            result_path("demo/benchmark"),
            result_path("demo/languages.tsv"),
            result_path("demo/model"),
            result_path("demo/spm.model"),
        ]
    else:  # a missing stamp (another model, FLORES or spm) is written, and what read the input reruns after it
        files += [FLORES_STAMP, MODEL_STAMP, SPM_STAMP]
    return files


def all_targets():
    return [
        *expand(result_path("figures/{figure}.png"), figure=FIGURES),
        *expand(result_path("tables/{table}.{ext}"), table=[*config["tables"], *SCORE_TABLES], ext=["tsv", "md"]),
        *groups_of(RUNS),
        *stage_files(),
        *([result_path("summary.md")] if config.get("summary") else []),
        *([result_path("report.md")] if REHEARSAL else []),
    ]
