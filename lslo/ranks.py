"""Per-language LSLo ranks and pruning ratios: the `ranks` stage (between subspace estimation and fine-tuning).

Two policies produce the same plan (results/ranks/{variant}.json, docs/formats.md):

    {"policy": "resource" | "subspace",
     "ranks": {lang: r},              # LSLo rank of every language (eq. 3, r_l)
     "prune": {lang: P_l},            # GPS target ratio per language; 0.0 = not pruned
     "gps": {"start": E, "duration": k,           # eq. 4 schedule shared by the pruned languages,
             "matrices": [A, B] | [B] | [A],      # the LoRA matrices GPS prunes,
             "pool": "tensor" | "language"} | null,   # one L1 threshold per matrix or per language
     "groups": {lang: H|M|L|V},       # resource group, for the record
     "scores": {lang: excess} | null}  # subspace policy only: the per-language demand it used

`resource` (the paper, §6.3): ranks by resource group ({H;M;V} = 2;2;8) and GPS on the chosen groups (H and M)
with one target ratio P.

`subspace` (automatic, from the ISE scores of §4.2, eq. 6): for each language l,
    pruned_l = sum(n_pruned) / sum(n_params) over all its B matrices (every side, layer, module),
    P        = the ISE target, recovered from the scores themselves: score = n_pruned - P * n_params,
    excess_l = pruned_l - P = sum(score) / sum(n_params)   (the mean Score(B) normalised by #B).
A language with excess_l > threshold (default 0: global pruning took more than P from it, so its intrinsic
subspace is small, like the H and M languages of Figure 2) gets `small_rank` and GPS with target
min(max_ratio, pruned_l) = min(0.9, P + excess_l), i.e. it is pruned as hard as ISE pruned it; every other
language gets `large_rank` and is not pruned.
"""

from __future__ import annotations

import logging
import os

import pandas as pd

from lslo.config import schema_errors
from lslo.errors import LsloError
from lslo.io import read_json, write_json
from lslo.languages import RESOURCE_GROUPS, read_language_table, select
from lslo.pruning import MATRICES, check_ratio, validate_gps

log = logging.getLogger(__name__)

POLICIES = ("resource", "subspace")
# Fine-tuning GPS's scope (config gps.matrices, gps.pool): gps.pool -> the scope of lslo.pruning.prune. The defaults
# are torch's l1_unstructured on every A and B (the paper's footnote 1).
GPS_POOLS = {"tensor": "matrix", "language": "language"}
GPS_SCOPE_DEFAULTS = {"matrices": list(MATRICES), "pool": "tensor"}
SUBSPACE_DEFAULTS = {"small_rank": 2, "large_rank": 8, "threshold": 0.0, "max_ratio": 0.9}
SCORE_COLUMNS = ["language", "side", "layer", "module", "n_params", "n_pruned", "score"]


def assign_ranks(policy: str, language_table, languages, group_ranks: dict | None, gps: dict | None,
                 scores_tsv=None, subspace_options: dict | None = None, out_json=None,
                 epochs: int | None = None) -> dict:
    """Build the rank/pruning plan of one LSLo variant; write it to `out_json` (if given) and return it.

    `gps` = {"groups": [...], "ratio": P, "start": E, "duration": k, "matrices": [...], "pool": ...} or None (no
    pruning; matrices and pool default to [A, B] and tensor, lslo.pruning.gps_scope); `epochs` (T), when given,
    is checked against E + k <= T. The subspace policy reads `scores_tsv` and ignores `group_ranks`
    and gps["groups"/"ratio"] (it derives them; see the module docstring).
    """
    table = read_language_table(language_table)
    codes = select(table, languages)
    groups = {code: table.loc[code, "resource"] for code in codes}
    schedule = _check_schedule(gps, epochs)
    if policy == "resource":
        plan = _resource_plan(groups, group_ranks, gps)
    elif policy == "subspace":
        if scores_tsv is None:
            raise LsloError("rank policy 'subspace' needs the ISE scores (scores_tsv = results/subspace/scores.tsv)")
        options = _subspace_options(subspace_options)
        plan = _subspace_plan(read_scores(scores_tsv, codes), codes, options, pruning=schedule is not None)
    else:
        raise LsloError(f"rank policy is '{policy}', expected one of {list(POLICIES)}")
    plan = {"policy": policy, **plan, "gps": schedule, "groups": groups}
    if schedule is None:
        plan["prune"] = {code: 0.0 for code in codes}
    if out_json is not None:
        validate_rank_plan(plan, codes, out_json)
        write_json(plan, out_json)
    return plan


def rank_plan_schema(languages: list[str]) -> dict:
    """JSON schema of results/ranks/{variant}.json for a run over `languages` (docs/formats.md): a rank for every
    language, and no language outside the list. The ranks stage writes every field; a hand-written plan needs
    ranks, prune and gps."""
    language_keys = {"propertyNames": {"enum": list(languages)}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "required": ["ranks", "prune", "gps"],  # what fine-tuning reads; policy, groups, scores are the record
        "properties": {
            "policy": {"enum": list(POLICIES)},
            "ranks": {"type": "object", **language_keys, "required": list(languages),
                      "additionalProperties": {"type": "integer", "minimum": 1}},
            "prune": {"type": "object", **language_keys,
                      "additionalProperties": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}},
            "gps": {"type": ["object", "null"], "additionalProperties": False, "required": ["start", "duration"],
                    "properties": {"start": {"type": "integer", "minimum": 0},
                                   "duration": {"type": "integer", "minimum": 1},
                                   "matrices": {"type": "array", "items": {"enum": list(MATRICES)},
                                                "minItems": 1, "uniqueItems": True},
                                   "pool": {"enum": list(GPS_POOLS)}}},
            "groups": {"type": "object", **language_keys, "additionalProperties": {"enum": RESOURCE_GROUPS}},
            "scores": {"type": ["object", "null"], **language_keys, "additionalProperties": {"type": "number"}},
        },
    }


def validate_rank_plan(plan, languages: list[str], source) -> None:
    """Check a rank plan (possibly edited by hand) against `rank_plan_schema`; one line per violation."""

    lines = schema_errors(plan, rank_plan_schema(languages), what="field")
    if lines:
        raise LsloError(f"{source}: invalid rank plan (languages {list(languages)}):\n  " + "\n  ".join(lines))


def read_rank_plan(ranks_json, codes: list[str], epochs: int) -> tuple[dict, dict, dict | None]:
    """(ranks, GPS target per language, {"start", "duration", "matrices", "pool"} or None) from
    results/ranks/{variant}.json; a plan without matrices or pool gets their defaults ([A, B], tensor)."""
    if not ranks_json:
        raise LsloError("method 'lslo' needs ranks_json (results/ranks/{variant}.json)")
    plan = read_json(ranks_json)
    validate_rank_plan(plan, codes, ranks_json)  # a hand-edited plan: one line per schema violation
    ranks, targets = plan["ranks"], plan["prune"]
    targets = {code: float(targets.get(code, 0.0)) for code in codes}
    schedule = plan.get("gps")
    if schedule:
        schedule = {"start": schedule["start"], "duration": schedule["duration"],
                    **gps_scope(schedule.get("matrices"), schedule.get("pool"))}
    if any(targets.values()):
        if not schedule:
            raise LsloError(f"{ranks_json}: languages have pruning targets but field 'gps' is empty")
        for target in set(targets.values()):
            validate_gps(target, schedule["start"], schedule["duration"], epochs)
    return {code: ranks[code] for code in codes}, targets, schedule


def gps_scope(matrices=None, pool=None) -> dict:
    """The checked pruning scope of fine-tuning GPS: {"matrices": [...], "pool": "tensor" | "language"}.

    ``matrices`` (config ``gps.matrices``, default [A, B]) are the LoRA matrices GPS prunes; ``pool`` (``gps.pool``,
    default tensor) is where one L1 threshold applies: "tensor" = each matrix on its own (torch's
    ``l1_unstructured``, the paper's footnote 1), "language" = all of one language's chosen matrices at every site
    together (torch's ``global_unstructured`` over them). Matrices come back in A, B order, the order of a pool's
    entries (it decides which of equal |w| go first), so [B, A] and [A, B] are one scope.
    """
    matrices = GPS_SCOPE_DEFAULTS["matrices"] if matrices is None else matrices
    pool = GPS_SCOPE_DEFAULTS["pool"] if pool is None else pool
    if (not isinstance(matrices, (list, tuple)) or not matrices or not all(m in MATRICES for m in matrices)
            or len(set(matrices)) != len(matrices)):
        raise LsloError(f"gps.matrices is {matrices!r}, expected a non-empty list of {list(MATRICES)}, each once")
    if not isinstance(pool, str) or pool not in GPS_POOLS:
        raise LsloError(f"gps.pool is {pool!r}, expected one of {list(GPS_POOLS)}")
    return {"matrices": [m for m in MATRICES if m in matrices], "pool": pool}


def _check_schedule(gps: dict | None, epochs: int | None) -> dict | None:
    if gps is None:
        return None
    missing = [key for key in ("start", "duration") if key not in gps]
    if missing:
        raise LsloError(f"gps: missing field(s) {missing}; expected groups, ratio, start, duration (and optionally "
                        "matrices, pool)")
    ratio = gps.get("ratio", 0.0)
    if epochs is not None:
        validate_gps(ratio, gps["start"], gps["duration"], epochs)
    else:
        validate_gps(ratio, gps["start"], gps["duration"], gps["start"] + gps["duration"])
    return {"start": gps["start"], "duration": gps["duration"], **gps_scope(gps.get("matrices"), gps.get("pool"))}


def _resource_plan(groups: dict, group_ranks: dict | None, gps: dict | None) -> dict:
    group_ranks = dict(group_ranks or {})
    for group, rank in group_ranks.items():
        if group not in RESOURCE_GROUPS:
            raise LsloError(f"ranks: unknown resource group '{group}', expected one of {RESOURCE_GROUPS}")
        _check_rank(rank, f"ranks.{group}")
    missing = sorted({g for g in groups.values() if g not in group_ranks}, key=RESOURCE_GROUPS.index)
    if missing:
        langs = [code for code, g in groups.items() if g in missing]
        raise LsloError(f"ranks: no rank for resource group(s) {missing} (languages {langs}); "
                        f"ranks give only {sorted(group_ranks)}")
    pruned_groups, ratio = [], 0.0
    if gps is not None:
        pruned_groups = list(gps.get("groups", []))
        unknown = [g for g in pruned_groups if g not in RESOURCE_GROUPS]
        if unknown:
            raise LsloError(f"gps.groups: unknown resource group(s) {unknown}, expected some of {RESOURCE_GROUPS}")
        if not pruned_groups:
            raise LsloError("gps.groups is empty, so GPS would prune nothing; list the resource groups to prune "
                            "(paper §6.3: [H, M]) or set gps: null")
        present = {g: [code for code, group in groups.items() if group == g] for g in RESOURCE_GROUPS}
        empty = [g for g in pruned_groups if not present[g]]
        if empty:
            raise LsloError(f"gps.groups: resource group(s) {empty} have no language in this run, so GPS would "
                            f"prune nothing there; the languages by group are "
                            f"{ {g: codes for g, codes in present.items() if codes} }")
        ratio = check_ratio(gps.get("ratio"), "gps.ratio")
    return {
        "ranks": {code: int(group_ranks[g]) for code, g in groups.items()},
        "prune": {code: (ratio if g in pruned_groups else 0.0) for code, g in groups.items()},
        "scores": None,
    }


def _subspace_options(options: dict | None) -> dict:
    options = {**SUBSPACE_DEFAULTS, **(options or {})}
    unknown = sorted(set(options) - set(SUBSPACE_DEFAULTS))
    if unknown:
        raise LsloError(f"subspace rank options: unknown key(s) {unknown}, expected {sorted(SUBSPACE_DEFAULTS)}")
    _check_rank(options["small_rank"], "small_rank")
    _check_rank(options["large_rank"], "large_rank")
    check_ratio(options["max_ratio"], "max_ratio")
    return options


def _check_rank(rank, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LsloError(f"{what} is {rank!r}, expected a whole number >= 1")


def read_scores(path, languages: list[str]) -> pd.DataFrame:
    """Read an ISE score table (results/subspace/scores.tsv) and check it covers every language."""
    if not os.path.isfile(path):
        raise LsloError(f"{path}: subspace scores not found")
    scores = pd.read_csv(path, sep="\t", keep_default_na=False)
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise LsloError(f"{path}: missing column(s) {missing}; expected {SCORE_COLUMNS}")
    scores["language"] = scores["language"].astype(str)
    absent = [code for code in languages if code not in set(scores["language"])]
    if absent:
        raise LsloError(f"{path}: no scores for language(s) {absent}")
    return scores[scores["language"].isin(languages)]


def language_demand(scores: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Per-language pruned fraction and excess over P (= sum Score / sum #B), and the target P itself."""
    implied = (scores["n_pruned"] - scores["score"]) / scores["n_params"]  # eq. 6 solved for P, row by row
    target = float(implied.mean())
    if (implied - target).abs().max() > 1e-6:
        raise LsloError("subspace scores: rows imply different target ratios P (score != n_pruned - P * n_params)")
    sums = scores.groupby("language", sort=False)[["n_params", "n_pruned", "score"]].sum()
    demand = pd.DataFrame({"pruned": sums["n_pruned"] / sums["n_params"], "excess": sums["score"] / sums["n_params"]})
    return demand, target


def _subspace_plan(scores: pd.DataFrame, codes: list[str], options: dict, pruning: bool) -> dict:
    demand, target = language_demand(scores)
    ranks, prune = {}, {}
    for code in codes:
        row = demand.loc[code]
        small = row["excess"] > options["threshold"]
        ranks[code] = options["small_rank"] if small else options["large_rank"]
        prune[code] = round(min(options["max_ratio"], float(row["pruned"])), 6) if small and pruning else 0.0
    small = [code for code in codes if demand.loc[code, "excess"] > options["threshold"]]
    log.info("subspace rank policy (ISE target P=%.3f): small rank and GPS for %s", target, small)
    excess = {code: round(float(demand.loc[code, "excess"]), 6) for code in codes}
    return {"ranks": ranks, "prune": prune, "scores": excess}
