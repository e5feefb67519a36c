"""The one training loop of every training stage (weight learning, subspace estimation, fine-tuning; paper §5) and
of demo pretraining (lslo.demo.train_on_bitext).

Read `training_epochs` top to bottom: for each epoch, epoch_hook (GPS pruning), then updates of update_freq
micro-batches at the schedule's lr; each finished epoch goes back to the caller. `train` (a stage's run) reads as:
data -> model/optimizer (`make_trainer`) -> resume -> for each epoch of the loop: dev spBLEU, metrics row,
checkpoint. What differs between runs is the batch source (`BatchSource`): a stage's epoch plan, or the demo's
running temperature sampler. As in the paper's fairseq setup:

- Adam (betas 0.9, 0.98) over the trainable parameters only; fairseq's inverse_sqrt schedule (`get_lr`);
- label-smoothed cross entropy, fairseq's definition (`label_smoothed_nll_loss`), summed over target tokens and
  divided by the number of target tokens of the whole update, so `update_freq` micro-batches give exactly the
  gradient of one big batch; by default (train.loss: chunked) computed from the decoder's hidden states block by
  block (lslo.lean_loss), so the target tokens x vocabulary logits never exist at once;
- train.max_updates (fairseq's --max-update) ends any run after that many updates, with its usual outputs;
- token-budget batches (lslo.data.make_batches), mixed directions by default, temperature-sampled directions;
- AMP only on CUDA (`amp_setup`, `update_step`). train.amp_dtype fp16 (the paper's, the default) is fairseq's
  `--amp`: float16 autocast and a GradScaler at init scale 2**7; an update whose gradients overflow skips Adam's
  step, halves the scale and tries the same batch again (at most 2 times, fairseq's amp_batch_retries), then skips
  the batch; an update that overflowed on every try is not counted, so neither the step (get_lr, max_updates) nor the
  schedule advances; a scale at or below fairseq's min_loss_scale 1e-4 stops training. bf16 is lslo's option:
  bfloat16 autocast, no scaler, every update counted; a GPU without bfloat16 is refused;
- DDP under torchrun (WORLD_SIZE > 1): each rank takes every WORLD_SIZE-th batch of the same epoch plan, only rank 0
  writes files.

Resume: the batch order of epoch e is a pure function of (seed, e), and each epoch checkpoint holds the trainable
state (LoRA A/B, pruning masks, index weights; every parameter for full fine-tuning), optimizer, step, RNG states
and the metrics rows, so rerunning with the same checkpoint_dir continues after the last complete epoch and ends,
on CPU with a fixed seed, with bit-identical weights and the same metrics TSV as an uninterrupted run. Which
checkpoint may be resumed (identity), the file layout and durability: lslo.checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import M2M100ForConditionalGeneration
from transformers.models.m2m_100.modeling_m2m_100 import M2M100Attention, shift_tokens_right

from lslo import __version__
from lslo.bootstrap import ALPHA, SentenceStats, cell_replicates, resample_counts
from lslo.checkpoint import (data_identity, find_resumable, last_checkpoint, mark_complete, plain, save_checkpoint,
                             set_rng_state, write_epoch_metrics)
from lslo.code_identity import stage_code_hash
from lslo.data import Corpus, TemperatureSampler, collate, make_batches, read_parallel
from lslo.errors import LsloError
from lslo.inference import DecodingOptions, Translator, translate_many
from lslo.io import write_tsv
from lslo.languages import groups, nllb_codes, read_language_table, select
from lslo.layer import BufferDict
from lslo.lean_loss import chunked_label_smoothed_nll_loss
from lslo.metrics import sentence_stats, spm_pieces
# TrainOptions and the option names live in lslo.options (the workflow reads them without torch); used from here too
from lslo.options import AMP_DTYPES, DEFAULT_CHUNK_ELEMENTS, LOSSES, TrainOptions  # noqa: F401
from lslo.model import check_model_dir
from lslo.params import count_params
from lslo.pruning import pruning_ratio, reapply_masks
from lslo.tokenizer import load_tokenizer, require_languages

log = logging.getLogger(__name__)

AMP_TORCH_DTYPES = dict(zip(AMP_DTYPES, (torch.float16, torch.bfloat16)))  # train.amp_dtype
# fairseq's --amp, as its source sets it (fairseq/optim/amp_optimizer.py AMPOptimizer, fairseq/trainer.py train_step,
# defaults of fairseq/dataclass/configs.py CommonConfig):
FAIRSEQ_AMP_INIT_SCALE = 2.0**7  # AMPOptimizer's init_scale is common.fp16_init_scale (2**7)
FAIRSEQ_AMP_GROWTH_INTERVAL = 2000  # torch's default: fairseq passes growth_interval only when amp_scale_window is set
FAIRSEQ_MIN_LOSS_SCALE = 1e-4  # common.min_loss_scale: AMPOptimizer.clip_grad_norm raises at or below it
FAIRSEQ_AMP_BATCH_RETRIES = 2  # common.amp_batch_retries: tries of the same batch after an overflow

DEV_CELLS = ["dev_H2H", "dev_V2V"]
# Figure 3's points and their 95% bootstrap intervals (lslo.bootstrap: dev sentences resampled, paired across
# directions)
DEV_COLUMNS = [f"{cell}{suffix}" for cell in DEV_CELLS for suffix in ("", "_low", "_high")]
METRICS_COLUMNS = ["epoch", "step", "loss", "pruning_ratio", "trainable_params", "effective_params",
                   "dev_H2H", "dev_V2V", "dev_H2H_low", "dev_H2H_high", "dev_V2V_low", "dev_V2V_high", "stopped",
                   "gpus", "peak_gpu_mib"]


# ---------------------------------------------------------------------------------------------- schedule, loss

def get_lr(step: int, lr: float, warmup: int) -> float:
    """Learning rate of update `step` (1-based): fairseq's inverse_sqrt with warmup_init_lr = 0.

    Linear warm-up lr·step/warmup for step < warmup, then lr·sqrt(warmup/step). (fairseq evaluates the same
    formula at the number of *completed* updates, so its very first update has lr 0; we skip that no-op update.)
    """
    if warmup <= 0:
        return lr
    if step < warmup:
        return lr * step / warmup
    return lr * math.sqrt(warmup / step)


def label_smoothed_nll_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float,
                            ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's label-smoothed cross entropy, summed over non-ignored tokens: (loss, nll_loss).

    loss = (1 - ε - ε_i)·nll + ε_i·Σ_v(-log p_v) with ε_i = ε / (V - 1): the gold token gets weight 1 - ε and
    each of the other V - 1 tokens ε/(V - 1). (torch's `cross_entropy(label_smoothing=ε)` spreads ε over all V tokens,
    gold included; it equals this loss at label_smoothing = ε·V/(V - 1).)
    """
    if logits.dtype in (torch.float16, torch.bfloat16):  # AMP: the softmax in float32
        logits = logits.float()
    lprobs = F.log_softmax(logits, dim=-1)
    keep = target != ignore_index
    lprobs, target = lprobs[keep], target[keep]
    nll_loss = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    smooth_loss = -lprobs.sum(dim=-1)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
    return loss.sum(), nll_loss.sum()


# ---------------------------------------------------------------------------------------------- one update

def is_lslo(model) -> bool:
    return hasattr(unwrap(model), "lslo_modules")


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def forward_loss(model, batch: dict, epsilon: float, device, loss: str = "chunked",
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Summed label-smoothed loss of one collated batch (lslo.data.collate); loss: train.loss (LOSSES)."""
    config = hf_config(model)
    labels = batch["labels"].to(device)
    kwargs = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  decoder_input_ids=shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id))
    if is_lslo(model):
        # host lists: the routing groups rows on the host, and a device tensor (DDP moves tensor arguments to
        # the GPU) would cost a device-to-host sync in every forward
        kwargs.update(src_lang=batch["src_lang"].tolist(), tgt_lang=batch["tgt_lang"].tolist())
    if loss == "plain":
        logits = model(**kwargs).logits
        return label_smoothed_nll_loss(logits, labels, epsilon)[0]
    with loss_as_head(model, labels, epsilon, chunk_elements):
        return model(**kwargs).logits


class _LossHead(torch.nn.Module):
    """Stands in for the output projection during one forward: returns the chunked loss of the decoder's hidden
    states (lslo.lean_loss) instead of their logits."""

    def __init__(self, projection: torch.nn.Linear, labels: torch.Tensor, epsilon: float, chunk_elements: int):
        super().__init__()
        self.projection = projection
        self.labels, self.epsilon, self.chunk_elements = labels, epsilon, chunk_elements

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return chunked_label_smoothed_nll_loss(hidden, self.projection.weight, self.labels, self.epsilon,
                                               chunk_elements=self.chunk_elements)[0]


@contextlib.contextmanager
def loss_as_head(model, labels: torch.Tensor, epsilon: float, chunk_elements: int):
    """While open, `model(...)`'s `logits` is the summed chunked loss: the HF model's lm_head is swapped for
    _LossHead. The loss is computed inside the model's own forward, so an LSLo model routes languages as usual, the
    projection weight is used inside the forward that DDP watches (Ft-all trains it), and autocast applies."""
    hf = unwrap(model).base if is_lslo(model) else unwrap(model)
    projection = hf.lm_head
    if not isinstance(projection, torch.nn.Linear) or projection.bias is not None:
        raise LsloError(f"train.loss chunked: the model's output projection is {projection!r}, expected a Linear "
                        "without bias (M2M100's lm_head); set train.loss: plain")
    hf.lm_head = _LossHead(projection, labels, epsilon, chunk_elements)
    try:
        yield
    finally:
        hf.lm_head = projection


def make_adam(params, lr: float, betas=(0.9, 0.98), eps: float = 1e-8, weight_decay: float = 0.0):
    """Adam with torch's fused kernel where every parameter is a CPU or CUDA float tensor: one kernel over all
    tensors instead of a Python loop per tensor (an LSLo model has two tensors per language and site, e.g. 1,872
    for lang12 on a 6+6-layer M2M100, where the loop costs as much as a tenth of a CPU training step)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            fused=fused or None)


def train_update(model, optimizer, micro_batches: list[dict], options: TrainOptions, lr: float, device,
                 scaler=None, autocast=contextlib.nullcontext, world_size: int = 1) -> tuple[float, int]:
    """One optimizer update over `micro_batches` (gradient accumulation): returns (summed loss, target tokens).

    Each micro-batch's summed loss is divided by the target tokens of the whole update (all ranks), so the
    accumulated gradient is the per-token mean over the update, as fairseq normalises by sample_size.
    With a GradScaler (fp16), the gradients are unscaled before clipping; when one of them is not finite the
    scaler skips Adam's step (weights and moments unchanged) and backs off its scale. What follows an overflow
    (the same batch again, the batch skipped, or a stop: fairseq's --amp) is `update_step`'s.
    """
    n_tokens = sum(b["n_tokens"] for b in micro_batches)
    if world_size > 1:
        total = torch.tensor([n_tokens], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        n_tokens_global = int(total.item())
    else:
        n_tokens_global = n_tokens
    params = [p for p in optimizer.param_groups[0]["params"]]
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)  # summed on the device: one host sync per update, not per micro-batch
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if (world_size > 1 and not last) else contextlib.nullcontext()
        with sync:
            with autocast():
                loss = forward_loss(model, batch, options.label_smoothing, device, options.loss,
                                    options.loss_chunk_elements)
            # DDP averages gradients over ranks; scale by world_size so the result is a sum over the update.
            scaled = loss * (world_size / n_tokens_global)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if options.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, options.clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss_sum), n_tokens


# ---------------------------------------------------------------------------------------------- data

def epoch_plan(corpus: Corpus, options: TrainOptions, epoch: int) -> list[list]:
    """The batches (lists of lslo.data.Example) of epoch `epoch`: a pure function of (seed, epoch), for resume."""
    sampler = TemperatureSampler(corpus.sizes(), options.temperature, seed=[options.seed, epoch],
                                 epoch_size=options.max_epoch_examples)
    return make_batches(sampler.epoch(), corpus, options.max_tokens, mixed=options.mixed_directions,
                        rng=sampler.rng)


def shard(batches: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s batches: every world_size-th one, equal counts on every rank (the rest is dropped)."""
    usable = len(batches) - len(batches) % world_size
    if usable < len(batches):
        log.info("dropping %d batch(es) so every rank gets the same number", len(batches) - usable)
    return batches[rank:usable:world_size]


# ---------------------------------------------------------------------------------------------- model state

def set_dropout(model, p: float, attention: float | None = None, activation: float | None = None,
                layerdrop: float | None = None) -> None:
    """Apply the dropout options as the HF config's `dropout`, `attention_dropout`, `activation_dropout` and
    `encoder_layerdrop` / `decoder_layerdrop` (None keeps the model's value). M2M100 copies them into the layers,
    their attention modules and the encoder/decoder stacks at construction, so set them there too."""
    hf = unwrap(model).base if is_lslo(model) else unwrap(model)
    hf.config.dropout = p
    for key, value in (("attention_dropout", attention), ("activation_dropout", activation),
                       ("encoder_layerdrop", layerdrop), ("decoder_layerdrop", layerdrop)):
        if value is not None:
            setattr(hf.config, key, value)
    for module in hf.modules():
        if isinstance(module, M2M100Attention):  # its `dropout` is the attention dropout
            if attention is not None:
                module.dropout = attention
        elif hasattr(module, "activation_dropout"):  # an encoder or decoder layer
            module.dropout = p
            if activation is not None:
                module.activation_dropout = activation
        elif hasattr(module, "layerdrop"):  # the encoder or decoder stack
            module.dropout = p
            if layerdrop is not None:
                module.layerdrop = layerdrop


def trainable_state(model) -> dict:
    """State-dict entries that training can change: trainable parameters and every buffer (pruning masks), each
    tensor once. M2M100 ties its embedding to the encoder's and decoder's embed_tokens and to lm_head: the state dict
    names it four times, named_parameters() once, so a frozen tied embedding is known by all its names here, and a
    trained one is saved under its first name only (loading it sets the others, which are the same parameter)."""
    model = unwrap(model)
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    state, seen = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if key in frozen or id(value) in seen:
            continue
        seen.add(id(value))
        state[key] = value.detach().cpu().clone()
    return state


def load_trainable_state(model, state: dict) -> None:
    """Inverse of `trainable_state`; pruning masks are created lazily (lslo.layer.BufferDict), so a mask the fresh
    model does not have yet is installed through its BufferDict."""
    model = unwrap(model)
    own = model.state_dict()
    present = {k: v for k, v in state.items() if k in own}
    missing_params = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing_params:
        raise LsloError(f"checkpoint lacks trainable parameter(s) {missing_params[:5]}")
    model.load_state_dict(present, strict=False)
    for key in sorted(set(state) - set(own)):
        module_path, _, name = key.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        if not isinstance(module, BufferDict):
            raise LsloError(f"checkpoint entry '{key}' does not belong to this model")
        ref = next(model.parameters())
        module.set(name, state[key].to(ref.device))


def site_ranks(model) -> dict:
    """What the trainable state must match on resume: per site and index, the rank of each language (the ranks
    as built, after a rank plan, lslo.ranks, was applied)."""
    model = unwrap(model)
    if not is_lslo(model):
        return {"full": True}
    return {f"{site}.{index}": dict(bank.ranks) for site, m in model.lslo_modules().items()
            for index, bank in m.banks.items()}


def count_trainable(model) -> tuple[int, int, float]:
    """(trainable, effective, pruning ratio); effective leaves out pruned LoRA entries (lslo.params)."""
    model = unwrap(model)
    if is_lslo(model):
        counts = count_params(model)
        return counts["trainable"], counts["effective"], pruning_ratio(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n, n, 0.0


# ---------------------------------------------------------------------------------------------- dev scores

def dev_rows(dev_table: pd.DataFrame, options: TrainOptions) -> pd.DataFrame:
    """The dev sentences a stage scores each epoch: the first options.dev_sentences, or all of them (None)."""
    return dev_table if options.dev_sentences is None else dev_table.head(options.dev_sentences)


def dev_scores(model, tokenizer, dev_table: pd.DataFrame | None, languages: list[str], groups: dict | None,
               options: TrainOptions, device, batch_size: int = 64) -> dict:
    """Mean dev spBLEU over the H2H and V2V directions (Figure 3) on the first options.dev_sentences rows,
    scored with the model's own SentencePiece model, with its 95% bootstrap interval (dev_H2H_low, dev_H2H_high,
    ...; lslo.bootstrap). Directions are decoded together, one target language and mixed sources per batch (one
    generate call per batch, not per direction; lslo.inference.translate_many)."""
    scores = dict.fromkeys(DEV_COLUMNS, float("nan"))
    if dev_table is None or not groups or options.dev_sentences == 0:
        return scores
    rows = dev_rows(dev_table, options)
    pairs = {group: [(s, t) for s in languages for t in languages
                     if s != t and groups.get(s) == group == groups.get(t) and {s, t} <= set(rows.columns)]
             for group in ("H", "V")}
    jobs = [(s, t, i) for group in pairs.values() for s, t in group for i in range(len(rows))]
    if not jobs:
        return scores
    translator = Translator(model=unwrap(model), tokenizer=tokenizer, languages=languages,
                            is_lslo=is_lslo(model), device=str(device))
    # batches of batch_size sentences sorted by length, no token budget; at most 2 * longest source + 10 tokens
    decoding = DecodingOptions(beam=options.dev_beam, max_len_a=2, max_len_b=10, max_tokens=None,
                               max_sentences=batch_size, search=options.dev_search)
    was_training = unwrap(model).training
    unwrap(model).eval()
    try:
        hyps = translate_many(translator, [rows[s].iloc[i] for s, _, i in jobs], [s for s, _, _ in jobs],
                              [t for _, t, _ in jobs], decoding)
    finally:
        unwrap(model).train(was_training)
    by_direction: dict = {}
    for (s, t, i), hyp in zip(jobs, hyps):
        by_direction.setdefault((s, t), []).append(hyp)
    directions = [d for group_pairs in pairs.values() for d in group_pairs]
    stats = SentenceStats(np.stack([sentence_stats(spm_pieces(by_direction[(s, t)], tokenizer.spm_file),
                                                   spm_pieces(rows[t].tolist(), tokenizer.spm_file))
                                    for s, t in directions]),
                          [s for s, _ in directions], [t for _, t in directions],
                          [f"{groups[s]}2{groups[t]}" for s, t in directions], [str(i) for i in range(len(rows))])
    observed, replicates = cell_replicates(stats, resample_counts(len(rows)))
    for cell in ("H2H", "V2V"):
        if cell in observed:
            low, high = np.percentile(replicates[cell], [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
            scores.update({f"dev_{cell}": observed[cell], f"dev_{cell}_low": float(low),
                           f"dev_{cell}_high": float(high)})
    return scores


def hf_config(model):
    model = unwrap(model)
    return model.base.config if is_lslo(model) else model.config


# ---------------------------------------------------------------------------------------------- the loop

def distributed_setup() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); under torchrun (WORLD_SIZE > 1) initialise the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_setup(options: TrainOptions, device) -> tuple[Callable, object]:
    """(autocast context factory, GradScaler or None) of train.amp and train.amp_dtype; AMP runs on CUDA only.

    fp16: fairseq's --amp: float16 autocast and `fairseq_grad_scaler`; `update_step` retries, skips and stops as
    fairseq's Trainer does. bf16 (lslo's option; fairseq's --amp has no bfloat16): bfloat16 autocast without a
    scaler, whose exponent range is float32's, so no update overflows or is skipped. A GPU without native bfloat16
    (compute capability < 8.0) is refused rather than emulated.
    """
    if device.type != "cuda" or not options.amp:
        return contextlib.nullcontext, None
    dtype = AMP_TORCH_DTYPES[options.amp_dtype]
    if dtype == torch.bfloat16:
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise LsloError(f"train.amp_dtype is bf16, but {torch.cuda.get_device_name(device)} has no native "
                            "bfloat16; set train.amp_dtype: fp16 (the paper's, fairseq's --amp) or train.amp: false")
        return (lambda: torch.autocast("cuda", dtype=dtype)), None
    return (lambda: torch.autocast("cuda", dtype=dtype)), fairseq_grad_scaler("cuda")


def fairseq_grad_scaler(device_type: str = "cuda") -> torch.amp.GradScaler:
    """The loss scaler of fairseq's --amp (fairseq/optim/amp_optimizer.py): torch's GradScaler at init scale 2**7
    (common.fp16_init_scale), doubled after 2000 updates without overflow and halved at each overflow (torch's
    growth_factor, growth_interval and backoff_factor, which fairseq keeps unless amp_scale_window is set)."""
    return torch.amp.GradScaler(device_type, init_scale=FAIRSEQ_AMP_INIT_SCALE,
                                growth_interval=FAIRSEQ_AMP_GROWTH_INTERVAL)


@dataclass
class Trainer:
    """What the loop trains and updates with, set up once per run (make_trainer)."""

    model: torch.nn.Module  # the model itself: its state is checkpointed and measured
    forward_model: torch.nn.Module  # what the updates run: the DDP wrapper under torchrun, else the model
    optimizer: torch.optim.Optimizer
    options: TrainOptions
    device: torch.device
    rank: int
    world_size: int
    update_freq: int  # micro-batches per update in each process (TrainOptions.update_freq_for)
    autocast: Callable
    scaler: object  # torch.amp.GradScaler (fp16 autocast) or None
    # fairseq's Trainer._amp_retries: tries of a batch after an overflow; as fairseq, reset only when a batch is
    # skipped (a retry that succeeds leaves it), and not checkpointed
    amp_retries: int = 0


@dataclass
class BatchSource:
    """A run's training data: each epoch's batches (lists of lslo.data.Example) and what collates them. The stages'
    of_epoch is epoch_plan, a pure function of (seed, epoch) so that a run resumes; demo pretraining's draws from
    one running TemperatureSampler (lslo.demo.train_on_bitext)."""

    corpus: Corpus
    tokenizer: object
    languages: list[str]  # the model's ordered language list: collated language ids index it
    of_epoch: Callable[[int], list[list]]


@dataclass
class EpochResult:
    """What one epoch of the loop did: its number, the updates so far, and (step, summed loss, target tokens) of each
    of its updates on this process."""

    epoch: int
    step: int
    updates: list[tuple[int, float, int]]
    # "max_updates" when training ends here because options.max_updates was reached while batches or epochs were
    # left; None otherwise
    stopped: str | None = None

    @property
    def loss_sum(self) -> float:
        return sum(loss for _, loss, _ in self.updates)

    @property
    def token_sum(self) -> int:
        return sum(n_tokens for _, _, n_tokens in self.updates)


def make_trainer(model, options: TrainOptions, device: torch.device | None = None) -> Trainer:
    """Seed every RNG, move the model to the device (this process's, unless `device` says), set its dropout, build
    Adam over its trainable parameters, AMP and, under torchrun, the DDP wrapper."""
    rank, world_size, process_device = distributed_setup()
    device = device or process_device
    log.info("training: world size %d, rank %d, device %s", world_size, rank, device)  # read by gpu_check.py
    random.seed(options.seed)
    np.random.seed(options.seed)
    torch.manual_seed(options.seed)
    model.to(device)
    set_dropout(model, options.dropout, options.attention_dropout, options.activation_dropout, options.layerdrop)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LsloError("the model has no trainable parameters")
    optimizer = make_adam(params, options.lr, options.adam_betas, weight_decay=options.weight_decay)
    autocast, scaler = amp_setup(options, device)
    forward_model = model
    if world_size > 1:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return Trainer(model, forward_model, optimizer, options, device, rank, world_size,
                   options.update_freq_for(world_size), autocast, scaler)


def training_epochs(trainer: Trainer, source: BatchSource, epochs: Iterable[int], step: int = 0,
                    epoch_hook: Callable[[int], None] | None = None, stop: Callable[[], bool] | None = None,
                    checkpoint_dir=None, log_every: int | None = None) -> Iterator[EpochResult]:
    """The one training loop, of every stage and of demo pretraining: for each epoch, epoch_hook(epoch) (GPS
    pruning), then its updates; yields each finished epoch to the caller (the stages score and checkpoint it).
    Ends after `epochs`, once options.max_updates updates are done (the last epoch it yields then says
    stopped="max_updates" if batches or epochs were left), or once stop() is true (both checked before each update
    and each epoch). An fp16 update that overflowed on every try (update_step) consumed its batches but is not
    counted: `step`, and with it the lr and max_updates, stay where they were."""
    max_updates = trainer.options.max_updates
    epochs = iter(epochs)
    epoch = next(epochs, None)
    while epoch is not None:
        following = next(epochs, None)  # known before the epoch ends: is stopping at max_updates early?
        if finished(trainer.options, step, stop):
            return
        if trainer.device.type == "cuda":  # the epoch's peak GPU memory (epoch_metrics' peak_gpu_mib)
            torch.cuda.reset_peak_memory_stats(trainer.device)
        if epoch_hook is not None:
            epoch_hook(epoch)
        trainer.model.train()
        batches = shard(source.of_epoch(epoch), trainer.rank, trainer.world_size)
        updates = [batches[i:i + trainer.update_freq] for i in range(0, len(batches), trainer.update_freq)]
        done, stopped = [], None
        bar = tqdm(updates, desc=f"epoch {epoch}", disable=None if trainer.rank == 0 else True, leave=False)
        for number, group in enumerate(bar):
            if finished(trainer.options, step, stop):
                break
            counted = update_step(trainer, source, group, step + 1)
            if counted is None:  # skipped after overflows (fairseq's --amp): not an update
                continue
            step += 1
            loss, n_tokens = counted
            if not math.isfinite(loss):
                raise non_finite_loss(loss, epoch, step, checkpoint_dir)
            done.append((step, loss, n_tokens))
            bar.set_postfix(loss=f"{loss / max(n_tokens, 1):.3f}")
            if log_every and (step == 1 or step % log_every == 0):
                log.info("update %d, epoch %d: loss %.3f", step, epoch, loss / max(n_tokens, 1))
            if max_updates is not None and step >= max_updates and (number + 1 < len(updates) or following is not None):
                stopped = "max_updates"
                log.info("stopped early in epoch %d after %d updates: train.max_updates is %d", epoch, step,
                         max_updates)
                break
        yield EpochResult(epoch, step, done, stopped)
        epoch = following


def finished(options: TrainOptions, step: int, stop: Callable[[], bool] | None) -> bool:
    return (options.max_updates is not None and step >= options.max_updates) or (stop is not None and stop())


def update_step(trainer: Trainer, source: BatchSource, group: list[list], step: int) -> tuple[float, int] | None:
    """Update number `step` (1-based) over the micro-batches `group`, at the schedule's lr of that update: (summed
    loss, target tokens), or None when the update is not counted.

    With fp16's GradScaler this is fairseq's --amp (fairseq/trainer.py train_step): a try whose gradients
    overflow leaves the weights and Adam's state as they were and halves the loss scale, and the same batch is tried
    again, at the same lr, while trainer.amp_retries < 2; otherwise the batch is skipped (None; one INFO line
    each). A scale at or below fairseq's min_loss_scale stops training.
    """
    micro = [collate(batch, source.corpus, source.tokenizer, source.languages) for batch in group]
    options, scaler = trainer.options, trainer.scaler
    lr = get_lr(step, options.lr, options.warmup_updates)
    while True:
        scale = scaler.get_scale() if scaler is not None else None
        loss, n_tokens = train_update(trainer.forward_model, trainer.optimizer, micro, options, lr, trainer.device,
                                      scaler, trainer.autocast, trainer.world_size)
        new_scale = scaler.get_scale() if scaler is not None else None
        if scaler is None or new_scale >= scale:  # the scaler backs off only after an overflow
            return loss, n_tokens
        if new_scale <= FAIRSEQ_MIN_LOSS_SCALE:
            raise LsloError(f"update {step}: fp16 gradients overflow at every loss scale (now {new_scale:g}, at or "
                            f"below fairseq's minimum {FAIRSEQ_MIN_LOSS_SCALE:g}); training stopped (try a lower lr, "
                            "clip_norm, train.amp_dtype: bf16 or train.amp: false)")
        if trainer.amp_retries < FAIRSEQ_AMP_BATCH_RETRIES:
            trainer.amp_retries += 1
            log.info("update %d: gradient overflow detected, ignoring gradient, setting loss scale to: %g; "
                     "trying the same batch again (retry %d of %d)", step, new_scale, trainer.amp_retries,
                     FAIRSEQ_AMP_BATCH_RETRIES)
            continue
        trainer.amp_retries = 0
        trainer.optimizer.zero_grad(set_to_none=True)
        log.info("update %d: gradient overflow detected, ignoring gradient, setting loss scale to: %g; batch "
                 "skipped, the update is not counted and the lr schedule does not advance", step, new_scale)
        return None


def non_finite_loss(loss: float, epoch: int, step: int, checkpoint_dir) -> LsloError:
    last = last_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    return LsloError(f"non-finite training loss ({loss}) at epoch {epoch}, update {step}; training stopped, last "
                     f"good checkpoint: {last or 'none'} (try a lower lr, more warmup_updates, clip_norm, or amp: "
                     "false)")


# ---------------------------------------------------------------------------------------------- a stage's run

def train(model, tokenizer, train_table: pd.DataFrame, languages: list[str], options, checkpoint_dir,
          metrics_path, epoch_hook: Callable[[int], None] | None = None, dev_table: pd.DataFrame | None = None,
          groups: dict | None = None, identity: dict | None = None):
    """Train `model` (LSLoModel or a plain HF model) on every direction of `train_table`; returns the model.

    languages: the model's ordered language list (batch language ids index it). groups: {code: H/M/L/V}, for the
    dev H2H/V2V columns. epoch_hook(epoch) runs at each epoch boundary before the epoch's training (GPS pruning);
    it must be deterministic given the model state, since resume relies on it. identity: what the stage adds to
    the checkpoint identity (stage, base_model = lslo.checkpoint.model_identity, settings: everything else it
    passes in that changes the weights, e.g. the epoch_hook's plan); see run_identity. metrics_path is written
    once, after the last epoch; the rows so far live beside the checkpoints.
    """
    options = TrainOptions.from_dict(options) if not isinstance(options, TrainOptions) else options
    options.validate()
    checkpoint_dir = Path(checkpoint_dir)
    trainer = make_trainer(model, options)
    corpus = Corpus.multiparallel(train_table, list(languages), tokenizer)  # tokenized once
    corpus.check_lengths(options.max_tokens)
    source = BatchSource(corpus, tokenizer, languages, lambda epoch: epoch_plan(corpus, options, epoch))
    identity = run_identity(identity, model, options, languages, train_table, dev_table, trainer.world_size)
    first_epoch, step, metrics = resume_point(trainer, checkpoint_dir, identity)
    for done in training_epochs(trainer, source, range(first_epoch, options.epochs + 1), step, epoch_hook,
                                checkpoint_dir=checkpoint_dir):
        if is_lslo(model):
            reapply_masks(unwrap(model))  # Adam moves masked raw entries; keep saved weights clean
        metrics.append(epoch_metrics(model, tokenizer, dev_table, languages, groups, options, trainer.device,
                                     done.epoch, done.step, done.loss_sum, done.token_sum, trainer.world_size,
                                     trainer.rank, done.stopped))
        if trainer.rank == 0:
            save_checkpoint(checkpoint_dir, done.epoch, done.step, identity, trainable_state(model),
                            trainer.optimizer, trainer.scaler, metrics)
            write_epoch_metrics(checkpoint_dir, pd.DataFrame(metrics, columns=METRICS_COLUMNS))
        log.info("epoch %d: %s", done.epoch, metrics[-1])
        if trainer.world_size > 1:
            torch.distributed.barrier()
    if trainer.rank == 0:
        write_tsv(pd.DataFrame(metrics, columns=METRICS_COLUMNS), metrics_path)
        mark_complete(checkpoint_dir, len(metrics))
    return model


def resume_point(trainer: Trainer, checkpoint_dir: Path, identity: dict) -> tuple[int, int, list[dict]]:
    """(first epoch, updates so far, metrics rows so far): after the last complete epoch of a checkpointed run with
    the same identity, whose state is loaded (resume); (1, 0, []) from scratch. Rank 0 prepares the directory."""
    state = find_resumable(checkpoint_dir, identity) if trainer.rank == 0 else None
    if trainer.world_size > 1:
        torch.distributed.barrier()
        if trainer.rank != 0:
            state = find_resumable(checkpoint_dir, identity, may_set_aside=False)
    if state is None:
        return 1, 0, []
    resume(state, trainer.model, trainer.optimizer, trainer.scaler)
    return state["epoch"] + 1, state["step"], state["metrics"]


def run_identity(stage_identity: dict | None, model, options: TrainOptions, languages: list[str], train_table,
                 dev_table, world_size: int) -> dict:
    """Everything a checkpoint must share with this run to be resumed (lslo.checkpoint): the stage's part, every
    training option, the effective batch, the model spec and its ranks per site, the languages, the training and dev
    data, and the code that trains (lslo.code_identity.stage_code_hash of the stage)."""
    options_dict = asdict(options)
    dev_columns = [lang for lang in languages if dev_table is not None and lang in dev_table.columns]
    return plain({
        **(stage_identity or {}),
        "options": options_dict,
        # max_tokens x update_freq x processes: the process count may change on resume, the batch may not
        "tokens_per_update": options.max_tokens * options.update_freq_for(world_size) * world_size,
        "model": unwrap(model).spec.to_dict() if is_lslo(model) else {"full": True},
        "site_ranks": site_ranks(model),
        "languages": list(languages),
        "train_data": data_identity(train_table, list(languages)),
        "dev_data": (data_identity(dev_rows(dev_table, options), dev_columns) if dev_columns else None),
        "lslo_version": __version__,
        # the stage's script and the lslo modules it imports: the `code` param that reruns the job (rules)
        "code": stage_code_hash((stage_identity or {}).get("stage")),
    })


def resume(state: dict, model, optimizer, scaler) -> None:
    """Load a checkpoint state (lslo.checkpoint.find_resumable) into model, optimizer, scaler and the RNGs."""
    load_trainable_state(model, state["trainable_state"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    log.info("resumed from %s (epoch %d, step %d)", state.get("path", "a checkpoint"), state["epoch"], state["step"])


def epoch_metrics(model, tokenizer, dev_table, languages, groups, options, device, epoch, step, loss_sum,
                  token_sum, world_size, rank, stopped: str | None = None) -> dict:
    """One metrics TSV row: mean label-smoothed loss per target token (nats) over the epoch, counts, dev spBLEU,
    and `stopped` (EpochResult.stopped: "max_updates" on the last row of a run cut short by it, else empty)."""
    if world_size > 1:
        totals = torch.tensor([loss_sum, token_sum], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        loss_sum, token_sum = float(totals[0]), int(totals[1])
    trainable, effective, ratio = count_trainable(model)
    dev = dev_scores(model, tokenizer, dev_table, languages, groups, options, device) if rank == 0 else {}
    return {"epoch": epoch, "step": step, "loss": loss_sum / token_sum if token_sum else float("nan"),
            "pruning_ratio": ratio, "trainable_params": trainable, "effective_params": effective,
            **{column: dev.get(column, float("nan")) for column in DEV_COLUMNS}, "stopped": stopped or "",
            **gpu_usage(device, world_size)}


def gpu_usage(device, world_size: int) -> dict:
    """The metrics row's `gpus` (processes training on CUDA; 0 on CPU) and `peak_gpu_mib`: the largest
    torch.cuda.max_memory_allocated of the processes since the epoch began (dev scoring on rank 0 included), in
    MiB; empty (NaN) on CPU, where nothing is measured. The training cost of lslo.cost reads both."""
    if device.type != "cuda":
        return {"gpus": 0, "peak_gpu_mib": float("nan")}
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**20], dtype=torch.float64, device=device)
    if world_size > 1:  # every rank reaches this after rank 0's dev scores (it waited at the next barrier before)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return {"gpus": world_size, "peak_gpu_mib": float(peak[0])}


# ---------------------------------------------------------------------------------------------- stage inputs

def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the one process that writes a stage's outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def load_base(model_dir, languages: list[str] | None = None, language_table=None):
    """(HF M2M100 model in float32, tokenizer) from a local checkpoint directory (never the network).

    languages: codes the run trains on; each must have its language token in the checkpoint's tokenizer
    (__xx__, or for NLLB the code in the language table's nllb column).
    """
    check_model_dir(model_dir)
    table = read_language_table(language_table) if language_table is not None else None
    tokenizer = load_tokenizer(model_dir, nllb_codes(table, languages) if table is not None else None)
    if languages is not None:
        require_languages(tokenizer, languages, model_dir)
    model = M2M100ForConditionalGeneration.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return model, tokenizer


def load_stage_data(train_tsv, dev_tsv, language_table, languages):
    """(language codes, {code: group}, train table, dev table or None) for a training stage."""
    table = read_language_table(language_table)
    codes = select(table, languages)
    dev = read_parallel(dev_tsv, codes) if dev_tsv else None
    return codes, groups(table, codes), read_parallel(train_tsv, codes), dev
