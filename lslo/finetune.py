"""Fine-tuning one variant (paper §5, §6.3, Tables 1-4): pretrain (no training), full, or LSLo.

  method "pretrain": no training; variant.json points at the base model; the metrics TSV has one epoch-0 row
                     (dev spBLEU of the base model, the Pretrain line of Figure 3).
  method "full":     every parameter, lr 1e-4 unless options say otherwise (§5); warmup and inverse-sqrt schedule
                     are the options' (the configs state Ft-all's in its own `train` block, lslo's choice:
                     docs/params.md); writes out_dir/model (HF model + tokenizer).
  method "lslo":     the base frozen; per-language ranks and GPS targets from ranks_json
                     {"ranks": {lang: r}, "prune": {lang: P},
                     "gps": {"start": E, "duration": k, "matrices": [...], "pool": ...} | null};
                     writes out_dir/adapters.safetensors (lslo.adapters.save_adapters).
Index plans: "learned" = the weight-learning plan (plan_json); "src" / "tgt" = every *encoder* layer source- /
target-indexed (Table 3's SRC/TGT); the decoder stays target-indexed in both, as in the learned plans;
"paper" = the plan the paper learned on lang12 (encoder src×9, tgt×3; decoder tgt×12), which the authors also
use for lang30; a path ending in .json = another run's plan.json.
GPS (eq. 4): at each epoch boundary, before the epoch, the languages with target P are pruned to
gps_ratio(epoch, P, E, k), so P is in force from epoch E+k. The plan's gps.matrices ([A, B] by default, or [B] /
[A]) are pruned, gps.pool "tensor" (default) each matrix on its own (torch's l1_unstructured, the paper's
footnote 1; scope "matrix") or "language" one pool per language over all its chosen matrices (scope "language").
Every method writes out_dir/variant.json (lslo.variant: the methods, the record and its reader).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from lslo.adapters import save_adapters
from lslo.checkpoint import model_identity
from lslo.errors import LsloError
from lslo.io import atomic_write, portable_path, read_json, write_tsv
from lslo.model import LSLoSpec, inject_lslo
from lslo.options import PAPER_INDEX_PLAN
from lslo.pruning import gps_ratio, prune
from lslo.ranks import GPS_POOLS, read_rank_plan
from lslo.tokenizer import nllb_codes_of
from lslo.train import (METRICS_COLUMNS, TrainOptions, dev_scores, is_main_process, load_base,
                        load_stage_data, train)
from lslo.variant import METHODS, method_of, write_variant

log = logging.getLogger(__name__)

INDEX_PLANS = {"src": {"enc": "src", "dec": "tgt"}, "tgt": {"enc": "tgt", "dec": "tgt"}}
FULL_LR = 1e-4  # paper §5


def run_finetune(method, model_dir, train_tsv, dev_tsv, language_table, languages, index_plan, plan_json,
                 ranks_json, modules, options: dict, out_dir, out_metrics, checkpoint_dir) -> None:
    method_of(method, "finetune")
    options = dict(options or {})
    if method == "full":
        options.setdefault("lr", FULL_LR)
    options = TrainOptions.from_dict(options, "finetune.options")
    codes, groups, train_table, dev_table = load_stage_data(train_tsv, dev_tsv, language_table, languages)
    hf_model, tokenizer = load_base(model_dir, codes, language_table)
    out_dir = Path(out_dir)
    if method == "pretrain":
        _pretrain_metrics(hf_model, tokenizer, dev_table, codes, groups, options, out_metrics)
    elif method == "full":
        hf_model.requires_grad_(True)
        train(hf_model, tokenizer, train_table, codes, options, checkpoint_dir, out_metrics,
              dev_table=dev_table, groups=groups, identity={"stage": "finetune", "method": method,
                                                            "base_model": model_identity(model_dir)})
        if is_main_process():
            with atomic_write(out_dir / METHODS["full"].artifact_path, is_dir=True) as tmp:
                hf_model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    else:
        _finetune_lslo(hf_model, tokenizer, train_table, dev_table, codes, groups, index_plan, plan_json, ranks_json,
                       modules, options, out_dir, out_metrics, checkpoint_dir, model_dir)
    if is_main_process():
        write_variant(out_dir, method, model_dir, codes, nllb_codes_of(tokenizer))


def _finetune_lslo(hf_model, tokenizer, train_table, dev_table, codes, groups, index_plan, plan_json, ranks_json,
                   modules, options, out_dir, out_metrics, checkpoint_dir, model_dir) -> Path:

    ranks, targets, schedule = read_rank_plan(ranks_json, codes, options.epochs)
    torch.manual_seed(options.seed)  # the A init; on resume the checkpoint overwrites it anyway
    plan = resolve_index_plan(index_plan, plan_json)
    spec = LSLoSpec(languages=codes, ranks=ranks, modules=modules, index_plan=plan, **options.lora_layout())
    base_identity = model_identity(model_dir)
    identity = {"stage": "finetune", "method": "lslo", "base_model": base_identity,
                "settings": {"ranks": ranks, "prune": targets, "gps": schedule, "index_plan": plan,
                             "modules": modules}}
    model = inject_lslo(hf_model, spec)

    emptied: set = set()

    def gps(epoch: int) -> None:  # eq. 4, per target ratio, in the plan's pools (gps.matrices, gps.pool)
        for target in sorted(set(targets.values())):
            ratio = gps_ratio(epoch, target, schedule["start"], schedule["duration"]) if schedule else 0.0
            if ratio > 0:
                pools = prune(model, ratio, [lang for lang in codes if targets[lang] == target],
                              scope=GPS_POOLS[schedule["pool"]], matrices=schedule["matrices"])
                for language, matrix in emptied_matrices(pools):
                    if (language, matrix) not in emptied:
                        emptied.add((language, matrix))
                        log.warning("GPS epoch %d: every %s entry of language '%s' is pruned at every site, so its "
                                    "LoRA adds nothing; one L1 pool over A and B (gps.pool: language) takes the "
                                    "smaller B first (paper §4.2); gps.matrices: [B] or gps.pool: tensor keep both",
                                    epoch, matrix, language)

    train(model, tokenizer, train_table, codes, options, checkpoint_dir, out_metrics, epoch_hook=gps,
          dev_table=dev_table, groups=groups, identity=identity)
    gps(options.epochs)  # masks only grow: a no-op once the target is in force, it makes the end state sure
    path = out_dir / METHODS["lslo"].artifact_path
    if not is_main_process():
        return path
    return save_adapters(model, path, base_model=portable_path(model_dir, out_dir),  # as variant.json names it
                         base_identity=base_identity)


def emptied_matrices(pools: dict) -> list[tuple[str, str]]:
    """(language, matrix) pairs of the pruning pools (lslo.pruning.prune's return) whose every entry, at every
    site, is masked: that language's LoRA then adds x·A·B = 0."""
    empty: dict = {}
    for items in pools.values():
        for item in items:
            key = (item.language, item.matrix)
            empty[key] = empty.get(key, True) and not bool(item.mask().any())
    return [key for key, is_empty in empty.items() if is_empty]


def resolve_index_plan(index_plan: str, plan_json) -> dict:
    """The per-layer plan of a variant's ``index``: "learned" (this run's weight-learning plan, plan_json),
    "src" / "tgt", "paper" (the plan the paper learned on lang12, lslo.options.PAPER_INDEX_PLAN) or the path of
    another run's plan.json (given as plan_json too, so the workflow tracks it)."""
    if index_plan == "learned" or str(index_plan).endswith(".json"):
        if not plan_json:
            raise LsloError(f"index plan '{index_plan}' needs plan_json (a weight-learning plan.json)")
        plan = read_json(plan_json)
        if not isinstance(plan, dict) or set(plan) != {"enc", "dec"}:
            raise LsloError(f"{plan_json}: not an index plan; expected {{\"enc\": [...], \"dec\": [...]}}")
        return plan
    if index_plan == "paper":
        return PAPER_INDEX_PLAN
    if index_plan not in INDEX_PLANS:
        raise LsloError(f"index plan '{index_plan}' not understood; expected learned, src, tgt, paper or the path "
                        "of a plan.json")
    return INDEX_PLANS[index_plan]


def _pretrain_metrics(hf_model, tokenizer, dev_table, codes, groups, options, out_metrics) -> None:
    """One epoch-0 row: the base model's dev spBLEU (Figure 3's Pretrain line), nothing trained."""
    if not is_main_process():
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_model.to(device)
    dev = dev_scores(hf_model, tokenizer, dev_table, codes, groups, options, device)
    row = {"epoch": 0, "step": 0, "loss": float("nan"), "pruning_ratio": 0.0, "trainable_params": 0,
           "effective_params": 0, **dev, "gpus": 0}  # nothing trained: no training process on a GPU
    write_tsv(pd.DataFrame([row], columns=METRICS_COLUMNS), out_metrics)
