# lslo: Language-Specific LoRA for multilingual NMT (arXiv 2409.05224), data to figures.
#   snakemake --profile profiles/local                                   the embedded demo (config/config.yaml)
#   snakemake --profile profiles/slurm --configfile config/lang12.yaml   the paper's lang12 setup on SLURM
# Stages: data -> weight_learning -> subspace -> ranks -> finetune -> evaluate -> figures (README.md).

import re
import sys

from snakemake.utils import min_version, validate

from lslo.config import load_yaml, validate_config
from lslo.errors import LsloError

min_version("9.0")


# The demo config is the default; a --configfile (lang12.yaml, lang30.yaml) replaces it instead of being merged
# into it, so the paper setups never inherit the demo's variants.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Refuse duplicate keys (YAML keeps the last duplicate variant silently) and report bad keys by their path;
# snakemake's validate then fills in the schema defaults.
try:
    for path in workflow.configfiles:
        load_yaml(path)
    validate_config(config, "config/schema.yaml")
except LsloError as err:
    sys.exit(str(err))  # one line naming the file/key, no traceback
validate(config, "config/schema.yaml", set_default=True)


report: "workflow/report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    variant="|".join(re.escape(v) for v in {**VARIANTS, **RUNS}),  # ranks: per variant; the rest: per run
    mode="|".join(ISE_MODES),
    shard=r"\d+",


include: "rules/data.smk"
include: "rules/weight_learning.smk"
include: "rules/subspace.smk"
include: "rules/ranks.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/figures.smk"


if REHEARSAL:

    include: "rules/rehearsal.smk"


rule all:
    input:
        all_targets(),
    default_target: True
