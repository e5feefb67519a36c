"""Intrinsic subspace estimation (paper §4.2, eq. 6) and language-specific pruning (§7.3, appendix D).

LSLo of one rank (8 in the paper) on every module, indexed by the learned plan, trained while the B matrices are
L1-pruned under the Gradual Pruning Schedule (eq. 4, target P_ISE = 0.7):
  mode "ise": layer-wise cross-language global pruning, one pool per (side, layer) holding every language's B
              matrices of that layer (scope "layer");
  mode "lsp": language-specific pruning, one pool per language holding all its B matrices (scope "language").
Pruning happens at each epoch boundary, before the epoch, at ratio P_e = gps_ratio(e) (the ratio in force during
epoch e), so the target is in force from epoch E + k on. Output: Score(B) = #pruned(B) - P·#B for every
(language, B matrix): columns language, group, side, layer (1-based), module, n_params, n_pruned, score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lslo.checkpoint import model_identity
from lslo.errors import LsloError
from lslo.io import read_json, write_tsv
from lslo.model import LSLoSpec, inject_lslo
from lslo.pruning import gps_ratio, prune, subspace_scores, validate_gps
from lslo.train import TrainOptions, is_main_process, load_base, load_stage_data, train

log = logging.getLogger(__name__)

SCOPES = {"ise": "layer", "lsp": "language"}
COLUMNS = ["language", "group", "side", "layer", "module", "n_params", "n_pruned", "score"]


def run_subspace(model_dir, train_tsv, dev_tsv, language_table, languages, plan, rank, options: dict, mode: str,
                 target_ratio: float, gps: dict, out_scores, checkpoint_dir) -> None:
    if mode not in SCOPES:
        raise LsloError(f"subspace mode '{mode}' not understood; expected one of {list(SCOPES)}")
    options = TrainOptions.from_dict(options, "subspace.options")
    start, duration = _schedule(gps)
    validate_gps(target_ratio, start, duration, options.epochs)
    codes, groups, train_table, dev_table = load_stage_data(train_tsv, dev_tsv, language_table, languages)
    hf_model, tokenizer = load_base(model_dir, codes, language_table)
    torch.manual_seed(options.seed)
    plan = plan if isinstance(plan, dict) else read_json(plan)  # the weight-learning plan (dict or its JSON file)
    spec = LSLoSpec(languages=codes, ranks={code: int(rank) for code in codes}, modules="all", index_plan=plan,
                    **options.lora_layout())
    model = inject_lslo(hf_model, spec)

    def prune_b(epoch: int) -> None:  # eq. 4 ratio of this epoch, B matrices only (§4.2)
        ratio = gps_ratio(epoch, target_ratio, start, duration)
        if ratio > 0:
            prune(model, ratio, codes, scope=SCOPES[mode], matrices=("B",))

    checkpoint_dir = Path(checkpoint_dir)
    identity = {"stage": "subspace", "base_model": model_identity(model_dir),
                "settings": {"mode": mode, "rank": int(rank), "target_ratio": target_ratio, "gps": gps, "plan": plan}}
    train(model, tokenizer, train_table, codes, options, checkpoint_dir, checkpoint_dir / "metrics.tsv",
          epoch_hook=prune_b, dev_table=dev_table, groups=groups, identity=identity)
    prune_b(options.epochs)  # masks only grow: a no-op once the ratio is in force, it makes the end state sure
    scores = subspace_scores(model, target_ratio)
    scores.insert(1, "group", scores["language"].map(groups))
    if is_main_process():
        write_tsv(scores[COLUMNS], out_scores)
    log.info("%s scores of %d B matrices written to %s", mode, len(scores), out_scores)


def _schedule(gps: dict) -> tuple[int, int]:
    if not isinstance(gps, dict) or not {"start", "duration"} <= set(gps):
        raise LsloError(f"subspace gps is {gps!r}; expected {{'start': E, 'duration': k}}")
    return gps["start"], gps["duration"]
