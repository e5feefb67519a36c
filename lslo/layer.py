"""The Language-Specific LoRA layer (paper §3.1 eq. 3, §4.1 eq. 5).

    h = W x + s_l · B_l A_l x          l = source or target language of the sample (eq. 3)
    h = W x + w_src·LSLo(x, l_src) + w_tgt·LSLo(x, l_tgt)   (weight-learning mode, eq. 5)

Structure (other modules rely on these names):

- ``LoRABank``: one LoRA per language for one frozen weight W (out × in), or for a block of it (below).
  ``A[lang]``: Parameter [r_l, in] (init: see LORA_INITS), ``B[lang]``: Parameter [out, r_l] (zeros),
  ``scaling[lang] = alpha / r_l`` (alpha defaults to r_l, i.e. scaling 1.0), pruning masks as buffers in
  ``A_mask`` / ``B_mask`` (``BufferDict``; a language without a mask is unpruned). The forward always uses
  ``effective_A`` / ``effective_B`` (weight * mask), so pruned entries stay zero whatever the optimizer does.
- ``LSLoLinear``: wraps the frozen ``nn.Linear`` as ``self.base``; ``in_slice`` / ``out_slice`` ((start, end) or
  None) name the block of W the LoRA covers: it reads input units x[start:end] and adds to output units
  h[start:end] (the authors' fc1/fc2 layout: a d_model × d_model LoRA on fc1's first d_model output units and on
  fc2's first d_model input units; lslo.model.LSLoSpec ``fc_lora="slice"``); ``self.banks`` is an
  ``nn.ModuleDict`` keyed "src" or "tgt" (normal mode, ``self.index`` = that key) or both
  (``self.index == "learn"``, eq. 5; the layer-shared ``IndexWeights`` is registered once at the model level,
  only referenced here).
- ``LoRABank.lora`` is eq. 3 for inputs of one language; ``LoRABank.per_sample_delta`` applies it sample by
  sample (the reference); ``LSLoLinear`` adds the LoRA of each sample's language through
  ``lslo.kernels.add_delta``, whose mixed-batch kernels (``LoRABank.mixed_path``) all compute that reference.
  Without autograd a one-language batch runs as a merged layer W + s_l B_l A_l (``LSLoLinear._merged_inference``);
  under autograd a LoRA on a block of W runs ``LSLoLinear._block_forward`` (no full-width copies for the block).
- ``lslo.kernels.Routing``: the per-batch language routing shared by every layer (one grouping per batch and
  index, one host sync per batch).

State-dict keys of one site (relative to the wrapped module): ``base.weight``, ``base.bias``,
``banks.{src|tgt}.A.{lang}``, ``banks.{src|tgt}.B.{lang}``, ``banks.{src|tgt}.A_mask.{lang}``,
``banks.{src|tgt}.B_mask.{lang}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lslo.errors import LsloError
from lslo.kernels import Grouping, Routing, add_delta, add_into_block, frozen_linear_and_input_block
from lslo.options import INDEXES, LORA_INITS  # a LoRA's indexes and A's initialisations, by name


class BufferDict(nn.Module):
    """Keyed buffers (the pruning masks of one matrix per language); saved in the state dict."""

    def set(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._buffers:
            self._buffers[key] = tensor
        else:
            self.register_buffer(key, tensor)

    def pop(self, key: str) -> torch.Tensor:
        return self._buffers.pop(key)

    def __contains__(self, key: str) -> bool:
        return key in self._buffers

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()


class IndexWeights(nn.Module):
    """Layer-shared (w_src, w_tgt) = softmax(logits) of eq. 5; logits start at 0 (equal weights)."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(2))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)


class LoRABank(nn.Module):
    """One LoRA (A_l, B_l, s_l) per language for one frozen weight W of shape [out, in] (eq. 3)."""

    def __init__(self, languages, ranks: dict, in_features: int, out_features: int,
                 alpha: float | None = None, dropout: float = 0.0, device=None, dtype=torch.float32,
                 init: str = "authors"):
        super().__init__()
        if init not in LORA_INITS:
            raise LsloError(f"LoRA init must be one of {', '.join(LORA_INITS)}; got {init!r}")
        self.init = init
        self.languages = list(languages)
        self.ranks = {lang: int(ranks[lang]) for lang in self.languages}
        self.in_features, self.out_features = in_features, out_features
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.scaling = {}
        for lang in self.languages:
            r = self.ranks[lang]
            self.A[lang] = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
            self.B[lang] = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
            self.scaling[lang] = (r if alpha is None else float(alpha)) / r
        self.A_mask = BufferDict()
        self.B_mask = BufferDict()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The kernel of batches that mix languages, one of lslo.kernels.MIXED_PATHS (each computes
        # per_sample_delta; "auto" chooses per call).
        self.mixed_path = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # B zero, so the model is unchanged at step 0; A as LORA_INITS says.
        for lang in self.languages:
            a = self.A[lang]
            if self.init == "authors":  # A^T is the authors' [in, r] tensor: fan_in r
                nn.init.kaiming_uniform_(a.T, a=math.sqrt(5))
            elif self.init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.ranks[lang])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.B[lang])

    def set_mask(self, matrix: str, lang: str, mask: torch.Tensor) -> None:
        """Install a 0/1 pruning mask (same shape as the matrix) for ``matrix`` in {"A", "B"} of ``lang``."""
        weight = self._param(matrix, lang)
        if tuple(mask.shape) != tuple(weight.shape):
            raise LsloError(f"mask for {matrix}[{lang}] has shape {tuple(mask.shape)}; expected {tuple(weight.shape)}")
        getattr(self, f"{matrix}_mask").set(lang, mask.detach().to(device=weight.device, dtype=weight.dtype))

    def _param(self, matrix: str, lang: str) -> nn.Parameter:
        if matrix not in ("A", "B"):
            raise LsloError(f"matrix must be 'A' or 'B', got {matrix!r}")
        if lang not in self.ranks:
            raise LsloError(f"unknown language {lang!r}; this bank has {self.languages}")
        return getattr(self, matrix)[lang]

    def effective_A(self, lang: str) -> torch.Tensor:
        return self.A[lang] * self.A_mask[lang] if lang in self.A_mask else self.A[lang]

    def effective_B(self, lang: str) -> torch.Tensor:
        return self.B[lang] * self.B_mask[lang] if lang in self.B_mask else self.B[lang]

    def delta_weight(self, lang: str) -> torch.Tensor:
        """Dense s_l · B_l A_l (masks applied), shape [out, in]: used for merging only."""
        return self.scaling[lang] * (self.effective_B(lang) @ self.effective_A(lang))

    def lora(self, x: torch.Tensor, lang: str) -> torch.Tensor:
        """s_l · B_l A_l x for inputs that all belong to ``lang`` (computed from activations)."""
        h = F.linear(self.dropout(x), self.effective_A(lang))
        return F.linear(h, self.effective_B(lang)) * self.scaling[lang]

    def per_sample_delta(self, x: torch.Tensor, langs: list) -> torch.Tensor:
        """s_l · B_l A_l x with each sample's own language l (dim 0 of x is the batch), one sample at a time:
        eq. 3 as written, the reference every mixed-batch kernel (lslo.kernels.add_delta) is tested against."""
        return torch.stack([self.lora(sample, lang) for sample, lang in zip(x, langs)])


class LSLoLinear(nn.Module):
    """A frozen ``nn.Linear`` plus language-routed LoRA banks (eq. 3; eq. 5 when ``index == "learn"``)."""

    def __init__(self, base: nn.Linear, site: str, index: str, banks: dict, routing: Routing,
                 index_weights: IndexWeights | None = None, in_slice: tuple | None = None,
                 out_slice: tuple | None = None):
        super().__init__()
        if index not in (*INDEXES, "learn"):
            raise LsloError(f"index of {site} must be 'src', 'tgt' or 'learn', got {index!r}")
        # The block of W the LoRA covers: input units in_slice, output units out_slice (None = all units).
        self.in_slice = _check_slice(in_slice, base.in_features, site, "input")
        self.out_slice = _check_slice(out_slice, base.out_features, site, "output")
        lora_in = base.in_features if self.in_slice is None else self.in_slice[1] - self.in_slice[0]
        lora_out = base.out_features if self.out_slice is None else self.out_slice[1] - self.out_slice[0]
        for key, bank in banks.items():
            if (bank.in_features, bank.out_features) != (lora_in, lora_out):
                raise LsloError(f"{site}: bank {key!r} is {bank.in_features} -> {bank.out_features}; the LoRA block "
                                f"of this site is {lora_in} -> {lora_out}")
        self.base = base
        self.site = site
        self.index = index
        self.banks = nn.ModuleDict(banks)
        # Shared objects are referenced, not registered: the routing is not a module, and the index weights
        # are registered once at the model level so the state dict holds them once.
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "index_weights", index_weights)
        if index == "learn" and (index_weights is None or set(banks) != set(INDEXES)):
            raise LsloError(f"weight-learning site {site} needs both 'src' and 'tgt' banks and index weights")

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # HF code sometimes reads .weight (dtype/device checks)
        return self.base.weight

    def bank_weights(self) -> dict:
        """Index -> mixing weight: 1.0 for the single bank, (w_src, w_tgt) in weight-learning mode (eq. 5)."""
        if self.index != "learn":
            return {self.index: 1.0}
        w = self.index_weights.weights()
        return {"src": w[0], "tgt": w[1]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() or self.training) and self.index != "learn":
            g = self.routing.grouping(self.index, x.shape[0], x.device)
            if g.single is not None:
                return self._merged_inference(x, g)
            return self._add_delta(self.banks[self.index], F.linear(x, self.base.weight, self.base.bias), x, g)
        if (self.in_slice is not None or self.out_slice is not None) and torch.is_grad_enabled():
            return self._block_forward(x)
        out = self.base(x)
        batch_size = x.shape[0]
        for index, w in self.bank_weights().items():
            grouping = self.routing.grouping(index, batch_size, x.device)
            # eq. 5 weighs each bank by its layer-shared softmax weight; eq. 3 has one bank, unweighted
            out = self._add_delta(self.banks[index], out, x, grouping, w if self.index == "learn" else None)
        return out

    def _add_delta(self, bank: LoRABank, out: torch.Tensor, x: torch.Tensor, g: Grouping, weight=None):
        """``kernels.add_delta`` on the block the LoRA covers: reads x[..., in_slice], adds to out[..., out_slice]
        (a block only without autograd: under autograd, forward takes ``_block_forward``)."""
        x = self._lora_input(x)
        if self.out_slice is None:
            return add_delta(bank, out, x, g, weight)
        part = out[..., self.out_slice[0]:self.out_slice[1]]
        added = add_delta(bank, part, x, g, weight)
        if added is not part:  # not added in place into the view (the segments and grouped kernels)
            part.copy_(added)
        return out

    def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward under autograd of a LoRA on a block of W (the slice fc layout). W x + b is computed as
        [rows, out] (no view), so a LoRA on an output block (fc1) adds into it in place (kernels.add_into_block); a
        LoRA reading an input block (fc2) takes the block and W x + b from kernels.frozen_linear_and_input_block,
        whose backward adds the block's gradient into W's input gradient in place. Through plain slices each block
        costs a zero-filled full-width gradient per slice backward, and the output block a full copy (torch.cat)."""
        weight, bias = self.base.weight, self.base.bias
        frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
        if self.in_slice is not None and frozen and x.requires_grad:
            out, lora_x = frozen_linear_and_input_block(x, weight, bias, *self.in_slice)
        else:
            out, lora_x = F.linear(x.reshape(-1, x.shape[-1]), weight, bias), self._lora_input(x)
        rows = out.shape[0]
        for index, w in self.bank_weights().items():
            grouping = self.routing.grouping(index, x.shape[0], x.device)
            w = w if self.index == "learn" else None
            if self.out_slice is None:
                out = add_delta(self.banks[index], out.view(*x.shape[:-1], -1), lora_x, grouping, w).view(rows, -1)
            else:
                delta = add_delta(self.banks[index], None, lora_x, grouping, w)
                out = add_into_block(out, delta.reshape(rows, -1).to(out.dtype), self.out_slice[0])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.in_slice is None else x[..., self.in_slice[0]:self.in_slice[1]]

    def delta_weight(self, index: str, lang: str) -> torch.Tensor:
        """Dense s_l · B_l A_l of bank ``index`` as a [out, in] update of the whole W (zero outside the block)."""
        delta = self.banks[index].delta_weight(lang)
        if self.in_slice is None and self.out_slice is None:
            return delta
        in_start, in_end = self.in_slice or (0, self.in_features)
        out_start, out_end = self.out_slice or (0, self.out_features)
        return F.pad(delta, (in_start, self.in_features - in_end, out_start, self.out_features - out_end))

    def _merged_inference(self, x: torch.Tensor, g: Grouping) -> torch.Tensor:
        """Evaluation without autograd (decoding) of a one-language batch: a merged layer W + s_l B_l A_l, built once
        per batch (what merge_direction does for a whole model; adapter dropout is off in eval mode)."""
        weight, bank = self.base.weight, self.banks[self.index]
        merged = g.batch_cached(bank, "merged",
                                lambda: weight + self.delta_weight(self.index, g.single).to(weight.dtype))
        return F.linear(x, merged, self.base.bias)

    def extra_repr(self) -> str:
        block = "" if self.in_slice is None and self.out_slice is None else \
            f", in_slice={self.in_slice}, out_slice={self.out_slice}"
        return f"site={self.site}, index={self.index}{block}"


def _check_slice(block, size: int, site: str, what: str) -> tuple | None:
    """(start, end) within [0, size], or None; a block covering every unit is None (the plain layout)."""
    if block is None:
        return None
    start, end = (int(v) for v in block)
    if not 0 <= start < end <= size:
        raise LsloError(f"{site}: LoRA {what} block [{start}:{end}] does not fit the layer's {size} {what} units")
    return None if (start, end) == (0, size) else (start, end)
