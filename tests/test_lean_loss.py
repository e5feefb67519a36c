"""The chunked label-smoothed loss (lslo.lean_loss, train.loss: chunked) against today's plain path: the full logits
through the projection, then lslo.train.label_smoothed_nll_loss. Same loss, same gradients of the hidden states and
of the projection weight, for any block size, with padding, at ε = 0; no tensor of N x V elements on the way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import LANGUAGES, make_batch, make_tiny_model
from lslo.lean_loss import chunked_label_smoothed_nll_loss, rows_per_block
from lslo.model import LSLoSpec, inject_lslo
from lslo.train import forward_loss, label_smoothed_nll_loss

N_ROWS, VOCAB, DIM = 3 * 7, 53, 16  # 21 tokens: blocks of 1, 2, 4, 5 and 8 rows do not divide it


def case(dtype, seed=0, pad=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, DIM, dtype=dtype, generator=generator).requires_grad_()
    weight = (0.5 * torch.randn(VOCAB, DIM, dtype=dtype, generator=generator)).requires_grad_()
    target = torch.randint(0, VOCAB, (3, 7), generator=generator)
    if pad:
        target[0, 4:] = -100  # padding rows, as collate writes them
        target[2, 6] = -100
    return hidden, weight, target


def loss_and_grads(fn, hidden, weight, target, nll_weight=0.3):
    """(loss, nll, grad of hidden, grad of weight) of loss + nll_weight·nll: both outputs carry a gradient."""
    hidden.grad = weight.grad = None
    loss, nll = fn(hidden, weight, target)
    (loss + nll_weight * nll).backward()
    return loss.detach(), nll.detach(), hidden.grad.clone(), weight.grad.clone()


def plain(epsilon):
    return lambda h, w, t: label_smoothed_nll_loss(F.linear(h, w), t, epsilon)


def chunked(epsilon, rows):
    return lambda h, w, t: chunked_label_smoothed_nll_loss(h, w, t, epsilon, chunk_elements=rows * VOCAB)


def assert_relative(got, want, tolerance, what):
    scale = want.abs().max().clamp_min(1e-30)
    assert ((got - want).abs().max() / scale).item() <= tolerance, what


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("epsilon", [0.0, 0.2])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, N_ROWS, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_path(dtype, tolerance, epsilon, rows):
    hidden, weight, target = case(dtype)
    want = loss_and_grads(plain(epsilon), hidden, weight, target)
    got = loss_and_grads(chunked(epsilon, rows), hidden, weight, target)
    for name, g, w in zip(("loss", "nll", "grad hidden", "grad weight"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_relative(g, w, tolerance, f"{name}, blocks of {rows} rows")
    # the padding rows get no gradient, and the loss is not a sum over them
    assert torch.all(got[2][0, 4:] == 0) and torch.all(got[2][2, 6] == 0)


def test_loss_by_hand_fairseqs_weights():
    """Against the formula written out: gold weight 1 - ε, each other token ε/(V - 1), padding left out."""
    hidden, weight, target = case(torch.float64)
    eps = 0.2
    loss, nll = chunked_label_smoothed_nll_loss(hidden, weight, target, eps, chunk_elements=2 * VOCAB)
    lprobs = torch.log_softmax(hidden.detach() @ weight.detach().T, -1)
    keep = target != -100
    lprobs, gold = lprobs[keep], target[keep]
    weights = torch.full_like(lprobs, eps / (VOCAB - 1)).scatter(1, gold[:, None], 1 - eps)
    assert loss.item() == pytest.approx(-(weights * lprobs).sum().item(), rel=1e-12)
    assert nll.item() == pytest.approx(F.nll_loss(lprobs, gold, reduction="sum").item(), rel=1e-12)


def test_gradcheck_in_float64():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1, 6, -100], [0, 3, 3]])
    fn = lambda h, w: chunked_label_smoothed_nll_loss(h, w, target, 0.1, chunk_elements=2 * 7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_a_frozen_weight_gets_no_gradient():
    """LSLo freezes the base: only the hidden states get a gradient, the same as the plain path's."""
    hidden, weight, target = case(torch.float64)
    weight.requires_grad_(False)
    loss, _ = chunked_label_smoothed_nll_loss(hidden, weight, target, 0.2, chunk_elements=3 * VOCAB)
    loss.backward()
    assert weight.grad is None
    got = hidden.grad.clone()
    hidden.grad = None
    label_smoothed_nll_loss(F.linear(hidden, weight), target, 0.2)[0].backward()
    torch.testing.assert_close(got, hidden.grad, rtol=1e-12, atol=1e-14)


def test_rows_per_block_keeps_the_logits_within_the_budget():
    assert rows_per_block(256_125, 2**26) == 262 and 262 * 256_125 <= 2**26 < 263 * 256_125
    assert rows_per_block(256_125, 1000) == 1  # at least one row
    assert rows_per_block(50, 100) == 2


class LargestTensor(TorchDispatchMode):
    """Records, for every operator run under it (forward and backward), the element count of each tensor it returns:
    deterministic, unlike a memory reading."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("weight_trained", [False, True])
def test_no_tensor_of_tokens_times_vocabulary_is_created(weight_trained):
    n_tokens, vocab, dim, rows = 300, 1000, 8, 16  # N x V = 300,000; a block 16,000; the weight 8,000
    hidden = torch.randn(n_tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=weight_trained)
    target = torch.randint(0, vocab, (n_tokens,))
    with LargestTensor() as chunked_run:
        loss, _ = chunked_label_smoothed_nll_loss(hidden, weight, target, 0.2, chunk_elements=rows * vocab)
        loss.backward()
    assert chunked_run.largest <= rows * vocab, chunked_run.op
    with LargestTensor() as plain_run:  # the probe sees the plain path's logits
        label_smoothed_nll_loss(F.linear(hidden, weight), target, 0.2)[0].backward()
    assert plain_run.largest >= n_tokens * vocab


# ---------------------------------------------------------------------------------------------- in training

def collated(model_languages=LANGUAGES):
    batch = make_batch([("fr", "oc"), ("en", "wo"), ("oc", "de")])
    labels = batch["input_ids"].roll(1, dims=1).masked_fill(batch["attention_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
            "src_lang": torch.tensor([model_languages.index(c) for c in batch["src"]]),
            "tgt_lang": torch.tensor([model_languages.index(c) for c in batch["tgt"]]),
            "n_tokens": int((labels != -100).sum())}


def grads_of(model, loss_kind, chunk_elements):
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, collated(), 0.2, torch.device("cpu"), loss_kind, chunk_elements)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["ft-all", "lslo"])
@pytest.mark.parametrize("rows", [1, 3, 10**6])
def test_forward_loss_chunked_equals_plain_for_ft_all_and_lslo(kind, rows):
    """Every model the stages train: the HF model with every parameter trained (Ft-all; the tied projection gets
    the gradient of the embedding and of the loss), and an LSLo model on its frozen base."""
    model = make_tiny_model(0).double().train()
    if kind == "lslo":
        model = inject_lslo(model, LSLoSpec(LANGUAGES, {c: 2 for c in LANGUAGES}))
        with torch.no_grad():  # non-zero B so every LoRA matrix gets a gradient
            for p in model.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    hf = model.base if kind == "lslo" else model  # the tiny model has no dropout: both passes see one network
    vocab = hf.lm_head.weight.shape[0]
    loss_plain, want = grads_of(model, "plain", 0)
    loss_chunked, got = grads_of(model, "chunked", rows * vocab)
    assert isinstance(hf.lm_head, torch.nn.Linear)  # the projection is back in place
    assert loss_chunked.item() == pytest.approx(loss_plain.item(), rel=1e-12)
    assert got.keys() == want.keys() and want
    if kind == "ft-all":
        assert "lm_head.weight" in want or "model.shared.weight" in want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_forward_loss_under_cpu_bf16_autocast_projects_in_bf16_and_softmaxes_in_fp32():
    """AMP: the block's projection runs in the autocast dtype, the log-softmax in float32, as the plain path's
    nn.Linear under autocast and label_smoothed_nll_loss's upcast do; the two paths agree to bfloat16 precision."""
    model = make_tiny_model(0).eval()
    seen = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten._log_softmax.default):
                seen.append((str(func.overloadpacket), args[0].dtype))
            return func(*args, **(kwargs or {}))

    results = {}
    for kind in ("plain", "chunked"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with Dtypes():
                loss = forward_loss(model, collated(), 0.2, torch.device("cpu"), kind, 5 * model.config.vocab_size)
        loss.backward()
        results[kind] = (loss.detach(), model.model.shared.weight.grad.clone())
        assert ("aten._log_softmax", torch.float32) in seen and ("aten.mm", torch.bfloat16) in seen
        seen.clear()
    (loss_p, grad_p), (loss_c, grad_c) = results["plain"], results["chunked"]
    assert loss_c.dtype == torch.float32 and loss_c.item() == pytest.approx(loss_p.item(), rel=1e-3)
    torch.testing.assert_close(grad_c, grad_p, rtol=2e-2, atol=2e-2 * grad_p.abs().max().item())


def test_forward_loss_chunked_under_ddp_gives_the_plain_gradients(tmp_path):
    """Under torchrun the updates run the DDP wrapper (find_unused_parameters, as make_trainer builds it): the loss
    is computed inside the wrapped forward, so DDP sees the projection used; one process of the gloo backend."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for kind in ("ft-all", "lslo"):
            grads = {}
            for loss_kind in ("plain", "chunked"):
                model = make_tiny_model(0).double().train()
                if kind == "lslo":
                    model = inject_lslo(model, LSLoSpec(LANGUAGES, {c: 2 for c in LANGUAGES}))
                ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
                for _ in range(2):  # a second backward: DDP's reducer was ready again
                    ddp.zero_grad(set_to_none=True)
                    forward_loss(ddp, collated(), 0.2, torch.device("cpu"), loss_kind, 3 * 64).backward()
                grads[loss_kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            assert grads["plain"].keys() == grads["chunked"].keys() and grads["plain"]
            for name, want in grads["plain"].items():
                torch.testing.assert_close(grads["chunked"][name], want, rtol=1e-9, atol=1e-12, msg=name)
    finally:
        torch.distributed.destroy_process_group()


def test_an_output_projection_with_a_bias_is_refused_not_dropped():
    """The chunked loss projects with the weight alone; a projection with a bias (not M2M100's) stops with one line
    instead of training without the bias."""
    from lslo.errors import LsloError

    model = make_tiny_model(0)
    model.lm_head = torch.nn.Linear(model.config.d_model, model.config.vocab_size, bias=True)
    with pytest.raises(LsloError, match=r"^train\.loss chunked: the model's output projection is Linear\(.*bias=True\)"
                       r", expected a Linear without bias \(M2M100's lm_head\); set train\.loss: plain$"):
        forward_loss(model, collated(), 0.2, torch.device("cpu"), "chunked")
    assert forward_loss(model, collated(), 0.2, torch.device("cpu"), "plain").isfinite()
