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
- ``Routing``: the per-batch language routing shared by every layer. The grouping (single-language fast path, or
  a stable sort permutation, its inverse and the (lang, start, end) segments) is computed once per batch and per
  (index, batch size), with one host sync per batch, never per layer.
- Mixed batches (``LoRABank.mixed_path``): "gathered" (each sample's A/B gathered and zero-padded to the largest
  rank, batched matmuls; training and encoding), "stacked" (all present languages' A/B stacked, per-sample routing
  scale; one-token decoding steps), "segments" (rows sorted by language), "grouped" (rows sorted by language, both
  LoRA matmuls as grouped GEMMs, ``grouped_matmul``; chosen by "auto" only on CUDA where measured faster,
  ``KernelTimer``). Without autograd a one-language batch runs as a merged layer W + s_l B_l A_l.

State-dict keys of one site (relative to the wrapped module): ``base.weight``, ``base.bias``,
``banks.{src|tgt}.A.{lang}``, ``banks.{src|tgt}.B.{lang}``, ``banks.{src|tgt}.A_mask.{lang}``,
``banks.{src|tgt}.B_mask.{lang}``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lslo.errors import LsloError

INDEXES = ("src", "tgt")


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


MIXED_PATHS = ("auto", "gathered", "stacked", "segments", "grouped")
# Initialisation of A (B is always zero, so the model is unchanged at step 0):
#   "authors": the authors' release stores A as [in, r] and calls kaiming_uniform_(a=√5), whose fan_in is then r:
#              A ~ U(-1/√r, 1/√r) (std 1/√(3r): 0.408 at r = 2, 0.204 at r = 8);
#   "peft":    PEFT's default, kaiming_uniform_(a=√5) on A as [r, in]: U(-1/√in, 1/√in);
#   "gaussian": the paper's text ("Gaussian"), as PEFT's init_lora_weights="gaussian": N(0, (1/r)²).
LORA_INITS = ("authors", "peft", "gaussian")
# Cost of gathering one sample's weights, in tokens: "auto" compares T·sum(r_l) (stacked) with
# max(r_l)·(T + GATHER_COST) (gathered), T = tokens per sample. A gathered weight is a memory copy per row and
# step, a stacked rank column a multiply-add per token: training and encoding (T ~ 30) gather, one-token decoding
# steps stack. On a 2-core CPU, the directions sweep of benchmarks/bench.py at 2866c9e (then with mixed-target
# generate calls) decoded all 870 lang30 directions in 11.3 s with this set to 8 (its decoder steps then
# gathered) and 9.5 s with 64; lang12 took 1.46 / 1.43 s.
GATHER_COST = 64


class _PermuteRows(torch.autograd.Function):
    """x[perm] whose backward is the gather grad[inv_perm], not index_select's scatter-add (slow on CPU)."""

    @staticmethod
    def forward(ctx, x, perm, inv_perm):
        ctx.save_for_backward(inv_perm)
        return _gather_rows(x, perm)

    @staticmethod
    def backward(ctx, grad):
        (inv_perm,) = ctx.saved_tensors
        return _gather_rows(grad, inv_perm), None, None


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # on a 2-D contiguous view index_select copies whole rows (much faster than the N-D kernel on CPU)
    return x.reshape(x.shape[0], -1).index_select(0, index).view(-1, *x.shape[1:])


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
    return _PermuteRows.apply(x, perm, inv_perm)


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
                 init: str = "peft"):
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
        # Mixed-batch kernel (all compute the same eq. 3): "gathered" (each sample's A/B gathered, padded to the
        # largest rank, batched matmuls), "stacked" (all languages' A/B stacked, per-sample routing scale),
        # "segments" (rows sorted by language, one LoRA per language), or "auto" (see GATHER_COST).
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

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, g: "Grouping", weight=None) -> torch.Tensor:
        """out + weight · s_l B_l A_l x, each sample with its own language l (dim 0 of x is the batch).

        The last matmul adds into ``out`` (addmm, with s_l as its alpha), so the LoRA costs no separate
        scaling or addition pass over the [rows, out] activations."""
        if weight is None and self._add_decode_step(out, x, g):
            return out
        if x.dtype != self.A[self.languages[0]].dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.A[self.languages[0]].dtype)
        kernel = "single" if g.single is not None else self.mixed_kernel(g, x)
        if kernel in ("segments", "grouped"):
            delta = self._delta_segments(x, g) if kernel == "segments" else self._delta_grouped(x, g)
            return out + (delta if weight is None else delta * weight).to(out.dtype)
        if kernel == "single":
            h = F.linear(self.dropout(x), self.effective_A(g.single))
            b, scale = self.effective_B(g.single), self.scaling[g.single]
        else:
            h, b = self._gathered_hidden(x, g) if kernel == "gathered" else self._stacked_hidden(x, g)
            scale = 1.0
        if weight is not None:  # eq. 5's layer-shared weight, applied on the small [rows, r] side
            h = h * weight
        if not torch.is_autocast_enabled(out.device.type):
            h, b = h.to(out.dtype), b.to(out.dtype)
        in_place = not torch.is_grad_enabled() and out.is_contiguous() and h.dtype == b.dtype == out.dtype
        if kernel == "gathered":  # per-sample B: [B, r, out]
            per_sample = out.view(h.shape[0], -1, out.shape[-1])
            if in_place:
                per_sample.baddbmm_(h, b)
                return out
            return torch.baddbmm(per_sample, h, b).view(out.shape)
        if in_place:  # decoding: add into the frozen layer's fresh output (no autograd needs it)
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
            return out
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
        return flat.view(out.shape)

    def _add_decode_step(self, out: torch.Tensor, x: torch.Tensor, g: "Grouping") -> bool:
        """A beam-search step of a mixed batch (eval mode, no autograd, one token per sample, stacked kernel):
        out += routed stacked LoRA, in place, with the stacked A^T, B^T and routing scale built once per batch.
        False, with ``out`` untouched, where the general path applies."""
        if (g.single is not None or torch.is_grad_enabled() or self.training or not out.is_contiguous()
                or math.prod(x.shape[1:-1]) != 1 or torch.is_autocast_enabled(x.device.type)):
            return False
        step = g.batch_cached(self, ("decode step", x.dtype, out.dtype), lambda: self._decode_step_weights(g, x, out))
        if step is None:
            return False
        a_t, route, b_t = step
        h = torch.mm(x.reshape(-1, self.in_features), a_t).mul_(route)
        out.view(-1, self.out_features).addmm_(h, b_t)
        return True

    def _decode_step_weights(self, g: "Grouping", x: torch.Tensor, out: torch.Tensor):
        dtype = self.A[self.languages[0]].dtype
        if self.mixed_kernel(g, x) != "stacked" or not x.dtype == out.dtype == dtype:
            return None
        a, b = self._stacked_weights(g)
        return a.t(), g.route_scale(self._rank_scaling(g), dtype), b.t()

    def mixed_kernel(self, g: "Grouping", x: torch.Tensor) -> str:
        if self.mixed_path != "auto":
            return self.mixed_path
        ranks = [self.ranks[lang] for lang in g.languages]
        tokens = math.prod(x.shape[1:-1])  # per sample
        if max(ranks) * (tokens + GATHER_COST) >= tokens * sum(ranks):
            return "stacked"
        if x.device.type == "cuda" and grouped_mm_is_native(x.device, compute_dtype(x, self._dtype)):
            return KERNEL_TIMER.faster(self, g, x, ("gathered", "grouped"))
        return "gathered"

    @property
    def _dtype(self) -> torch.dtype:
        return self.A[self.languages[0]].dtype

    def _rank_scaling(self, g: "Grouping") -> list:
        return [(self.ranks[lang], self.scaling[lang]) for lang in g.languages]

    def _gathered_hidden(self, x: torch.Tensor, g: "Grouping") -> tuple:
        """Mixed batch at one LoRA's cost: each sample's A and B are gathered from the present languages' stacked
        matrices, zero-padded to the largest rank r, and applied with batched matmuls: FLOPs of a single rank-r
        LoRA, no copy of the activations. -> (s_l A_l x as [B, T, r], B_l^T as [B, r, out])."""
        index, scale = g.gather_index(self._rank_scaling(g))
        a, b = g.batch_cached(self, "gathered", lambda: (
            torch.cat([self.effective_A(lang) for lang in g.languages] + [self._zero_row(self.in_features)]),
            torch.cat([self.effective_B(lang).t() for lang in g.languages] + [self._zero_row(self.out_features)])))
        rows = index.shape[1]
        a_per_sample = a.index_select(0, index.view(-1)).view(-1, rows, self.in_features)
        b_per_sample = b.index_select(0, index.view(-1)).view(-1, rows, self.out_features)
        h = torch.bmm(self.dropout(x).reshape(x.shape[0], -1, self.in_features), a_per_sample.transpose(1, 2))
        return (h if scale is None else h * scale), b_per_sample

    def _zero_row(self, width: int) -> torch.Tensor:
        # the padding row that every sample whose rank is below the largest points at
        return self.A[self.languages[0]].new_zeros(1, width)

    def _delta_segments(self, x: torch.Tensor, g: "Grouping") -> torch.Tensor:
        """Rows sorted by language, one LoRA per language, rows unsorted."""
        # split (not slicing: a slice's backward materialises a full-size zero gradient per segment)
        chunks = permute_rows(x, g.perm, g.inv_perm).split([end - start for _, start, end in g.segments])
        parts = [self.lora(chunk, lang) for chunk, (lang, _, _) in zip(chunks, g.segments)]
        return permute_rows(torch.cat(parts, dim=0), g.inv_perm, g.perm)

    def _delta_grouped(self, x: torch.Tensor, g: "Grouping") -> torch.Tensor:
        """Rows sorted by language as in "segments", but each of the two LoRA matmuls is one grouped GEMM over
        the present languages (one kernel launch, not one per language), ranks zero-padded to a common width.
        Computed in the autocast dtype under autocast (grouped_mm is not on autocast's lists)."""
        dtype = compute_dtype(x, self._dtype)
        a, b = g.batch_cached(self, ("grouped", dtype), lambda: self._grouped_weights(g, dtype))
        tokens = math.prod(x.shape[1:-1])
        rows = permute_rows(self.dropout(x), g.perm, g.inv_perm).reshape(-1, self.in_features).to(dtype)
        offsets = g.row_offsets(tokens)
        delta = grouped_matmul(grouped_matmul(rows, a, offsets), b, offsets)
        return permute_rows(delta.view(*x.shape[:-1], self.out_features), g.inv_perm, g.perm)

    def _grouped_weights(self, g: "Grouping", dtype: torch.dtype) -> tuple:
        """([G, in, R] A_l^T, [G, R, out] s_l B_l^T) of the present languages in segment order, ranks zero-padded
        to R: the largest rank rounded up to 16 bytes, which grouped GEMM kernels need for their strides."""
        width = -(-max(self.ranks[lang] for lang in g.languages) * dtype.itemsize // 16) * 16 // dtype.itemsize
        a = torch.stack([F.pad(self.effective_A(lang), (0, 0, 0, width - self.ranks[lang]))
                         for lang in g.languages]).to(dtype)
        b = torch.stack([F.pad(self.effective_B(lang) * self.scaling[lang], (0, width - self.ranks[lang]))
                         for lang in g.languages]).to(dtype)
        return a.transpose(1, 2), b.transpose(1, 2)

    def _stacked_weights(self, g: "Grouping") -> tuple:
        return g.batch_cached(self, "stacked", lambda: (
            torch.cat([self.effective_A(lang) for lang in g.languages], dim=0),
            torch.cat([self.effective_B(lang) for lang in g.languages], dim=1)))

    def _stacked_hidden(self, x: torch.Tensor, g: "Grouping") -> tuple:
        """Mixed batch without moving activations: the present languages' A (and B) are stacked into one
        [sum r_l, in] matrix, and a per-sample routing scale (s_l on the sample's own rank columns, 0 elsewhere)
        selects each sample's LoRA. -> (routed A x, stacked B). Low-rank matmuls are memory-bound on GPUs, so this
        costs about one LoRA while avoiding the gather/scatter copies of full activations; absent languages still
        get no gradient."""
        a, b = self._stacked_weights(g)
        h = F.linear(self.dropout(x), a)
        route = g.route_scale(self._rank_scaling(g), h.dtype)
        return h * route.view(x.shape[0], *([1] * (x.dim() - 2)), -1), b


def compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls of x run in: the autocast dtype under autocast, else the LoRA weights' dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight_dtype


def grouped_mm_is_native(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM has a real kernel here: bf16 on CUDA compute capability 9.x/10.x (CUTLASS);
    elsewhere on CUDA it loops over the groups after copying the offsets to the host."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows [M, K] (grouped: group i is rows offsets[i-1]:offsets[i]), weights [G, K, N] -> [M, N], group i's
    rows times weights[i]. ``F.grouped_mm`` where its stride rule holds (K and N of 16 bytes' multiples; it exists
    on CPU too), else the same product group by group."""
    aligned = (rows.shape[1] * rows.element_size()) % 16 == 0 and (weights.shape[2] * rows.element_size()) % 16 == 0
    if aligned and hasattr(F, "grouped_mm"):
        return _ContiguousGrad.apply(F.grouped_mm(rows, weights, offs=offsets))
    return grouped_matmul_reference(rows, weights, offsets)


def grouped_matmul_reference(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``grouped_matmul`` one group at a time (shapes F.grouped_mm does not take, and tests)."""
    ends = offsets.tolist()
    chunks = rows.split([end - start for start, end in zip([0] + ends[:-1], ends)])
    return torch.cat([chunk @ weight for chunk, weight in zip(chunks, weights)])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward rejects expanded (stride 0)
    gradients, such as the one of out.sum()."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class KernelTimer:
    """``auto``'s measured choice between mixed-batch kernels on CUDA: at the first batch of each (device, dtype,
    layer shape, languages present, rows rounded up to a power of two, autograd on/off), every candidate runs
    forward (and backward when autograd records) on a copy of the bank and random inputs of the batch's shape,
    and the fastest median is kept for the rest of the run. The copy keeps the real parameters' gradients and
    the training's RNG state untouched."""

    def __init__(self, repeats: int = 3):
        self.repeats = repeats
        self.choices: dict = {}

    def key(self, bank: "LoRABank", g: "Grouping", x: torch.Tensor) -> tuple:
        rows = 1 << max(x.shape[:-1].numel() - 1, 0).bit_length()
        return (x.device, compute_dtype(x, bank._dtype), bank.in_features, bank.out_features,
                tuple(sorted(bank.ranks[lang] for lang in g.languages)), rows, torch.is_grad_enabled())

    def faster(self, bank: "LoRABank", g: "Grouping", x: torch.Tensor, candidates: tuple) -> str:
        key = self.key(bank, g, x) + (candidates,)
        if key not in self.choices:
            seconds = {}
            for name in candidates:
                try:
                    seconds[name] = self.seconds(bank, g, x, name)
                except (RuntimeError, NotImplementedError) as err:  # e.g. a grouped GEMM this device refuses
                    warnings.warn(f"mixed-batch kernel {name!r} failed on {x.device} ({err}); 'auto' leaves it out")
                    seconds[name] = math.inf
            self.choices[key] = min(candidates, key=seconds.__getitem__)
        return self.choices[key]

    def seconds(self, bank: "LoRABank", g: "Grouping", x: torch.Tensor, kernel: str) -> float:
        """Median seconds of one forward (+ backward) of ``kernel`` on a copy of ``bank``."""
        probe = copy.deepcopy(bank)
        probe.mixed_path = kernel
        g = dataclasses.replace(g, _routes={})  # the probe's weights must not enter the batch's cache
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            inputs = torch.randn(x.shape, device=x.device, dtype=x.dtype, requires_grad=torch.is_grad_enabled())
            out = torch.zeros(*x.shape[:-1], bank.out_features, device=x.device, dtype=x.dtype)
            times = []
            for _ in range(self.repeats + 1):  # the first run warms up
                _synchronize(x.device)
                start = time.perf_counter()
                delta = probe.add_delta(out, inputs, g)
                if delta.requires_grad:
                    delta.sum().backward()
                _synchronize(x.device)
                times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


KERNEL_TIMER = KernelTimer()


@dataclass(eq=False)
class Grouping:
    """Language grouping of one batch for one index: ``single`` language (fast path) or sorted segments."""

    single: str | None
    perm: torch.Tensor | None = None
    inv_perm: torch.Tensor | None = None
    segments: tuple = ()
    ids: torch.Tensor | None = None  # host copies of the per-row language ids and of perm (mixed batches only)
    host_perm: torch.Tensor | None = None
    device: torch.device | None = None
    _routes: dict = field(default_factory=dict)

    def route_scale(self, rank_scaling: list, dtype: torch.dtype) -> torch.Tensor:
        """[rows, sum r_l]: s_l on the columns of row's language l in the stacked A (segment order), else 0.
        Built once per batch for each (ranks, scalings, dtype); every bank with the same ranks shares it."""
        key = (tuple(rank_scaling), dtype)
        if key not in self._routes:
            route = torch.zeros(self.ids.numel(), sum(r for r, _ in rank_scaling))
            offset = 0
            for (lang, start, end), (r, s) in zip(self.segments, rank_scaling):
                route[self.host_perm[start:end], offset:offset + r] = s
                offset += r
            self._routes[key] = route.to(device=self.device, dtype=dtype, non_blocking=True)
        return self._routes[key]

    @property
    def languages(self) -> list:
        """The languages present in the batch, in segment (= stacking) order."""
        return [lang for lang, _, _ in self.segments]

    def batch_cached(self, bank: "LoRABank", kind: str, build):
        """``build()``: weights a bank derives for this batch (stacked A/B, a merged W). Kept for the rest of the
        batch when no gradient is recorded, since weights cannot change during one generate call (every beam step
        reuses them); rebuilt on every call otherwise, so autograd sees the parameters."""
        if torch.is_grad_enabled():
            return build()
        key = ("weights", id(bank), kind)
        if key not in self._routes:
            self._routes[key] = build()
        return self._routes[key]

    def row_offsets(self, tokens: int) -> torch.Tensor:
        """int32 [G]: the end of each language's rows in the sorted batch, ``tokens`` rows per sample (grouped GEMM)."""
        key = ("offsets", tokens)
        if key not in self._routes:
            ends = torch.tensor([end * tokens for _, _, end in self.segments], dtype=torch.int32)
            self._routes[key] = ends.to(self.device, non_blocking=True)
        return self._routes[key]

    def gather_index(self, rank_scaling: list) -> tuple:
        """([rows, max r_l] indexes into the stacked A (segment order) plus one trailing zero row, which pads the
        shorter ranks; [rows, 1, 1] per-row scaling s_l, or None when every s_l is 1). Cached like route_scale."""
        key = ("gather", tuple(rank_scaling))
        if key not in self._routes:
            total, width = sum(r for r, _ in rank_scaling), max(r for r, _ in rank_scaling)
            index = torch.full((self.ids.numel(), width), total, dtype=torch.long)
            scale = torch.ones(self.ids.numel())
            offset = 0
            for (lang, start, end), (r, s) in zip(self.segments, rank_scaling):
                rows = self.host_perm[start:end]
                index[rows, :r] = torch.arange(offset, offset + r)
                scale[rows] = s
                offset += r
            scale = None if bool((scale == 1).all()) else scale.view(-1, 1, 1).to(self.device, non_blocking=True)
            self._routes[key] = (index.to(self.device, non_blocking=True), scale)
        return self._routes[key]


class Routing:
    """Per-batch language routing shared by every LSLoLinear of a model.

    ``set(src_lang, tgt_lang)`` stores LongTensors [B] of ids into ``languages``. Layers ask
    ``grouping(index, batch_size)``; batch_size is B (encoder, training decoder) or B·k during beam search,
    where HF repeats each sample k times consecutively (repeat_interleave). Groupings are cached per
    (index, batch_size); the ids are copied to the host once per batch.
    """

    def __init__(self, languages):
        self.languages = list(languages)
        self.src_lang: torch.Tensor | None = None
        self.tgt_lang: torch.Tensor | None = None
        self._host_ids: dict | None = None
        self._cache: dict = {}

    @property
    def active(self) -> bool:
        return self.src_lang is not None

    def set(self, src_lang: torch.Tensor, tgt_lang: torch.Tensor) -> None:
        src_lang, tgt_lang = torch.as_tensor(src_lang).long(), torch.as_tensor(tgt_lang).long()
        if src_lang.dim() != 1 or src_lang.shape != tgt_lang.shape:
            raise LsloError(f"src_lang and tgt_lang must be 1-D of the same length (one id per sample); "
                            f"got shapes {tuple(src_lang.shape)} and {tuple(tgt_lang.shape)}")
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self._host_ids, self._cache = None, {}

    def clear(self) -> None:
        self.src_lang = self.tgt_lang = None
        self._host_ids, self._cache = None, {}

    def _ids(self) -> dict:
        if self._host_ids is None:  # the one host sync of the batch
            both = torch.stack([self.src_lang, self.tgt_lang]).cpu()
            if both.numel() and (both.min() < 0 or both.max() >= len(self.languages)):
                raise LsloError(f"language ids must be in [0, {len(self.languages)}) for languages "
                                f"{self.languages}; got {both.unique().tolist()}")
            self._host_ids = {"src": both[0], "tgt": both[1]}
        return self._host_ids

    def grouping(self, index: str, batch_size: int, device: torch.device) -> Grouping:
        key = (index, batch_size, device)
        if key not in self._cache:
            self._cache[key] = self._compute(index, batch_size, device)
        return self._cache[key]

    def _compute(self, index: str, batch_size: int, device) -> Grouping:
        if not self.active:
            raise LsloError("LSLo layers need the batch languages: call LSLoModel(..., src_lang=, tgt_lang=) "
                            "or LSLoModel.generate(...), not the wrapped HF model directly")
        ids = self._ids()[index]
        n = ids.numel()
        if n == 0 or batch_size % n:
            raise LsloError(f"LSLo layer saw batch size {batch_size}, but the routing holds {n} samples; expected "
                            f"a multiple of {n} (beam search repeats each sample num_beams times)")
        if batch_size != n:
            ids = ids.repeat_interleave(batch_size // n)
        first = int(ids[0])
        if bool((ids == first).all()):
            return Grouping(single=self.languages[first])
        sorted_ids, perm = torch.sort(ids, stable=True)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(batch_size)
        values, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        ends = counts.cumsum(0).tolist()
        starts = [0] + ends[:-1]
        segments = tuple((self.languages[v], s, e) for v, s, e in zip(values.tolist(), starts, ends))
        return Grouping(None, perm.to(device, non_blocking=True), inv_perm.to(device, non_blocking=True), segments,
                        ids=ids, device=device, host_perm=perm)


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
        out = self.base(x)
        batch_size = x.shape[0]
        for index, w in self.bank_weights().items():
            grouping = self.routing.grouping(index, batch_size, x.device)
            # eq. 5 weighs each bank by its layer-shared softmax weight; eq. 3 has one bank, unweighted
            out = self._add_delta(self.banks[index], out, x, grouping, w if self.index == "learn" else None)
        return out

    def _add_delta(self, bank: LoRABank, out: torch.Tensor, x: torch.Tensor, g: Grouping, weight=None):
        """``bank.add_delta`` on the block the LoRA covers: it reads x[..., in_slice], adds to out[..., out_slice]."""
        if self.in_slice is not None:
            x = x[..., self.in_slice[0]:self.in_slice[1]]
        if self.out_slice is None:
            return bank.add_delta(out, x, g, weight)
        start, end = self.out_slice
        part = out[..., start:end]
        added = bank.add_delta(part, x, g, weight)
        if added is part:  # added in place into the view (decoding without autograd)
            return out
        if torch.is_grad_enabled():
            return torch.cat([out[..., :start], added, out[..., end:]], dim=-1)
        part.copy_(added)
        return out

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
