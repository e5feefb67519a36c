"""A trained LSLo variant as something any HF user can load: one direction merged into a plain model, or one
direction as a PEFT LoRA adapter (`lslo export`).

For a direction src -> tgt every LSLo site uses one language's LoRA (paper §3.1, eq. 3): the source language's
at source-indexed sites, the target language's at target-indexed sites; a weight-learning site (eq. 5) uses
both, weighted. `site_factors` turns a site into one LoRA pair (A [r, in], B [out, r]) whose product is exactly
that site's ΔW, the scaling folded into B; the PEFT adapter then has scaling 1 at every site (lora_alpha = r
per module through rank_pattern / alpha_pattern), so PeftModel computes W x + B A x, the LSLo forward.

    lslo export --variant results/finetune/<v>/variant.json --direction en-oc --out DIR          # plain HF model
    lslo export --variant ... --direction en-oc --out DIR --peft                                 # PEFT adapter
    lslo export --variant ... --all-directions --out DIR [--peft]                                # DIR/<src>-<tgt>/
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from lslo.adapters import merge_direction
from lslo.errors import LsloError
from lslo.inference import load_variant
from lslo.io import atomic_write, check_output_dir
from lslo.layer import LSLoLinear


def site_factors(module: LSLoLinear, src: str, tgt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in_features], B [out_features, r]) with B @ A = ΔW of this site for the direction src -> tgt.

    The one place that maps a site's LoRA banks to full-width factors: pruned entries are zero (effective
    weights), the scaling s_l and, for eq. 5, the learned weight w_index are folded into B, and a weight-learning
    site stacks the source and target factors along the rank.
    """
    langs = {"src": src, "tgt": tgt}
    factors_a, factors_b = [], []
    for index, weight in module.bank_weights().items():
        bank, lang = module.banks[index], langs[index]
        factors_a.append(bank.effective_A(lang))
        factors_b.append(bank.effective_B(lang) * (bank.scaling[lang] * weight))
    a, b = torch.cat(factors_a, dim=0).detach(), torch.cat(factors_b, dim=1).detach()
    # slice fc layout (the authors'): the LoRA covers a block of W; zero rows of B / columns of A outside that
    # block make the full-width PEFT LoRA exact (fc1: output units, fc2: input units)
    if module.in_slice is not None:
        a = torch.nn.functional.pad(a, (module.in_slice[0], module.in_features - module.in_slice[1]))
    if module.out_slice is not None:
        b = torch.nn.functional.pad(b, (0, 0, module.out_slice[0], module.out_features - module.out_slice[1]))
    return a, b


def _check_direction(model, src: str, tgt: str) -> None:
    for lang in (src, tgt):
        if lang not in model.languages:
            raise LsloError(f"unknown language {lang!r}; the adapters cover {model.languages}")
    if src == tgt:
        raise LsloError(f"direction {src}-{tgt}: source and target are the same language")


def plain_base(model) -> nn.Module:
    """A deep copy of the LSLo model's base with every LSLoLinear replaced by its frozen nn.Linear."""
    base = copy.deepcopy(model.base)
    for name, module in list(base.named_modules()):
        if isinstance(module, LSLoLinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(base.get_submodule(parent_name), attr, module.base)
    return base


@torch.no_grad()
def peft_direction(model, src: str, tgt: str):
    """A PeftModel (LoRA, adapter "default") on a copy of the base whose adapters compute this direction's ΔW."""
    try:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - peft is an optional dependency
    except ImportError:
        raise LsloError("a PEFT export needs the peft package: pip install 'lslo[export]' (or peft)") from None

    _check_direction(model, src, tgt)
    factors = {name: site_factors(module, src, tgt) for name, module in _sites(model)}
    ranks = {re.escape(name): a.shape[0] for name, (a, _) in factors.items()}
    config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, bias="none", target_modules=list(factors),
                        rank_pattern=ranks, alpha_pattern=dict(ranks))  # alpha = r: scaling 1 (folded into B)
    peft_model = get_peft_model(plain_base(model), config)
    for name, (a, b) in factors.items():
        lora = peft_model.base_model.model.get_submodule(name)
        if lora.scaling["default"] != 1.0:  # PEFT's scaling rules changed; the export would be wrong
            raise LsloError(f"PEFT scaling of {name} is {lora.scaling['default']}, expected 1.0")
        lora.lora_A["default"].weight.copy_(a)
        lora.lora_B["default"].weight.copy_(b)
    return peft_model


def _sites(model) -> list[tuple[str, LSLoLinear]]:
    """(module name inside the HF model, LSLoLinear) of every LSLo site, in model order."""
    return [(name, module) for name, module in model.base.named_modules() if isinstance(module, LSLoLinear)]


def export_direction(model, src: str, tgt: str, out_dir, tokenizer=None, peft: bool = False) -> Path:
    """Write one direction: a plain HF model directory (merge_direction) or a PEFT adapter directory.

    The directory appears complete or not at all (lslo.io.atomic_write: an existing directory is replaced only
    when it is empty or an earlier lslo output)."""
    _check_direction(model, src, tgt)
    with atomic_write(out_dir, is_dir=True) as tmp:
        _write_direction(model, src, tgt, tmp, tokenizer, peft)
    return Path(out_dir)


def _write_direction(model, src: str, tgt: str, directory: Path, tokenizer, peft: bool) -> None:
    if peft:
        peft_direction(model, src, tgt).save_pretrained(directory)
    else:
        merge_direction(model, src, tgt).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def export_variant(variant_json, out_dir, directions: list[tuple[str, str]], peft: bool = False,
                   force: bool = False) -> list[Path]:
    """Export `directions` of an lslo variant: one direction to out_dir, several to out_dir/<src>-<tgt>/.

    out_dir must not exist or be empty; `force` lets it replace an earlier export (a directory lslo wrote),
    never a directory holding anything else (lslo.io.check_output_dir). Several directions are written as one
    directory: all of them appear, or none."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    translator = load_variant(variant_json, device="cpu")
    if not translator.is_lslo:
        raise LsloError(f"{variant_json}: method is not lslo; a pretrain/full variant is already a plain HF model")
    if len(directions) == 1:
        return [export_direction(translator.model, *directions[0], out_dir, translator.tokenizer, peft)]
    for src, tgt in directions:
        _check_direction(translator.model, src, tgt)
    with atomic_write(out_dir, is_dir=True) as tmp:
        for src, tgt in directions:
            (tmp / f"{src}-{tgt}").mkdir()
            _write_direction(translator.model, src, tgt, tmp / f"{src}-{tgt}", translator.tokenizer, peft)
    return [out_dir / f"{src}-{tgt}" for src, tgt in directions]
