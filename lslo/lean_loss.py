"""Label-smoothed cross entropy from the decoder's last hidden states, block by block over target tokens, so that
the N x V logits never exist at once (train.loss: chunked).

At the paper's M2M-124 615M shape (V = 256,125) the plain path (lslo.train.label_smoothed_nll_loss on the full
logits) holds, for a batch of 4,096 target tokens, float32 logits, their log-softmax and its gradient of
4,096 x 256,125 x 4 bytes = 4 GiB each. Here a block of `rows_per_block` tokens at a time goes through the output
projection, log-softmax and loss; the backward pass recomputes each block's logits instead of keeping them, and
returns the gradients of the hidden states and, only when it is trained (Ft-all), of the projection weight.

The loss is fairseq's definition, lslo.train.label_smoothed_nll_loss's, term by term: per kept token
(1 - ε - ε_i)·nll + ε_i·Σ_v(-log p_v) with ε_i = ε/(V - 1), tokens equal to ignore_index left out, summed. The
per-token values are summed once, over all tokens, as the plain path does; the backward pass runs torch's own
log-softmax backward kernel on each block.

Precision follows the plain path under AMP: the projection runs in the autocast dtype (float16/bfloat16), the
log-softmax in float32. M2M100ForConditionalGeneration's output projection is `lm_head`, a Linear without bias tied
to the shared embedding; it has no final_logits_bias and no logit scaling (scale_embedding scales the inputs only).
"""

from __future__ import annotations

# liger-kernel's FusedLinearCrossEntropy, cut-cross-entropy: Triton/CUDA only (CCE's torch fallback builds the logits).

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ELEMENTS = 2**26  # logits elements of one block (train.loss_chunk_elements): 256 MiB in float32


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


class _ChunkedLabelSmoothedNll(torch.autograd.Function):
    """Forward: per block, log-softmax, the gold token's -log p and Σ_v -log p; nothing of size V is kept.
    Backward: per block, the log-probabilities again, the gradient of the loss with respect to them (what
    autograd gives the plain path: -ε_i·g on every kept token, -(1 - ε - ε_i)·g - g_nll more on the gold one),
    torch's log-softmax backward, then the projection's backward for the hidden states and the weight."""

    @staticmethod
    def forward(ctx, hidden, weight, target, epsilon, ignore_index, rows, dtype):
        flat_hidden, flat_target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        keep = flat_target != ignore_index
        gold = torch.where(keep, flat_target, torch.zeros_like(flat_target))
        n, vocab = flat_hidden.shape[0], weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            compute_weight = weight.to(dtype)
            nll_rows, smooth_rows = [], []
            for start in range(0, n, rows):
                lprobs = _block_lprobs(flat_hidden[start:start + rows], compute_weight)
                nll_rows.append(-lprobs.gather(dim=-1, index=gold[start:start + rows, None]).squeeze(-1))
                smooth_rows.append(-lprobs.sum(dim=-1))
            empty = [flat_hidden.new_zeros(0, dtype=_lprobs_dtype(dtype))]  # no token at all
            nll_loss, smooth_loss = torch.cat(nll_rows or empty)[keep], torch.cat(smooth_rows or empty)[keep]
            eps_i = epsilon / (vocab - 1)
            loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
        ctx.save_for_backward(hidden, weight, gold, keep)
        ctx.epsilon, ctx.rows, ctx.dtype = epsilon, rows, dtype
        return loss.sum(), nll_loss.sum()

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        hidden, weight, gold, keep = ctx.saved_tensors
        epsilon, rows, dtype = ctx.epsilon, ctx.rows, ctx.dtype
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        n, vocab = flat_hidden.shape[0], weight.shape[0]
        eps_i = epsilon / (vocab - 1)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(flat_hidden) if want_hidden else None
        grad_weight = None
        with torch.autocast(hidden.device.type, enabled=False):
            compute_weight = weight.to(dtype)
            for start in range(0, n, rows):
                block = slice(start, start + rows)
                lprobs = _block_lprobs(flat_hidden[block], compute_weight)
                grad_lprobs = torch.zeros_like(lprobs)
                kept = keep[block]
                if grad_loss is not None:
                    grad_lprobs[kept] = -(grad_loss * eps_i)
                    on_gold = -(grad_loss * (1.0 - epsilon - eps_i))
                    if grad_nll is not None:
                        on_gold = on_gold - grad_nll
                elif grad_nll is not None:
                    on_gold = -grad_nll
                else:
                    break
                on_gold = torch.where(kept, on_gold.to(lprobs.dtype), lprobs.new_zeros(()))
                grad_lprobs.scatter_add_(-1, gold[block, None], on_gold[:, None])
                grad_logits = torch.ops.aten._log_softmax_backward_data(grad_lprobs, lprobs, -1, lprobs.dtype)
                grad_logits = grad_logits.to(dtype)
                block_hidden = flat_hidden[block].to(dtype)
                if want_hidden:
                    grad_hidden[block] = grad_logits.mm(compute_weight).to(grad_hidden.dtype)
                if want_weight:  # as autograd's mm backward: (hᵀ g)ᵀ, summed over the blocks in the weight's dtype
                    part = block_hidden.t().mm(grad_logits).t()
                    grad_weight = part.to(weight.dtype) if grad_weight is None else grad_weight.add_(part)
        if want_hidden:
            grad_hidden = grad_hidden.reshape(hidden.shape)
        if want_weight and grad_weight is None:
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight, None, None, None, None, None
