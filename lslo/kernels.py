"""Mixed-batch kernels of the LSLo layer: eq. 3 for a batch whose samples have different languages.

One entry point, ``add_delta(bank, out, x, grouping)`` = out + s_l B_l A_l x with each sample's own language l
(``bank``: an ``lslo.layer.LoRABank``, which calls this module; this module only reads its parameters),
which every kernel computes (tests hold each against ``LoRABank.per_sample_delta``, eq. 3 one sample at a time):

- "single": a one-language batch, one LoRA (the training path; decoding merges W + s_l B_l A_l instead,
  ``LSLoLinear._merged_inference``);
- "gathered": each sample's A/B gathered from the present languages' and zero-padded to the largest rank,
  batched matmuls (training and encoding);
- "stacked": all present languages' A/B stacked, a per-sample routing scale picks each sample's rank columns
  (one-token decoding steps; without autograd a beam-search step runs ``_add_decode_step``);
- "segments": rows sorted by language, one ``LoRABank.lora`` per language;
- "grouped": rows sorted by language, both LoRA matmuls as grouped GEMMs (``grouped_matmul``).

A bank's ``mixed_path`` (one of MIXED_PATHS) names its kernel; "auto" chooses by a cost model (GATHER_COST) and,
on CUDA where grouped GEMMs are native, by timing (``KernelTimer``).

A LoRA on a block of W (the slice fc layout: fc1's output units, fc2's input units) trains through
``add_into_block`` (the delta added into the frozen layer's output in place) and ``frozen_linear_and_input_block``
(the input block's gradient added into the frozen layer's input gradient in place), so the block costs no
full-width copy or zero-filled gradient; without autograd the kernels add into the block's strided view in place.

``Routing`` holds the batch's languages for every layer of a model and computes each ``Grouping`` (the
single-language fast path, or a stable sort permutation, its inverse and the (lang, start, end) segments) once
per batch and per (index, batch size), with one host sync per batch, never per layer.
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

from lslo.errors import LsloError

MIXED_PATHS = ("auto", "gathered", "stacked", "segments", "grouped")
# Cost of gathering one sample's weights, in tokens: "auto" compares T·sum(r_l) (stacked) with
# max(r_l)·(T + GATHER_COST) (gathered), T = tokens per sample. A gathered weight is a memory copy per row and
# step, a stacked rank column a multiply-add per token: training and encoding (T ~ 30) gather, one-token decoding
# steps stack. On a 2-core CPU, the directions sweep of benchmarks/bench.py at 2866c9e (then with mixed-target
# generate calls) decoded all 870 lang30 directions in 11.3 s with this set to 8 (its decoder steps then
# gathered) and 9.5 s with 64; lang12 took 1.46 / 1.43 s.
GATHER_COST = 64


def add_delta(bank, out: torch.Tensor | None, x: torch.Tensor, g: Grouping, weight=None) -> torch.Tensor:
    """out + weight · s_l B_l A_l x, each sample with its own language l (dim 0 of x is the batch); with ``out``
    None, the delta weight · s_l B_l A_l x alone (what ``add_into_block`` adds into a block of a wider output).

    The last matmul adds into ``out`` (addmm, with s_l as its alpha), so the LoRA costs no separate
    scaling or addition pass over the [rows, out] activations. ``out`` may be a block of a wider output (a view
    whose rows are strided), which decoding adds into in place."""
    if out is not None and weight is None and _add_decode_step(bank, out, x, g):
        return out
    if x.dtype != _weight_dtype(bank) and not torch.is_autocast_enabled(x.device.type):
        x = x.to(_weight_dtype(bank))
    kernel = "single" if g.single is not None else choose_kernel(bank, g, x)
    if kernel in ("segments", "grouped"):
        delta = _delta_segments(bank, x, g) if kernel == "segments" else _delta_grouped(bank, x, g)
        delta = delta if weight is None else delta * weight
        return delta if out is None else out + delta.to(out.dtype)
    if kernel == "single":
        h = F.linear(bank.dropout(x), bank.effective_A(g.single))
        b, scale = bank.effective_B(g.single), bank.scaling[g.single]
    else:
        h, b = _gathered_hidden(bank, x, g) if kernel == "gathered" else _stacked_hidden(bank, x, g)
        scale = 1.0
    if weight is not None:  # eq. 5's layer-shared weight, applied on the small [rows, r] side
        h = h * weight
    if out is None:
        return _product(h, b, scale, per_sample=kernel == "gathered")
    return _add_product(out, h, b, scale, per_sample=kernel == "gathered")


def _product(h: torch.Tensor, b: torch.Tensor, scale: float, per_sample: bool) -> torch.Tensor:
    """scale · h B^T, with B one matrix [out, r] or, ``per_sample``, one per sample [B, r, out]."""
    if per_sample:
        return torch.bmm(h, b)
    delta = F.linear(h, b)
    return delta if scale == 1 else delta * scale


def _add_product(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float, per_sample: bool):
    """out + scale · h B^T, with B one matrix [out, r] or, ``per_sample``, one per sample [B, r, out]; in place
    where no autograd needs ``out`` (decoding: the frozen layer's fresh output, or a block of it)."""
    if not torch.is_autocast_enabled(out.device.type):
        h, b = h.to(out.dtype), b.to(out.dtype)
    in_place = not torch.is_grad_enabled() and h.dtype == b.dtype == out.dtype
    if per_sample:
        rows = _view_or_none(out, h.shape[0], -1, out.shape[-1]) if in_place else None
        if rows is not None:
            rows.baddbmm_(h, b)
            return out
        return torch.baddbmm(out.reshape(h.shape[0], -1, out.shape[-1]), h, b).view(out.shape)
    rows = _view_or_none(out, -1, out.shape[-1]) if in_place else None
    if rows is not None:
        rows.addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
        return out
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
    return flat.view(out.shape)


def _view_or_none(t: torch.Tensor, *shape) -> torch.Tensor | None:
    """``t.view(*shape)`` sharing t's memory (a block of a wider tensor: strided rows, unit column stride), or None
    where no such view exists."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(*shape)
    except RuntimeError:
        return None


def add_into_block(out: torch.Tensor, delta: torch.Tensor, start: int) -> torch.Tensor:
    """out[:, start:start + width] += delta, in place, under autograd too: ``out`` a [rows, out] tensor that is no
    view and that no autograd node saved (the frozen layer's fresh output), ``delta`` [rows, width]."""
    return _AddIntoBlock.apply(out, delta, start)


class _AddIntoBlock(torch.autograd.Function):
    """The backward hands out's gradient through as it is and gives delta its block (a view): no [rows, out] copy
    or zero fill, which a torch.cat of the block with the rest (a full copy forward, one zero-filled gradient per
    slice backward) or an in-place add into a view (autograd copies the base's gradient) would cost."""

    @staticmethod
    def forward(ctx, out, delta, start):
        ctx.block = (start, delta.shape[1])
        out.narrow(1, start, delta.shape[1]).add_(delta)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        start, width = ctx.block
        return grad, grad.narrow(1, start, width), None


def choose_kernel(bank, g: Grouping, x: torch.Tensor) -> str:
    """The bank's ``mixed_path``; for "auto" the cost model's choice (GATHER_COST), timed on CUDA (KernelTimer)."""
    if bank.mixed_path != "auto":
        return bank.mixed_path
    ranks = [bank.ranks[lang] for lang in g.languages]
    tokens = math.prod(x.shape[1:-1])  # per sample
    if max(ranks) * (tokens + GATHER_COST) >= tokens * sum(ranks):
        return "stacked"
    if x.device.type == "cuda" and grouped_mm_is_native(x.device, compute_dtype(x, _weight_dtype(bank))):
        return KERNEL_TIMER.faster(bank, g, x, ("gathered", "grouped"))
    return "gathered"


def _weight_dtype(bank) -> torch.dtype:
    return bank.A[bank.languages[0]].dtype


def _rank_scaling(bank, g: Grouping) -> list:
    return [(bank.ranks[lang], bank.scaling[lang]) for lang in g.languages]


def frozen_linear_and_input_block(x: torch.Tensor, weight: torch.Tensor, bias, start: int, end: int) -> tuple:
    """(W x + b as [rows, out], x[..., start:end]) for a frozen W and b: the frozen layer and the input block its
    LoRA reads (fc2's slice). The backward adds the block's gradient into the frozen layer's fresh input gradient
    in place, where autograd would zero-fill a [rows, in] gradient for the slice and then add the two."""
    return _FrozenLinearAndInputBlock.apply(x, weight, bias, start, end)


class _FrozenLinearAndInputBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, start, end):
        ctx.save_for_backward(weight)
        ctx.block, ctx.x_dtype = (start, end), x.dtype
        out = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)  # [rows, out]: no view, so adds into it in place
        return out, x[..., start:end]

    @staticmethod
    def backward(ctx, grad_out, grad_block):
        (weight,) = ctx.saved_tensors
        start, end = ctx.block
        # fresh, so the block's gradient adds into it in place; in x's dtype, as autocast's cast back would give it
        grad_x = grad_out.mm(weight.to(grad_out.dtype)).to(ctx.x_dtype)
        grad_x = grad_x.view(*grad_block.shape[:-1], grad_x.shape[-1])
        grad_x[..., start:end].add_(grad_block)
        return grad_x, None, None, None, None


# ---- stacked, and one-token decoding steps -----------------------------------------------------------------
def _add_decode_step(bank, out: torch.Tensor, x: torch.Tensor, g: Grouping) -> bool:
    """A beam-search step of a mixed batch (eval mode, no autograd, one token per sample, stacked kernel):
    out += routed stacked LoRA, in place, with the stacked A^T, B^T and routing scale built once per batch.
    False, with ``out`` untouched, where the general path applies."""
    if (g.single is not None or torch.is_grad_enabled() or bank.training
            or math.prod(x.shape[1:-1]) != 1 or torch.is_autocast_enabled(x.device.type)):
        return False
    rows = _view_or_none(out, -1, bank.out_features)  # out may be a block of a wider output: strided rows
    if rows is None:
        return False
    step = g.batch_cached(bank, ("decode step", x.dtype, out.dtype), lambda: _decode_step_weights(bank, g, x, out))
    if step is None:
        return False
    a_t, route, b_t = step
    h = torch.mm(x.reshape(-1, bank.in_features), a_t).mul_(route)
    rows.addmm_(h, b_t)
    return True


def _decode_step_weights(bank, g: Grouping, x: torch.Tensor, out: torch.Tensor):
    dtype = _weight_dtype(bank)
    if choose_kernel(bank, g, x) != "stacked" or not x.dtype == out.dtype == dtype:
        return None
    a, b = _stacked_weights(bank, g)
    return a.t(), g.route_scale(_rank_scaling(bank, g), dtype), b.t()


def _stacked_weights(bank, g: Grouping) -> tuple:
    return g.batch_cached(bank, "stacked", lambda: (
        torch.cat([bank.effective_A(lang) for lang in g.languages], dim=0),
        torch.cat([bank.effective_B(lang) for lang in g.languages], dim=1)))


def _stacked_hidden(bank, x: torch.Tensor, g: Grouping) -> tuple:
    """Mixed batch without moving activations: the present languages' A (and B) are stacked into one
    [sum r_l, in] matrix, and a per-sample routing scale (s_l on the sample's own rank columns, 0 elsewhere)
    selects each sample's LoRA. -> (routed A x, stacked B). Low-rank matmuls are memory-bound on GPUs, so this
    costs about one LoRA while avoiding the gather/scatter copies of full activations; absent languages still
    get no gradient."""
    a, b = _stacked_weights(bank, g)
    h = F.linear(bank.dropout(x), a)
    route = g.route_scale(_rank_scaling(bank, g), h.dtype)
    return h * route.view(x.shape[0], *([1] * (x.dim() - 2)), -1), b


# ---- gathered ----------------------------------------------------------------------------------------------
def _gathered_hidden(bank, x: torch.Tensor, g: Grouping) -> tuple:
    """Mixed batch at one LoRA's cost: each sample's A and B are gathered from the present languages' stacked
    matrices, zero-padded to the largest rank r, and applied with batched matmuls: FLOPs of a single rank-r
    LoRA, no copy of the activations. -> (s_l A_l x as [B, T, r], B_l^T as [B, r, out])."""
    index, scale = g.gather_index(_rank_scaling(bank, g))
    a, b = g.batch_cached(bank, "gathered", lambda: (
        torch.cat([bank.effective_A(lang) for lang in g.languages] + [_zero_row(bank, bank.in_features)]),
        torch.cat([bank.effective_B(lang).t() for lang in g.languages] + [_zero_row(bank, bank.out_features)])))
    rows = index.shape[1]
    a_per_sample = a.index_select(0, index.view(-1)).view(-1, rows, bank.in_features)
    b_per_sample = b.index_select(0, index.view(-1)).view(-1, rows, bank.out_features)
    h = torch.bmm(bank.dropout(x).reshape(x.shape[0], -1, bank.in_features), a_per_sample.transpose(1, 2))
    return (h if scale is None else h * scale), b_per_sample


def _zero_row(bank, width: int) -> torch.Tensor:
    # the padding row that every sample whose rank is below the largest points at
    return bank.A[bank.languages[0]].new_zeros(1, width)


# ---- segments and grouped: rows sorted by language ---------------------------------------------------------
def _delta_segments(bank, x: torch.Tensor, g: Grouping) -> torch.Tensor:
    """Rows sorted by language, one LoRA per language, rows unsorted."""
    # split (not slicing: a slice's backward materialises a full-size zero gradient per segment)
    chunks = permute_rows(x, g.perm, g.inv_perm).split([end - start for _, start, end in g.segments])
    parts = [bank.lora(chunk, lang) for chunk, (lang, _, _) in zip(chunks, g.segments)]
    return permute_rows(torch.cat(parts, dim=0), g.inv_perm, g.perm)


def _delta_grouped(bank, x: torch.Tensor, g: Grouping) -> torch.Tensor:
    """Rows sorted by language as in "segments", but each of the two LoRA matmuls is one grouped GEMM over
    the present languages (one kernel launch, not one per language), ranks zero-padded to a common width.
    Computed in the autocast dtype under autocast (grouped_mm is not on autocast's lists)."""
    dtype = compute_dtype(x, _weight_dtype(bank))
    a, b = g.batch_cached(bank, ("grouped", dtype), lambda: _grouped_weights(bank, g, dtype))
    tokens = math.prod(x.shape[1:-1])
    rows = permute_rows(bank.dropout(x), g.perm, g.inv_perm).reshape(-1, bank.in_features).to(dtype)
    offsets = g.row_offsets(tokens)
    delta = grouped_matmul(grouped_matmul(rows, a, offsets), b, offsets)
    return permute_rows(delta.view(*x.shape[:-1], bank.out_features), g.inv_perm, g.perm)


def _grouped_weights(bank, g: Grouping, dtype: torch.dtype) -> tuple:
    """([G, in, R] A_l^T, [G, R, out] s_l B_l^T) of the present languages in segment order, ranks zero-padded
    to R: the largest rank rounded up to 16 bytes, which grouped GEMM kernels need for their strides."""
    width = -(-max(bank.ranks[lang] for lang in g.languages) * dtype.itemsize // 16) * 16 // dtype.itemsize
    a = torch.stack([F.pad(bank.effective_A(lang), (0, 0, 0, width - bank.ranks[lang]))
                     for lang in g.languages]).to(dtype)
    b = torch.stack([F.pad(bank.effective_B(lang) * bank.scaling[lang], (0, width - bank.ranks[lang]))
                     for lang in g.languages]).to(dtype)
    return a.transpose(1, 2), b.transpose(1, 2)


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


# ---- auto's measured choice --------------------------------------------------------------------------------
class KernelTimer:
    """``auto``'s measured choice between mixed-batch kernels on CUDA: at the first batch of each (device, dtype,
    layer shape, languages present, rows rounded up to a power of two, autograd on/off), every candidate runs
    forward (and backward when autograd records) on a copy of the bank and random inputs of the batch's shape,
    and the fastest median is kept for the rest of the run. The copy keeps the real parameters' gradients and
    the training's RNG state untouched."""

    def __init__(self, repeats: int = 3):
        self.repeats = repeats
        self.choices: dict = {}

    def key(self, bank, g: Grouping, x: torch.Tensor) -> tuple:
        rows = 1 << max(x.shape[:-1].numel() - 1, 0).bit_length()
        return (x.device, compute_dtype(x, _weight_dtype(bank)), bank.in_features, bank.out_features,
                tuple(sorted(bank.ranks[lang] for lang in g.languages)), rows, torch.is_grad_enabled())

    def faster(self, bank, g: Grouping, x: torch.Tensor, candidates: tuple) -> str:
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

    def seconds(self, bank, g: Grouping, x: torch.Tensor, kernel: str) -> float:
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
                delta = add_delta(probe, out, inputs, g)
                if delta.requires_grad:
                    delta.sum().backward()
                _synchronize(x.device)
                times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


KERNEL_TIMER = KernelTimer()


# ---- per-batch routing -------------------------------------------------------------------------------------
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

    def batch_cached(self, bank, kind: str, build):
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
