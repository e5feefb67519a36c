"""Exact parameter counts of an LSLo model: trainable and effective (unpruned), per language, group and module.

One LoRA of rank r on a d_in -> d_out block has A (r x d_in) + B (d_out x r) = r (d_in + d_out) entries
(§3.1: sum_i d x r_i + r_i x k), with the LoRA's actual shape: fc1/fc2 are d_model x d_model blocks in the
authors' "slice" layout (the default) and the whole d x ffn matrices in the "full" layout. After pruning a
matrix of n entries at ratio P, n - round(P n) stay (torch's rounding, lslo.pruning.n_pruned). Counts come either
from a live model (``count_params``) or from the
shapes alone (``count_from_shape``), and both must agree; docs/params.md compares them with the paper's
#Params column.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lslo.errors import LsloError
from lslo.pruning import check_ratio, lora_matrices, n_pruned

from lslo.model import MODULE_NAMES, MODULE_PATHS, MODULE_SETS, fc_block

INDEX_MODES = ("single", "learn")


# --------------------------------------------------------------------------- model shapes


def load_config(model_config) -> dict:
    """The shape fields of an M2M100 config given as a dict, a transformers config or a config.json path."""
    if isinstance(model_config, (str, os.PathLike)):
        path = Path(model_config)
        if not path.is_file():
            raise LsloError(f"{path}: model config not found")
        model_config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(model_config, dict):
        model_config = model_config.to_dict()
    fields = ["vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim"]
    missing = [f for f in fields if f not in model_config]
    if missing:
        raise LsloError(f"model config lacks field(s) {missing}; expected an M2M100/NLLB config")
    shape = {f: int(model_config[f]) for f in fields}
    shape["tie_word_embeddings"] = bool(model_config.get("tie_word_embeddings", True))
    return shape


def resolve_modules(modules) -> list[str]:
    """Paper module names from "all" | "attn" | "fc" | a list (or comma string) of names."""
    if isinstance(modules, str):
        if modules in MODULE_SETS:
            return list(MODULE_SETS[modules])
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    modules = list(modules)
    unknown = [m for m in modules if m not in MODULE_NAMES]
    if unknown or not modules:
        raise LsloError(
            f"unknown module(s) {unknown or modules}; expected 'all', 'attn', 'fc' or names from {list(MODULE_NAMES)}"
        )
    return modules


def site_shapes(model_config, modules="all", layers: dict | None = None, fc_lora: str = "slice",
                fc_lora_offset: int = 0, fc_lora_width: int | None = None) -> dict[str, tuple[int, int]]:
    """{site key: (d_in, d_out) of its LoRA} for every linear layer that gets an LSLo (encoder has no c-*
    modules); fc1/fc2 per the layout (lslo.options.FC_LAYOUTS)."""
    shape = load_config(model_config)
    d = shape["d_model"]
    modules = resolve_modules(modules)
    sites = {}
    for side, names in MODULE_PATHS.items():
        ffn = shape[f"{'encoder' if side == 'enc' else 'decoder'}_ffn_dim"]
        block = fc_block(fc_lora, fc_lora_offset, fc_lora_width, d, ffn)
        width = ffn if block is None else block[1] - block[0]
        n_layers = shape[f"{'encoder' if side == 'enc' else 'decoder'}_layers"]
        chosen = range(n_layers) if layers is None else layers.get(side, [])
        for layer in chosen:
            if not 0 <= layer < n_layers:
                raise LsloError(f"layer {layer} of side '{side}' out of range: the model has {n_layers} (0-based)")
            for name in names:
                if name in modules:
                    dims = {"fc1": (d, width), "fc2": (width, d)}.get(name, (d, d))
                    sites[f"{side}.{layer}.{name}"] = dims
    return sites


def base_param_count(model_config) -> int:
    """Parameters of M2M100ForConditionalGeneration, exactly: one embedding matrix shared by encoder, decoder
    and (tied) LM head, sinusoidal positions as buffers, biased q/k/v/o and fc1/fc2, pre-norm layer norms and
    a final layer norm per side, LM head without bias."""
    s = load_config(model_config)
    d = s["d_model"]
    attention = 4 * (d * d + d)
    norm = 2 * d

    def ffn(dim: int) -> int:
        return d * dim + dim + dim * d + d

    encoder_layer = attention + norm + ffn(s["encoder_ffn_dim"]) + norm
    decoder_layer = 2 * (attention + norm) + ffn(s["decoder_ffn_dim"]) + norm
    embeddings = s["vocab_size"] * d * (1 if s["tie_word_embeddings"] else 2)
    return embeddings + s["encoder_layers"] * encoder_layer + s["decoder_layers"] * decoder_layer + 2 * norm


# --------------------------------------------------------------------------- counting


class _Tally:
    """Trainable / effective sums by language, group and module, and the totals."""

    def __init__(self, groups: dict[str, list[str]] | None):
        self.group_of = {lang: g for g, langs in (groups or {}).items() for lang in langs}
        self.by_language: dict = {}
        self.by_group: dict = {g: {"trainable": 0, "effective": 0} for g in (groups or {})}
        self.by_module: dict = {}

    def add(self, language: str, module_key: str, trainable: int, effective: int) -> None:
        targets = [self.by_language.setdefault(language, {"trainable": 0, "effective": 0}),
                   self.by_module.setdefault(module_key, {"trainable": 0, "effective": 0})]
        if language in self.group_of:
            targets.append(self.by_group[self.group_of[language]])
        for target in targets:
            target["trainable"] += trainable
            target["effective"] += effective

    def result(self, base: int, index_weights: int) -> dict:
        lora = sum(v["trainable"] for v in self.by_language.values())
        lora_effective = sum(v["effective"] for v in self.by_language.values())
        trainable = lora + index_weights
        return {
            "trainable": trainable,
            "effective": lora_effective + index_weights,
            "base": base,
            "percent": 100.0 * trainable / base if base else 0.0,
            "lora": lora,
            "lora_effective": lora_effective,
            "index_weights": index_weights,
            "by_group": self.by_group,
            "by_language": self.by_language,
            "by_module": self.by_module,
        }


def count_from_shape(
    model_config,
    languages: list[str],
    ranks: dict[str, int] | int,
    modules="all",
    layers: dict | None = None,
    index_mode: str = "single",
    prune: dict[str, float] | None = None,
    groups: dict[str, list[str]] | None = None,
    fc_lora: str = "slice",
    fc_lora_offset: int = 0,
    fc_lora_width: int | None = None,
) -> dict:
    """Exact counts from the shapes alone (no weights): every site gets one bank per index ("single": the
    index plan picks src or tgt per layer; "learn": both, eq. 5, plus 2 softmax logits per layer), each
    language r (d_in + d_out) entries; a language pruned at P keeps n - round(P n) of each A and B (the
    per-matrix GPS of Table 1)."""
    languages = _check_languages(languages)
    ranks = _check_ranks(ranks, languages)
    prune = {lang: check_ratio(p, f"pruning ratio of '{lang}'") for lang, p in _check_keys(prune or {}, languages,
                                                                                           "prune").items()}
    _check_keys(groups and {lang: g for g, langs in groups.items() for lang in langs} or {}, languages, "groups")
    if index_mode not in INDEX_MODES:
        raise LsloError(f"index mode '{index_mode}' not understood; expected one of {list(INDEX_MODES)}")
    sites = site_shapes(model_config, modules, layers, fc_lora, fc_lora_offset, fc_lora_width)
    for site, (d_in, d_out) in sites.items():  # a rank above min(d_in, d_out) adds entries but no rank
        too_large = {lang: r for lang, r in ranks.items() if r > min(d_in, d_out)}
        if too_large:
            lang, r = next(iter(too_large.items()))
            raise LsloError(f"rank {r} of '{lang}' exceeds the dimensions of LoRA site {site} ({d_in} -> {d_out}); "
                            f"a rank must be at most {min(d_in, d_out)}")
    n_banks = 2 if index_mode == "learn" else 1
    tally = _Tally(groups)
    for site, (d_in, d_out) in sites.items():
        side, _, module = site.split(".", 2)
        for lang in languages:
            r, ratio = ranks[lang], prune.get(lang, 0.0)
            for n in (r * d_in, d_out * r):  # A [r, in], B [out, r]
                tally.add(lang, f"{side}.{module}", n_banks * n, n_banks * (n - n_pruned(ratio, n)))
    layers_with_sites = {tuple(site.split(".")[:2]) for site in sites}
    index_weights = 2 * len(layers_with_sites) if index_mode == "learn" else 0
    return tally.result(base_param_count(model_config), index_weights)


def count_params(model, groups: dict[str, list[str]] | None = None) -> dict:
    """Exact counts of a live LSLoModel: LoRA entries from the banks, effective = unmasked entries, base =
    every other parameter that is not trainable LSLo state (shared embeddings counted once)."""
    tally = _Tally(groups)
    lora_ids = set()
    for item in lora_matrices(model):
        lora_ids.add(id(item.weight))
        mask = item.mask()
        tally.add(item.language, f"{item.side}.{item.module}", mask.numel(), int((mask != 0).sum()))
    others = [p for p in model.parameters() if id(p) not in lora_ids]  # parameters() is deduplicated
    index_weights = sum(p.numel() for p in others if p.requires_grad)
    base = sum(p.numel() for p in others if not p.requires_grad)
    return tally.result(base, index_weights)


def _check_languages(languages) -> list[str]:
    languages = [languages] if isinstance(languages, str) else list(languages)
    if not languages:
        raise LsloError("no languages given: expected at least one language code")
    duplicated = sorted({lang for lang in languages if languages.count(lang) > 1})
    if duplicated:
        raise LsloError(f"language(s) {duplicated} listed more than once")
    return languages


def _check_keys(mapping: dict, languages: list[str], what: str) -> dict:
    unknown = [lang for lang in mapping if lang not in languages]
    if unknown:
        raise LsloError(f"{what}: unknown language(s) {unknown}; the languages are {languages}")
    return mapping


def _check_ranks(ranks, languages: list[str]) -> dict[str, int]:
    if not isinstance(ranks, dict):
        ranks = {lang: ranks for lang in languages}
    _check_keys(ranks, languages, "ranks")
    missing = [lang for lang in languages if lang not in ranks]
    if missing:
        raise LsloError(f"ranks: no rank for language(s) {missing}")
    for lang, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LsloError(f"rank of '{lang}' is {r!r}, expected a whole number >= 1")
    return dict(ranks)
