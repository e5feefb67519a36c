"""Every mixed-batch kernel and merged decoding in the precisions training and decoding run in, against the
per-sample formula of eq. 3 computed in float64; and one AMP update whose GradScaler overflows.

The same test bodies run on CPU in the normal suite (fp32, bf16 autocast) and on CUDA under the ``cuda`` marker
(fp32, bf16 and fp16 autocast; skipped without a GPU, run by ``benchmarks/gpu_check.sh``).

Tolerances are on the largest absolute error relative to the largest absolute reference entry (outputs and each
gradient): 1e-5 for fp32; for autocast a few units of the format's rounding (bf16: 8 significant bits, 2^-8 =
3.9e-3; fp16: 11 bits, 4.9e-4), since inputs, weights and outputs are each rounded once and sums of rounding
errors grow with the layer width. Measured on CPU (torch 2.13) the largest errors were about a third of these
bounds (bf16 5.6e-3 for a layer, 6.5e-3 for a model; fp16 autocast 1.0e-3 and 8.3e-4).
"""

import pytest
import torch
from torch import nn

from conftest import LANGUAGES, lang_token_id, make_batch, make_tiny_model, randomize_lora
from lslo.kernels import MIXED_PATHS, Routing
from lslo.layer import LoRABank, LSLoLinear

cuda = pytest.mark.cuda
PRECISIONS = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=cuda),
]
LAYER_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
MODEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
LANGS = ["en", "fr", "de", "oc"]
RANKS = {"en": 2, "fr": 2, "de": 8, "oc": 4}  # mixed ranks, as H;M;V = 2;2;8
IN, OUT = 32, 16  # GEMM-aligned widths, so the grouped kernel runs F.grouped_mm in every dtype


def precision(device: str, dtype: torch.dtype):
    """The autocast context of a precision (none for fp32)."""
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str):
    error = (got.double().cpu() - want.double().cpu()).abs().max().item()
    scale = want.abs().max().item()
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance} x {scale:.3g}"


def make_layer(device, kernel: str, seed: int = 0):
    torch.manual_seed(seed)
    routing = Routing(LANGS)
    bank = LoRABank(LANGS, RANKS, IN, OUT, alpha=4)
    for lang in LANGS:
        nn.init.normal_(bank.B[lang], std=0.3)
    bank.mixed_path = kernel
    bank.set_mask("A", "fr", (torch.rand(RANKS["fr"], IN) > 0.3).float())  # pruned entries, as after GPS
    layer = LSLoLinear(nn.Linear(IN, OUT), "enc.0.fc1", "src", {"src": bank}, routing).to(device)
    return layer, routing


def per_sample_formula(layer, x, langs):
    """W x + b + s_l B_l A_l x for each sample with its own language, in float64 (autograd-able)."""
    bank = layer.banks["src"]
    weight, bias = layer.base.weight.double(), layer.base.bias.double()
    rows = []
    for b, lang in enumerate(langs):
        a, bb = bank.effective_A(lang).double(), bank.effective_B(lang).double()
        rows.append(x[b] @ weight.T + bias + bank.scaling[lang] * (x[b] @ a.T @ bb.T))
    return torch.stack(rows)


@pytest.mark.parametrize("kernel", MIXED_PATHS)
@pytest.mark.parametrize("device,dtype", PRECISIONS)
def test_training_kernels_equal_per_sample_formula(device, dtype, kernel):
    """Training (autograd): the output and the gradients of the input and of every present language's A and B."""
    layer, routing = make_layer(device, kernel)
    langs = ["oc", "en", "de", "oc", "fr", "en"]
    routing.set(torch.tensor([LANGS.index(c) for c in langs]), torch.zeros(len(langs), dtype=torch.long))
    x = torch.randn(len(langs), 5, IN, device=device)
    upstream = torch.randn(len(langs), 5, OUT, device=device)
    bank = layer.banks["src"]
    params = [bank.A[lang] for lang in LANGS] + [bank.B[lang] for lang in LANGS]
    inputs = x.clone().requires_grad_(True)
    with precision(device, dtype):
        out = layer(inputs)
    grads = torch.autograd.grad((out.float() * upstream).sum(), [inputs, *params])
    x64 = x.double().requires_grad_(True)
    expected = per_sample_formula(layer, x64, langs)
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), [x64, *params])
    tolerance = LAYER_TOLERANCE[dtype]
    assert_close_relative(out, expected, tolerance, "output")
    names = ["x"] + [f"A[{lang}]" for lang in LANGS] + [f"B[{lang}]" for lang in LANGS]
    for name, got, want in zip(names, grads, expected_grads):
        assert_close_relative(got, want, tolerance, f"gradient of {name}")


@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("langs", [["fr", "oc", "en", "de"], ["oc"] * 4], ids=["mixed", "merged"])
@pytest.mark.parametrize("kernel", MIXED_PATHS)
@pytest.mark.parametrize("device,dtype", PRECISIONS)
def test_decoding_kernels_equal_per_sample_formula(device, dtype, kernel, langs, tokens):
    """Decoding (eval, no autograd): one-language batches run as a merged layer W + s_l B_l A_l, mixed ones add
    the LoRA in place (one-token steps: prebuilt stacked weights)."""
    layer, routing = make_layer(device, kernel)
    layer.eval()
    routing.set(torch.tensor([LANGS.index(c) for c in langs]), torch.zeros(len(langs), dtype=torch.long))
    x = torch.randn(len(langs), tokens, IN, device=device)
    with torch.no_grad(), precision(device, dtype):
        out = layer(x)
    with torch.no_grad():
        expected = per_sample_formula(layer, x.double(), langs)
    assert_close_relative(out, expected, LAYER_TOLERANCE[dtype], "output")


def model_logits(model, batch, device, directions=None):
    decoder_input_ids = torch.tensor([[2, lang_token_id(t)] for t in batch["tgt"]], device=device)
    kwargs = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  decoder_input_ids=decoder_input_ids)
    if directions:
        kwargs.update(src_lang=batch["src"], tgt_lang=batch["tgt"])
    return model(**kwargs).logits


@pytest.mark.parametrize("device,dtype", PRECISIONS)
def test_merged_and_mixed_decoding_of_a_model_equal_float64(device, dtype):
    """A whole LSLo model in eval mode: a mixed-direction batch, a one-direction batch (merged layers), and the
    model merge_direction writes, each against the same LSLo model in float64 on the CPU."""
    from lslo.adapters import merge_direction
    from lslo.model import LSLoSpec, inject_lslo

    ranks = {"en": 2, "fr": 2, "de": 2, "oc": 8, "wo": 8}
    model = inject_lslo(make_tiny_model(0), LSLoSpec(LANGUAGES, ranks, index_plan={"enc": "src", "dec": "tgt"}))
    randomize_lora(model, std=0.3, seed=1)
    reference = model.double().eval()
    mixed = make_batch([("fr", "oc"), ("en", "wo"), ("oc", "de"), ("de", "en")])
    one = make_batch([("fr", "oc")] * 3)
    with torch.no_grad():
        want_mixed, want_one = (model_logits(reference, b, "cpu", True) for b in (mixed, one))
        model = model.float().to(device)
        merged = merge_direction(model, "fr", "oc").to(device).eval()
        with precision(device, dtype):
            got = {"mixed directions": (model_logits(model, mixed, device, True), want_mixed),
                   "one direction": (model_logits(model, one, device, True), want_one),
                   "merge_direction": (model_logits(merged, one, device), want_one)}
    for what, (logits, want) in got.items():
        assert_close_relative(logits, want, MODEL_TOLERANCE[dtype], what)


@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
                                          pytest.param("cuda", torch.float16, id="cuda-fp16", marks=cuda)])
def test_amp_update_with_gradscaler_overflow_keeps_the_weights(device, dtype):
    """lslo.train.train_update under autocast with a GradScaler: a scale so large that the scaled loss overflows
    makes every gradient non-finite; the update is skipped (weights and Adam moments as before) and the scale
    backs off. The next update, at an ordinary scale, moves the weights."""
    from lslo.model import LSLoSpec, inject_lslo
    from lslo.train import TrainOptions, make_adam, train_update

    model = inject_lslo(make_tiny_model(0), LSLoSpec(LANGUAGES, {c: 2 for c in LANGUAGES})).to(device).train()
    randomize_lora(model, std=0.3, seed=1)
    model.to(device)
    batch = make_batch([("fr", "oc"), ("en", "wo"), ("oc", "de")])
    labels = batch["input_ids"].roll(1, dims=1)
    micro = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
             "src_lang": torch.tensor([LANGUAGES.index(c) for c in batch["src"]]),
             "tgt_lang": torch.tensor([LANGUAGES.index(c) for c in batch["tgt"]]), "n_tokens": labels.numel()}
    params = model.trainable_parameters()
    optimizer = make_adam(params, 1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**127)  # any loss above 2 overflows float32 once scaled
    autocast = lambda: torch.autocast(device, dtype=dtype)
    options, before = TrainOptions(), [p.detach().clone() for p in params]
    loss, _ = train_update(model, optimizer, [micro], options, 1e-2, torch.device(device), scaler, autocast)
    assert loss > 2 and scaler.get_scale() == 2.0**126  # overflow seen: the scale backed off
    for p, old in zip(params, before):
        assert torch.equal(p, old)
        for moment in ("exp_avg", "exp_avg_sq"):
            assert moment not in optimizer.state[p] or not optimizer.state[p][moment].any()
    scaler.update(2.0**8)
    train_update(model, optimizer, [micro], options, 1e-2, torch.device(device), scaler, autocast)
    assert scaler.get_scale() == 2.0**8
    assert all(torch.isfinite(p).all() for p in params)
    used = [p.grad is not None for p in params]  # the languages present in the batch
    assert any(used) and [not torch.equal(p, old) for p, old in zip(params, before)] == used
