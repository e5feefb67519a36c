"""Label-smoothed cross entropy from the decoder's last hidden states, block by block over target tokens, so that
the N x V logits never exist at once (train.loss: chunked).

At the paper's M2M-124 615M shape (V = 256,125) the plain path (lslo.train.label_smoothed_nll_loss on the full
logits) holds, for a batch of 4,096 target tokens, float32 logits, their log-softmax and its gradient of
4,096 x 256,125 x 4 bytes = 4 GiB each. Here a block of `rows_per_block` tokens at a time goes through the output
projection, log-softmax and loss. In training, the same pass also takes the loss's gradients with respect to the
hidden states and, only when it is trained (Ft-all), the projection weight, so no block's logits are kept or
computed twice; the backward pass scales them by the incoming gradient.

The loss is fairseq's definition, lslo.train.label_smoothed_nll_loss's, term by term: per kept token
(1 - ε - ε_i)·nll + ε_i·Σ_v(-log p_v) with ε_i = ε/(V - 1), tokens equal to ignore_index left out, summed. The
per-token values are summed once, over all tokens, as the plain path does; the gradients go through torch's own
log-softmax backward kernel on each block.

Precision follows the plain path under AMP: the projection runs in the autocast dtype (float16/bfloat16), the
log-softmax in float32. M2M100ForConditionalGeneration's output projection is `lm_head`, a Linear without bias tied
to the shared embedding; it has no final_logits_bias and no logit scaling (scale_embedding scales the inputs only).
"""

from __future__ import annotations

# liger-kernel's FusedLinearCrossEntropy, cut-cross-entropy: Triton/CUDA only (CCE's torch fallback builds the logits).

import torch
import torch.nn.functional as F

from lslo.options import DEFAULT_CHUNK_ELEMENTS  # logits elements of one block (train.loss_chunk_elements)


def rows_per_block(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per block: as many as keep a block's logits within chunk_elements, at least one."""
    return max(1, int(chunk_elements) // int(vocab_size))


def compute_dtype_of(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the output projection runs in: autocast's where it is on (as nn.Linear would), else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunked_label_smoothed_nll_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                    epsilon: float, ignore_index: int = -100,
                                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, nll_loss) of logits = hidden @ weight.T, as lslo.train.label_smoothed_nll_loss(logits, target, ε)
    returns them, without the logits: hidden [..., d] (the decoder's last hidden states), weight [V, d] (the output
    projection), target [...] (token ids, ignore_index for padding). Both outputs are differentiable with respect
    to hidden and weight. Under autocast the projection runs in the autocast dtype and the log-softmax in float32."""
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets {tuple(target.shape)} do not match")
    dtype = compute_dtype_of(hidden, weight)
    rows = rows_per_block(weight.shape[0], chunk_elements)
    return _ChunkedLabelSmoothedNll.apply(hidden, weight, target, float(epsilon), int(ignore_index), rows, dtype)


def _lprobs_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _block_lprobs(hidden_block: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log-softmax of one block's logits: the projection in the weight's (compute) dtype, the softmax in float32
    when that is a half type (lslo.train.label_smoothed_nll_loss's AMP rule)."""
    logits = F.linear(hidden_block.to(weight.dtype), weight)
    return F.log_softmax(logits.to(_lprobs_dtype(logits.dtype)), dim=-1)


def _block_grad_logits(lprobs: torch.Tensor, gold: torch.Tensor, kept: torch.Tensor, on_every: torch.Tensor | float,
                       on_gold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of one block's logits, in the projection's dtype, given that of the loss with respect to the
    log-probabilities: ``on_every`` on every entry of a kept token, ``on_gold`` more on its gold entry (zero on
    padding rows), through torch's own log-softmax backward."""
    grad_lprobs = torch.zeros_like(lprobs)
    grad_lprobs[kept] = on_every
    on_gold = torch.where(kept, on_gold.to(lprobs.dtype), lprobs.new_zeros(()))
    grad_lprobs.scatter_add_(-1, gold[:, None], on_gold[:, None])
    return torch.ops.aten._log_softmax_backward_data(grad_lprobs, lprobs, -1, lprobs.dtype).to(dtype)


class _ChunkedLabelSmoothedNll(torch.autograd.Function):
    """Forward: per block, log-softmax, the gold token's -log p and Σ_v -log p; nothing of size V is kept. Where a
    gradient is wanted, the forward also takes the gradient of the summed loss (the first output) with respect to
    hidden and weight while the block's log-probabilities are at hand (as Liger Kernel's fused linear cross entropy
    does): the projection then runs twice per block, as in the plain path's forward and backward, instead of three
    times. The backward scales it by the incoming gradient, a scalar. Only when the second output (nll) also carries
    a gradient does the backward recompute each block's log-probabilities.
    The gradient with respect to the log-probabilities is what autograd gives the plain path: -ε_i·g on every kept
    token, -(1 - ε - ε_i)·g - g_nll more on the gold one."""

    @staticmethod
    def forward(ctx, hidden, weight, target, epsilon, ignore_index, rows, dtype):
        ctx.set_materialize_grads(False)  # an output without a gradient arrives as None
        flat_hidden, flat_target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        keep = flat_target != ignore_index
        gold = torch.where(keep, flat_target, torch.zeros_like(flat_target))
        n, vocab = flat_hidden.shape[0], weight.shape[0]
        eps_i = epsilon / (vocab - 1)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # gradients of loss.sum() itself, in float32 at least (the incoming gradient, the loss scale included, comes
        # in the backward)
        kept_dtype = torch.promote_types(dtype, torch.float32)
        grad_hidden = flat_hidden.new_zeros(flat_hidden.shape, dtype=kept_dtype) if want_hidden else None
        grad_weight = weight.new_zeros(weight.shape, dtype=kept_dtype) if want_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            compute_weight = weight.to(dtype)
            nll_rows, smooth_rows = [], []
            for start in range(0, n, rows):
                block = slice(start, start + rows)
                lprobs = _block_lprobs(flat_hidden[block], compute_weight)
                nll_rows.append(-lprobs.gather(dim=-1, index=gold[block, None]).squeeze(-1))
                smooth_rows.append(-lprobs.sum(dim=-1))
                if want_hidden or want_weight:
                    on_gold = lprobs.new_full((lprobs.shape[0],), -(1.0 - epsilon - eps_i))
                    grad_logits = _block_grad_logits(lprobs, gold[block], keep[block], -eps_i, on_gold, dtype)
                    del lprobs
                    if want_hidden:
                        grad_hidden[block] = grad_logits.mm(compute_weight)
                    if want_weight:  # as autograd's mm backward: (hᵀ g)ᵀ, summed over the blocks
                        grad_weight.add_(flat_hidden[block].to(dtype).t().mm(grad_logits).t())
            empty = [flat_hidden.new_zeros(0, dtype=_lprobs_dtype(dtype))]  # no token at all
            nll_loss, smooth_loss = torch.cat(nll_rows or empty)[keep], torch.cat(smooth_rows or empty)[keep]
            loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
        ctx.save_for_backward(hidden, weight, gold, keep, grad_hidden, grad_weight)
        ctx.epsilon, ctx.rows, ctx.dtype = epsilon, rows, dtype
        return loss.sum(), nll_loss.sum()

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        hidden, weight, gold, keep, loss_grad_hidden, loss_grad_weight = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None and grad_nll is None:
            return None, None, None, None, None, None, None
        if grad_nll is None:  # training: only the loss carries a gradient, and the forward has taken it
            grad_hidden = (loss_grad_hidden * grad_loss).to(hidden.dtype).reshape(hidden.shape) if want_hidden else None
            grad_weight = (loss_grad_weight * grad_loss).to(weight.dtype) if want_weight else None
            return grad_hidden, grad_weight, None, None, None, None, None
        return _recomputed_backward(ctx, hidden, weight, gold, keep, grad_loss, grad_nll)


def _recomputed_backward(ctx, hidden, weight, gold, keep, grad_loss, grad_nll):
    """Both outputs carry a gradient: per block, the log-probabilities again, then their gradient (see
    _ChunkedLabelSmoothedNll), torch's log-softmax backward and the projection's backward."""
    epsilon, rows, dtype = ctx.epsilon, ctx.rows, ctx.dtype
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    n, vocab = flat_hidden.shape[0], weight.shape[0]
    eps_i = epsilon / (vocab - 1)
    want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_hidden = torch.zeros_like(flat_hidden) if want_hidden else None
    grad_weight = None
    on_every = -(grad_loss * eps_i) if grad_loss is not None else 0.0
    on_gold = -grad_nll if grad_loss is None else -(grad_loss * (1.0 - epsilon - eps_i)) - grad_nll
    with torch.autocast(hidden.device.type, enabled=False):
        compute_weight = weight.to(dtype)
        for start in range(0, n, rows):
            block = slice(start, start + rows)
            lprobs = _block_lprobs(flat_hidden[block], compute_weight)
            grad_logits = _block_grad_logits(lprobs, gold[block], keep[block], on_every,
                                             on_gold.expand(lprobs.shape[0]), dtype)
            if want_hidden:
                grad_hidden[block] = grad_logits.mm(compute_weight).to(grad_hidden.dtype)
            if want_weight:  # as autograd's mm backward: (hᵀ g)ᵀ, summed over the blocks in the weight's dtype
                part = flat_hidden[block].to(dtype).t().mm(grad_logits).t()
                grad_weight = part.to(weight.dtype) if grad_weight is None else grad_weight.add_(part)
    if want_hidden:
        grad_hidden = grad_hidden.reshape(hidden.shape)
    if want_weight and grad_weight is None:
        grad_weight = torch.zeros_like(weight)
    return grad_hidden, grad_weight, None, None, None, None, None
