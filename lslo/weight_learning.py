"""Weight learning (paper §4.1, eq. 5): which language indexes each layer's LSLo modules.

Every chosen module gets a source- and a target-indexed LSLo (rank 8 in the paper) mixed by one softmax pair
(w_src, w_tgt) per layer, shared by the layer's modules; after training, each layer takes the index with the
larger weight. Outputs: the weights TSV (side, layer (1-based), w_src, w_tgt; Figure 1) and the plan JSON
{"enc": ["src"|"tgt", ...], "dec": [...]} (docs/formats.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lslo.checkpoint import model_identity
from lslo.io import write_json, write_tsv
from lslo.model import LSLoSpec, inject_lslo
from lslo.train import TrainOptions, is_main_process, load_base, load_stage_data, train

log = logging.getLogger(__name__)


def run_weight_learning(model_dir, train_tsv, dev_tsv, language_table, languages, modules, rank, options: dict,
                        out_weights, out_plan, checkpoint_dir, log_dir=None) -> None:
    options = TrainOptions.from_dict(options, "weight_learning.options")
    codes, groups, train_table, dev_table = load_stage_data(train_tsv, dev_tsv, language_table, languages)
    hf_model, tokenizer = load_base(model_dir, codes, language_table)
    torch.manual_seed(options.seed)  # the A init; on resume the checkpoint overwrites it anyway
    spec = LSLoSpec(languages=codes, ranks={code: int(rank) for code in codes}, modules=modules,
                    index_plan="learn", **options.lora_layout())
    model = inject_lslo(hf_model, spec)
    metrics = Path(log_dir or checkpoint_dir) / "metrics.tsv"
    train(model, tokenizer, train_table, codes, options, checkpoint_dir, metrics, dev_table=dev_table,
          groups=groups, identity={"stage": "weight_learning", "base_model": model_identity(model_dir),
                                   "settings": {"modules": modules, "rank": int(rank)}})
    weights = model.learned_index_weights()
    plan = model.argmax_index_plan()
    log.info("learned index plan: %s", plan)
    if is_main_process():
        write_tsv(weights, out_weights)
        write_json(plan, out_plan)
