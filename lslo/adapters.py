"""LSLo adapter files and merging (paper §3.1; DESIGN "Merge").

Adapter file (safetensors): the LSLoModel state-dict entries of the LoRA banks, effective (masked) weights,
    base.model.{encoder|decoder}.layers.{i}.{path}.banks.{src|tgt}.{A|B}.{lang}
    base.model.{encoder|decoder}.layers.{i}.{path}.banks.{src|tgt}.{A_mask|B_mask}.{lang}   (pruned languages only)
    index_weights.{enc|dec}_{i}.logits                                                      (weight-learning mode)
and string metadata (JSON values): format, lslo_version, base_model, languages, ranks, modules, layers,
index_plan, alpha, dropout, fc_lora, fc_lora_offset, fc_lora_width, init, and base_identity
(lslo.checkpoint.model_identity of the base model directory, where the adapters were trained on one). A file without
the fc_lora fields was written before the fc layout option existed and is read as the full layout. The base model
itself is not stored: load_adapters takes it, and refuses a base whose identity differs from base_identity.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lslo import __version__
from lslo.errors import LsloError
from lslo.io import atomic_write
from lslo.layer import BufferDict, LSLoLinear
from lslo.model import LSLoModel, LSLoSpec, inject_lslo

FORMAT = "lslo-adapters/1"
SPEC_FIELDS = ("languages", "ranks", "modules", "layers", "index_plan", "alpha", "dropout", "fc_lora",
               "fc_lora_offset", "fc_lora_width", "init")
# Spec fields added after the first files were written, with the value those files mean.
LAYOUT_DEFAULTS = {"fc_lora": "full", "fc_lora_offset": 0, "fc_lora_width": None, "init": "peft"}


def adapter_tensors(model: LSLoModel) -> dict:
    """Name -> tensor of every adapter entry (A/B masked, masks, index logits), on CPU, contiguous."""
    tensors = {}
    for name, module in model.named_modules():
        if not isinstance(module, LSLoLinear):
            continue
        for index, bank in module.banks.items():
            prefix = f"{name}.banks.{index}"
            for lang in bank.languages:
                tensors[f"{prefix}.A.{lang}"] = bank.effective_A(lang)
                tensors[f"{prefix}.B.{lang}"] = bank.effective_B(lang)
            for matrix in ("A", "B"):
                for lang, mask in getattr(bank, f"{matrix}_mask").items():
                    tensors[f"{prefix}.{matrix}_mask.{lang}"] = mask
    for key, weights in model.index_weights.items():
        tensors[f"index_weights.{key}.logits"] = weights.logits
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_adapters(model: LSLoModel, path, base_model: str, base_identity: str | None = None) -> Path:
    """Write the adapters of ``model`` (trained on ``base_model``, a local path or hub id, whose content identity
    is ``base_identity``, lslo.checkpoint.model_identity) to ``path``."""
    path = Path(path)
    metadata = {"format": FORMAT, "lslo_version": __version__, "base_model": str(base_model)}
    if base_identity is not None:
        metadata["base_identity"] = str(base_identity)
    metadata.update({k: json.dumps(v) for k, v in model.spec.to_dict().items()})
    with atomic_write(path) as tmp:
        save_file(adapter_tensors(model), str(tmp), metadata=metadata)
    return path


def read_adapters(path) -> tuple[dict, dict]:
    """(tensors, metadata with JSON values decoded) of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise LsloError(f"{path}: not a readable safetensors adapter file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise LsloError(f"{path}: metadata 'format' is {metadata.get('format')!r}; expected {FORMAT!r}")
    decoded = {k: metadata[k] for k in ("format", "lslo_version", "base_model")}
    decoded["base_identity"] = metadata.get("base_identity")
    missing = [k for k in SPEC_FIELDS if k not in metadata and k not in LAYOUT_DEFAULTS]
    if missing:
        raise LsloError(f"{path}: metadata lacks field(s) {missing}")
    decoded.update({k: json.loads(metadata[k]) if k in metadata else LAYOUT_DEFAULTS[k] for k in SPEC_FIELDS})
    return tensors, decoded


def load_adapters(hf_model, path, languages=None, base_identity: str | None = None, base_model=None) -> LSLoModel:
    """Inject LSLo into ``hf_model`` as described by the file's metadata and load its tensors strictly.
    ``languages``, if given, must equal the file's language list (same order: ids index into it).
    ``base_identity``, if given (model_identity of ``base_model``, the directory ``hf_model`` came from), must equal
    the identity of the base the adapters were trained on, where the file records one."""
    tensors, meta = read_adapters(path)
    trained_on = meta["base_identity"]
    if base_identity is not None and trained_on is not None and base_identity != trained_on:
        raise LsloError(f"{path}: adapters were trained on base model {meta['base_model']} (identity "
                        f"{trained_on[:12]}), not on {base_model or 'the given model'} (identity "
                        f"{base_identity[:12]}); decode them with the base they were trained on")
    if languages is not None and list(languages) != meta["languages"]:
        raise LsloError(f"{path}: adapters are for languages {meta['languages']}, expected {list(languages)}")
    spec = LSLoSpec(**{k: meta[k] for k in SPEC_FIELDS})
    model = inject_lslo(hf_model, spec)
    _install_masks(model, tensors, path)
    expected = adapter_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LsloError(f"{path}: adapter entries do not match the model built from its metadata; "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LsloError(f"{path}: {key} has shape {tuple(tensor.shape)}; the model expects "
                            f"{tuple(expected[key].shape)} (was it trained on another base model?)")
    model.load_state_dict(tensors, strict=False)
    return model


def _install_masks(model: LSLoModel, tensors: dict, path) -> None:
    """Masks exist only for pruned languages, so create them before loading."""
    for key, tensor in tensors.items():
        owner, sep, lang = key.rpartition(".")
        if owner.endswith("_mask"):
            try:
                masks = model.get_submodule(owner)
            except AttributeError:
                raise LsloError(f"{path}: {key} names no module of the model built from its metadata") from None
            if not isinstance(masks, BufferDict):
                raise LsloError(f"{path}: {key} is not a pruning mask entry")
            masks.set(lang, torch.empty_like(tensor))


def _direction_delta(module: LSLoLinear, src: str, tgt: str) -> torch.Tensor:
    """Dense ΔW of one site for one direction: s·B_l A_l (l by the index plan), or eq. 5's weighted sum."""
    langs = {"src": src, "tgt": tgt}
    return sum(w * module.delta_weight(index, langs[index]) for index, w in module.bank_weights().items())


@torch.no_grad()
def merge_direction(model: LSLoModel, src: str, tgt: str):
    """A plain HF model (deep copy) with W + ΔW folded into every LSLo site for the direction src -> tgt."""
    for lang in (src, tgt):
        if lang not in model.languages:
            raise LsloError(f"unknown language {lang!r}; the adapters cover {model.languages}")
    merged = copy.deepcopy(model.base)
    for name, module in list(merged.named_modules()):
        if not isinstance(module, LSLoLinear):
            continue
        base = module.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        linear.weight.copy_(base.weight + _direction_delta(module, src, tgt).to(base.weight.dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(merged.get_submodule(parent_name), attr, linear)
    merged.requires_grad_(True)
    return merged
