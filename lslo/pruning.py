"""Unstructured L1 pruning of language-specific LoRA matrices (paper §3.2, §4.2, §7.3, appendices B-D).

Pruning is stored as masks on the LoRA banks (``bank.A_mask`` / ``bank.B_mask``); the forward pass always uses
``weight * mask``, and the raw parameter entries are zeroed too so that saved adapters are clean.

Semantics follow ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` (the paper uses PyTorch's
implementation, footnotes 1 and 2): in a pool of n entries, the round(ratio * n) entries with the smallest |w|
are pruned. One difference, on purpose: ``ratio`` is the *total* fraction of the pool (the GPS ratio P_e of
eq. 4 is a total), not a fraction of what is still unpruned, and already pruned entries are always taken first,
so calling ``prune`` at a growing ratio epoch after epoch gives masks that only grow.

Pool scopes:
  "matrix"   each A and each B of each chosen language separately (fine-tuning GPS's default, Table 1; torch's
             l1_unstructured on one tensor, the paper's footnote 1);
  "language" all chosen matrices of one language, every site and index, in one pool: its B matrices in
             language-specific pruning (§7.3 / appendix D), the matrices of `gps.matrices` under fine-tuning
             GPS with `gps.pool: language`;
  "layer"    all chosen languages' B matrices of every module of one layer (side, layer) in one pool
             (layer-wise cross-language pruning for intrinsic subspace estimation, §4.2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import pandas as pd
import torch

from lslo.errors import LsloError

log = logging.getLogger(__name__)

SCOPES = ("matrix", "language", "layer")
MATRICES = ("A", "B")


# --------------------------------------------------------------------------- Gradual Pruning Schedule (eq. 4)


def gps_ratio(epoch: int, target: float, start: int, duration: int) -> float:
    """Pruning ratio P_e of epoch ``epoch`` (1-based) under the Gradual Pruning Schedule, eq. 4.

    P_e = 0 for e <= E; P - P(1 - (e - E)/k)^3 for E < e <= E + k; P for e > E + k,
    with P = ``target``, E = ``start`` and k = ``duration``.
    """
    _check_gps(target, start, duration)
    if not isinstance(epoch, int) or epoch < 1:
        raise LsloError(f"GPS epoch is {epoch!r}, expected a whole number >= 1 (epochs are 1-based)")
    if epoch <= start:
        return 0.0
    if epoch <= start + duration:
        return target - target * (1.0 - (epoch - start) / duration) ** 3
    return float(target)


def validate_gps(target: float, start: int, duration: int, epochs: int) -> None:
    """Reject a schedule that cannot reach its target within ``epochs`` training epochs (E + k <= T)."""
    _check_gps(target, start, duration)
    if not isinstance(epochs, int) or epochs < 1:
        raise LsloError(f"epochs (T) is {epochs!r}, expected a whole number >= 1")
    if start + duration > epochs:
        raise LsloError(
            f"GPS start E={start} + duration k={duration} = {start + duration} exceeds the {epochs} training "
            "epochs; eq. 4 needs E + k <= T so the target ratio is reached before training ends"
        )


def _check_gps(target: float, start: int, duration: int) -> None:
    check_ratio(target, "GPS target ratio P")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise LsloError(f"GPS start epoch E is {start!r}, expected a whole number >= 0")
    if not isinstance(duration, int) or isinstance(duration, bool) or duration < 1:
        raise LsloError(f"GPS duration k is {duration!r}, expected a whole number >= 1")


def check_ratio(ratio: float, what: str = "pruning ratio") -> float:
    """A pruning ratio must lie in [0, 1): pruning every entry would remove the adapter altogether."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise LsloError(f"{what} is {ratio!r}, expected a number in [0, 1)")
    return float(ratio)


def n_pruned(ratio: float, n: int) -> int:
    """Entries pruned from a pool of n at ``ratio``: round(ratio * n), Python's round as in torch's prune."""
    return round(ratio * n)


# --------------------------------------------------------------------------- the LoRA matrices of a model


@dataclass(frozen=True)
class LoraMatrix:
    """One A or B matrix of one language in one bank of one LSLo site."""

    site: str  # "enc.3.fc1"
    side: str  # "enc" | "dec"
    layer: int  # 0-based
    module: str  # paper name: q k v c-q c-k c-v fc1 fc2
    index: str  # bank: "src" | "tgt"
    language: str
    matrix: str  # "A" | "B"
    bank: torch.nn.Module

    @property
    def weight(self) -> torch.nn.Parameter:
        return getattr(self.bank, self.matrix)[self.language]

    def mask(self) -> torch.Tensor:
        """The current mask (all ones when the matrix was never pruned)."""
        masks = getattr(self.bank, f"{self.matrix}_mask")
        if self.language in masks:
            return masks[self.language]
        return torch.ones_like(self.weight, dtype=torch.bool)

    def set_mask(self, mask: torch.Tensor) -> None:
        self.bank.set_mask(self.matrix, self.language, mask)
        with torch.no_grad():  # zero the raw entries too, so saved weights are clean
            self.weight.mul_(mask.to(self.weight.dtype))


def lora_matrices(
    model, languages: Iterable[str] | None = None, matrices: Iterable[str] = MATRICES
) -> Iterator[LoraMatrix]:
    """Every LoRA matrix of the chosen languages (None = all), in site, bank, language, matrix order."""
    chosen = None if languages is None else set(check_languages(model, languages))
    matrices = _check_matrices(matrices)
    for site, module in model.lslo_modules().items():
        side, layer, name = site.split(".", 2)
        for index, bank in module.banks.items():
            for language in bank.languages:
                if chosen is not None and language not in chosen:
                    continue
                for matrix in matrices:
                    yield LoraMatrix(site, side, int(layer), name, index, language, matrix, bank)


def model_languages(model) -> list[str]:
    """Languages that own LoRA matrices in the model, in bank order."""
    seen: dict[str, None] = {}
    for module in model.lslo_modules().values():
        for bank in module.banks.values():
            seen.update(dict.fromkeys(bank.languages))
    return list(seen)


def check_languages(model, languages: Iterable[str]) -> list[str]:
    if isinstance(languages, str):
        languages = [languages]
    languages = list(languages)
    known = model_languages(model)
    unknown = [lang for lang in languages if lang not in known]
    if unknown:
        raise LsloError(f"unknown language(s) {unknown} for pruning; the model's LSLo languages are {known}")
    return languages


def _check_matrices(matrices: Iterable[str]) -> tuple[str, ...]:
    matrices = (matrices,) if isinstance(matrices, str) else tuple(matrices)
    bad = [m for m in matrices if m not in MATRICES]
    if bad or not matrices:
        raise LsloError(f"matrices {list(matrices)} not understood; expected a non-empty subset of {list(MATRICES)}")
    return matrices


# --------------------------------------------------------------------------- pruning


def l1_pool_masks(weights: list[torch.Tensor], masks: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Boolean keep-masks pruning round(ratio * n) entries of the pool with the smallest |w| (global L1).

    Entries already masked count as the smallest (they are zero anyway), so the new masks are supersets of the
    old pruned sets; ties between nonzero values are broken by ``torch.topk`` exactly as torch's prune does.
    """
    importance = torch.cat([(w.detach() * m).abs().flatten().float() for w, m in zip(weights, masks)])
    already = torch.cat([(m == 0).flatten().to(importance.device) for m in masks])
    importance[already] = -1.0
    keep = ~already
    k = n_pruned(ratio, importance.numel())
    if k:
        keep[torch.topk(importance, k, largest=False).indices] = False
    sizes = [w.numel() for w in weights]
    return [part.view_as(w) for part, w in zip(torch.split(keep, sizes), weights)]


def prune_pools(
    model, languages: Iterable[str], scope: str = "matrix", matrices: Iterable[str] | None = None
) -> dict[tuple, list[LoraMatrix]]:
    """The pruning pools of a scope: {pool key: [LoraMatrix, ...]} (see the module docstring)."""
    if scope not in SCOPES:
        raise LsloError(f"pruning scope '{scope}' not understood; expected one of {list(SCOPES)}")
    if matrices is None:  # §4.2: A and B in one pool would prune the zero-initialised B first, so B only
        matrices = MATRICES if scope == "matrix" else ("B",)
    pools: dict[tuple, list[LoraMatrix]] = {}
    for item in lora_matrices(model, languages, matrices):
        if scope == "matrix":
            key = (item.site, item.index, item.language, item.matrix)
        elif scope == "language":
            key = (item.language,)
        else:
            key = (item.side, item.layer)
        pools.setdefault(key, []).append(item)
    return pools


def prune(
    model,
    ratio: float,
    languages: Iterable[str],
    scope: str = "matrix",
    matrices: Iterable[str] | None = None,
) -> dict[tuple, list[LoraMatrix]]:
    """L1-prune the chosen languages' LoRA matrices to a total fraction ``ratio`` of each pool.

    ``matrices`` defaults to ("A", "B") for scope "matrix" and ("B",) for "language" and "layer" (§4.2).
    Masks only grow: call again with the next GPS ratio (eq. 4) at the next epoch. Returns the pools.
    """
    ratio = check_ratio(ratio)
    pools = prune_pools(model, languages, scope, matrices)
    for items in pools.values():
        weights = [item.weight for item in items]
        keeps = l1_pool_masks(weights, [item.mask() for item in items], ratio)
        for item, keep in zip(items, keeps):
            item.set_mask(keep)
    log.info("pruned %d %s pool(s) to ratio %.4f", len(pools), scope, ratio)
    return pools


def reapply_masks(model) -> None:
    """Zero the raw entries under every mask again (Adam's momentum moves masked raw entries off zero;
    the forward never sees them, but saved weights should be clean)."""
    with torch.no_grad():
        for item in lora_matrices(model):
            masks = getattr(item.bank, f"{item.matrix}_mask")
            if item.language in masks:
                item.weight.mul_(masks[item.language].to(item.weight.dtype))


def pruning_ratio(model, languages: Iterable[str] | None = None, matrices: Iterable[str] = MATRICES) -> float:
    """Actual fraction of masked entries among the chosen languages' LoRA matrices (default: all)."""
    total = pruned = 0
    for item in lora_matrices(model, languages, matrices):
        mask = item.mask()
        total += mask.numel()
        pruned += int((mask == 0).sum())
    return pruned / total if total else 0.0


# --------------------------------------------------------------------------- importance score (eq. 6)

SCORE_COLUMNS = ["language", "side", "layer", "module", "index", "n_params", "n_pruned", "score"]


def subspace_scores(model, target: float) -> pd.DataFrame:
    """Score(B) = #pruned(B) - P * #B (eq. 6) for every B matrix of every language.

    A positive score means B was pruned more than the target rate, so that language can be fine-tuned in a
    smaller subspace there; negative means it needs more parameters (§4.2). ``layer`` is 1-based (figures).
    """
    target = check_ratio(target, "target pruning ratio P")
    rows = []
    for item in lora_matrices(model, matrices=("B",)):
        mask = item.mask()
        n_params, pruned = mask.numel(), int((mask == 0).sum())
        rows.append((item.language, item.side, item.layer + 1, item.module, item.index,
                     n_params, pruned, pruned - target * n_params))
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)
