"""LSLo layer (eq. 3, eq. 5): per-sample routing, masks, init, routing cache and beams."""

import math

import pytest
import torch
from torch import nn

from lslo.errors import LsloError
from lslo.kernels import Routing, add_delta, choose_kernel
from lslo.layer import BufferDict, IndexWeights, LoRABank, LSLoLinear

LANGS = ["en", "fr", "de", "oc"]
RANKS = {"en": 1, "fr": 2, "de": 3, "oc": 4}
KERNELS = ["segments", "stacked", "gathered", "grouped"]  # every mixed-batch kernel (MIXED_PATHS less "auto")


def make_layer(index="src", seed=0, alpha=None, mixed_path="segments"):
    torch.manual_seed(seed)
    routing = Routing(LANGS)
    linear = nn.Linear(8, 6)
    indexes = ("src", "tgt") if index == "learn" else (index,)
    banks = {ix: LoRABank(LANGS, RANKS, 8, 6, alpha=alpha) for ix in indexes}
    for bank in banks.values():
        bank.mixed_path = mixed_path
        for lang in LANGS:
            nn.init.normal_(bank.B[lang])
    weights = IndexWeights() if index == "learn" else None
    return LSLoLinear(linear, "enc.0.q", index, banks, routing, weights), routing


def by_hand(layer, x, langs, index):
    """W x + s_l B_l A_l x computed sample by sample."""
    bank = layer.banks[index]
    rows = []
    for b, lang in enumerate(langs):
        a, bb = bank.effective_A(lang), bank.effective_B(lang)
        rows.append(x[b] @ layer.base.weight.T + layer.base.bias + bank.scaling[lang] * (x[b] @ a.T @ bb.T))
    return torch.stack(rows)


def test_init_like_peft_and_shapes():
    bank = LoRABank(LANGS, RANKS, 8, 6, init="peft")
    for lang in LANGS:
        assert bank.A[lang].shape == (RANKS[lang], 8) and bank.B[lang].shape == (6, RANKS[lang])
        assert torch.all(bank.B[lang] == 0) and bank.A[lang].abs().sum() > 0
        # Kaiming-uniform with a=sqrt(5): bound = 1/sqrt(fan_in)
        assert bank.A[lang].abs().max() <= 1 / math.sqrt(8) + 1e-6
        assert bank.scaling[lang] == 1.0
    assert LoRABank(LANGS, RANKS, 8, 6, alpha=8).scaling["de"] == pytest.approx(8 / 3)
    torch.manual_seed(0)
    default = LoRABank(LANGS, RANKS, 8, 6)  # the authors' init by default: U(-1/√r, 1/√r), past PEFT's 1/√8
    assert default.init == "authors"
    assert all(1 / math.sqrt(8) < default.A[lang].abs().max() <= 1 / math.sqrt(RANKS[lang]) for lang in LANGS)


@pytest.mark.parametrize("mixed_path", KERNELS)
@pytest.mark.parametrize("index", ["src", "tgt"])
def test_mixed_batch_equals_per_sample_formula(index, mixed_path):
    layer, routing = make_layer(index, alpha=3, mixed_path=mixed_path)
    src, tgt = ["fr", "en", "fr", "oc", "de"], ["en", "oc", "oc", "en", "fr"]
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.tensor([LANGS.index(c) for c in tgt]))
    x = torch.randn(5, 3, 8)
    out = layer(x)
    expected = by_hand(layer, x, src if index == "src" else tgt, index)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # adapters really change the output, differently per language
    assert (out - layer.base(x)).abs().max() > 1e-2


def test_single_language_fast_path_and_alpha():
    layer, routing = make_layer("src", alpha=4)
    routing.set(torch.tensor([2, 2, 2]), torch.tensor([0, 1, 3]))
    x = torch.randn(3, 4, 8)
    assert routing.grouping("src", 3, x.device).single == "de"
    torch.testing.assert_close(layer(x), by_hand(layer, x, ["de"] * 3, "src"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixed_path", KERNELS)
def test_masks_zero_entries_and_block_their_gradient(mixed_path):
    layer, routing = make_layer("src", mixed_path=mixed_path)
    bank = layer.banks["src"]
    mask_a = (torch.rand_like(bank.A["fr"]) > 0.5).float()
    mask_b = (torch.rand_like(bank.B["fr"]) > 0.5).float()
    bank.set_mask("A", "fr", mask_a)
    bank.set_mask("B", "fr", mask_b)
    assert "fr" in bank.A_mask and "en" not in bank.A_mask
    assert torch.equal(bank.effective_A("fr"), bank.A["fr"] * mask_a)
    routing.set(torch.tensor([1, 0]), torch.tensor([0, 0]))
    x = torch.randn(2, 3, 8)
    out = layer(x)
    torch.testing.assert_close(out, by_hand(layer, x, ["fr", "en"], "src"), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.all(bank.A["fr"].grad[mask_a == 0] == 0)
    assert torch.all(bank.B["fr"].grad[mask_b == 0] == 0)
    assert bank.A["de"].grad is None and bank.B["oc"].grad is None
    with pytest.raises(LsloError, match="shape"):
        bank.set_mask("A", "fr", torch.ones(3, 3))
    keys = set(layer.state_dict())
    assert {"banks.src.A_mask.fr", "banks.src.B_mask.fr", "banks.src.A.fr", "base.weight"} <= keys


@pytest.mark.parametrize("mixed_path", KERNELS)
def test_weight_learning_mixes_both_banks(mixed_path):
    layer, routing = make_layer("learn", mixed_path=mixed_path)
    with torch.no_grad():
        layer.index_weights.logits.copy_(torch.tensor([0.3, -0.4]))
    src, tgt = ["fr", "en", "oc"], ["de", "de", "fr"]
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.tensor([LANGS.index(c) for c in tgt]))
    x = torch.randn(3, 2, 8)
    out = layer(x)
    w = torch.softmax(torch.tensor([0.3, -0.4]), 0)
    base = layer.base(x)
    expected = base + w[0] * (by_hand(layer, x, src, "src") - base) + w[1] * (by_hand(layer, x, tgt, "tgt") - base)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert layer.index_weights.logits.grad is not None and layer.index_weights.logits.grad.abs().sum() > 0
    assert "index_weights.logits" not in layer.state_dict()  # registered once at model level


@pytest.mark.parametrize("mixed_path", KERNELS)
def test_routing_beams_repeat_interleave_and_cache(mixed_path):
    layer, routing = make_layer("tgt", mixed_path=mixed_path)
    tgt = ["fr", "oc", "en"]
    routing.set(torch.tensor([0, 0, 0]), torch.tensor([LANGS.index(c) for c in tgt]))
    k = 4
    x = torch.randn(3 * k, 2, 8)
    out = layer(x)
    expected = by_hand(layer, x, [lang for lang in tgt for _ in range(k)], "tgt")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g = routing.grouping("tgt", 3 * k, x.device)
    assert g is routing.grouping("tgt", 3 * k, x.device)  # computed once per batch and index
    assert [s[0] for s in g.segments] == ["en", "fr", "oc"]
    with pytest.raises(LsloError, match="batch size 7"):
        layer(torch.randn(7, 2, 8))


def test_routing_errors():
    layer, routing = make_layer("src")
    with pytest.raises(LsloError, match="src_lang="):
        layer(torch.randn(2, 2, 8))
    routing.set(torch.tensor([0, 9]), torch.tensor([0, 1]))
    with pytest.raises(LsloError, match="language ids"):
        layer(torch.randn(2, 2, 8))
    with pytest.raises(LsloError, match="same length"):
        routing.set(torch.tensor([0, 1]), torch.tensor([0]))


def test_buffer_dict():
    d = BufferDict()
    d.set("en", torch.ones(2))
    d.set("en", torch.zeros(2))
    assert "en" in d and len(d) == 1 and torch.equal(d["en"], torch.zeros(2))
    assert dict(d.items()).keys() == {"en"} and list(d.state_dict()) == ["en"]


@pytest.mark.parametrize("mixed_path", KERNELS)
def test_mixed_batch_gradients_equal_per_sample_formula(mixed_path):
    layer, routing = make_layer("src", mixed_path=mixed_path)
    src = ["oc", "en", "oc", "fr", "en"]
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.zeros(5, dtype=torch.long))
    x = torch.randn(5, 3, 8, requires_grad=True)
    weights = torch.randn(5, 3, 6)
    (layer(x) * weights).sum().backward()
    params = [x] + [p for lang in ("oc", "en", "fr") for p in (layer.banks["src"].A[lang], layer.banks["src"].B[lang])]
    got = [p.grad.clone() for p in params]
    expected = torch.autograd.grad((by_hand(layer, x, src, "src") * weights).sum(), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_auto_kernel_compares_stacked_and_gathered_costs():
    """auto: gathered when max(r)·(T + GATHER_COST) < T·sum(r). With ranks 1..4 (max 4, sum 10) that is
    T > 4·GATHER_COST / 6: one-token decoding steps stack, long sentences gather, and the switch is there."""
    from lslo.kernels import GATHER_COST

    layer, routing = make_layer("src", mixed_path="auto")
    routing.set(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]))
    bank, grouping = layer.banks["src"], routing.grouping("src", 4, torch.device("cpu"))
    kernels = {t: choose_kernel(bank, grouping, torch.zeros(4, t, 8)) for t in range(1, 20 * GATHER_COST)}
    first_gathered = min(t for t, kernel in kernels.items() if kernel == "gathered")
    assert first_gathered == 4 * GATHER_COST // 6 + 1
    assert all(kernels[t] == "stacked" for t in range(1, first_gathered))
    assert all(kernels[t] == "gathered" for t in range(first_gathered, 20 * GATHER_COST))


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("mixed_path", ["stacked", "gathered"])
def test_inference_reuses_stacked_weights_within_a_batch_only(mixed_path, tokens):
    """Without autograd the stacked weights are kept for the batch: repeated calls agree with the per-sample
    formula, and a new batch (routing.set) sees weights changed in between."""
    layer, routing = make_layer("src", mixed_path=mixed_path)
    layer.eval()
    src = ["fr", "en", "oc", "de"]
    x = torch.randn(4, tokens, 8)
    with torch.no_grad():
        routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.tensor([0, 0, 0, 0]))
        first = layer(x)
        torch.testing.assert_close(layer(x), first)
        layer.banks["src"].B["oc"].mul_(3)
        routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.tensor([0, 0, 0, 0]))
        torch.testing.assert_close(layer(x), by_hand(layer, x, src, "src"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first[2], layer(x)[2].detach())


@pytest.mark.parametrize("mixed_path", ["auto", *KERNELS])
@pytest.mark.parametrize("langs", [["fr", "en", "oc", "de", "fr"], ["oc", "oc", "oc", "oc", "oc"]])
def test_inference_equals_training_forward(mixed_path, langs):
    """Without autograd a one-language batch runs as a merged layer and stacked batches add in place: the same
    outputs as the autograd path, one token or many per sample."""
    layer, routing = make_layer("tgt", alpha=3, mixed_path=mixed_path)
    layer.eval()
    bank = layer.banks["tgt"]
    bank.set_mask("B", "oc", (torch.rand_like(bank.B["oc"]) > 0.5).float())
    bank.set_mask("A", "fr", (torch.rand_like(bank.A["fr"]) > 0.5).float())
    routing.set(torch.zeros(5, dtype=torch.long), torch.tensor([LANGS.index(c) for c in langs]))
    for tokens in (1, 4):
        x = torch.randn(5, tokens, 8)
        with torch.no_grad():
            fast = layer(x)
        torch.testing.assert_close(fast, layer(x).detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast, by_hand(layer, x, langs, "tgt"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tgt", [[0, 1, 2, 3], [2, 2, 2, 2]])
@pytest.mark.parametrize("mixed_path", ["stacked", "gathered"])
def test_inference_under_autocast_matches_float32(mixed_path, tgt):
    """Decoding under autocast (bf16 on CPU here; fp16/bf16 on GPUs): the in-place and merged fast paths must
    not mix dtypes."""
    layer, routing = make_layer("tgt", mixed_path=mixed_path)
    layer.eval()
    routing.set(torch.zeros(4, dtype=torch.long), torch.tensor(tgt))
    x = torch.randn(4, 1, 8)
    with torch.no_grad():
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, atol=5e-2, rtol=5e-2)


def test_no_grad_in_train_mode_keeps_adapter_dropout():
    """The merged fast path is for evaluation only: under no_grad in train mode the adapter dropout still applies."""
    layer, routing = make_layer("src")
    layer.banks["src"].dropout = nn.Dropout(0.5)
    routing.set(torch.full((3,), LANGS.index("de")), torch.zeros(3, dtype=torch.long))
    x = torch.randn(3, 4, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        train_no_grad = layer(x)
    torch.manual_seed(0)
    torch.testing.assert_close(train_no_grad, layer(x).detach())
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand(layer, x, ["de"] * 3, "src"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixed_path", ["segments", "stacked", "gathered", "grouped"])
@pytest.mark.parametrize("in_slice, out_slice", [(None, (2, 5)), ((3, 7), None), ((1, 6), (0, 4))])
def test_block_lora_equals_formula_in_training_and_decoding(mixed_path, in_slice, out_slice):
    """A LoRA on a block of W: h = W x + b, then h[out_slice] += s_l B_l A_l x[in_slice], every other unit as W x."""
    torch.manual_seed(0)
    routing = Routing(LANGS)
    linear = nn.Linear(8, 6)
    lora_in = 8 if in_slice is None else in_slice[1] - in_slice[0]
    lora_out = 6 if out_slice is None else out_slice[1] - out_slice[0]
    bank = LoRABank(LANGS, RANKS, lora_in, lora_out)
    bank.mixed_path = mixed_path
    for lang in LANGS:
        nn.init.normal_(bank.B[lang])
    layer = LSLoLinear(linear, "enc.0.fc1", "src", {"src": bank}, routing, in_slice=in_slice, out_slice=out_slice)
    src = ["fr", "en", "fr", "oc", "de"]
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.zeros(5, dtype=torch.long))
    x = torch.randn(5, 3, 8)
    expected = x @ linear.weight.T + linear.bias
    i0, i1 = in_slice or (0, 8)
    o0, o1 = out_slice or (0, 6)
    expected = expected.clone()
    for b, lang in enumerate(src):
        expected[b, :, o0:o1] += x[b, :, i0:i1] @ bank.A[lang].T @ bank.B[lang].T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # mixed kernel without autograd
        for lang in ("oc", "en"):  # one language: the merged layer W + pad(ΔW)
            routing.set(torch.full((5,), LANGS.index(lang)), torch.zeros(5, dtype=torch.long))
            single = x @ linear.weight.T + linear.bias
            single[..., o0:o1] += x[..., i0:i1] @ bank.A[lang].T @ bank.B[lang].T
            torch.testing.assert_close(layer(x), single, atol=1e-5, rtol=1e-5)


def make_block_layer(index, in_slice, out_slice, mixed_path):
    torch.manual_seed(0)
    routing = Routing(LANGS)
    linear = nn.Linear(8, 6).requires_grad_(False)
    lora_in = 8 if in_slice is None else in_slice[1] - in_slice[0]
    lora_out = 6 if out_slice is None else out_slice[1] - out_slice[0]
    indexes = ("src", "tgt") if index == "learn" else (index,)
    banks = {ix: LoRABank(LANGS, RANKS, lora_in, lora_out, alpha=3) for ix in indexes}
    for bank in banks.values():
        bank.mixed_path = mixed_path
        for lang in LANGS:
            nn.init.normal_(bank.B[lang])
    weights = IndexWeights() if index == "learn" else None
    if weights is not None:
        nn.init.normal_(weights.logits)
    layer = LSLoLinear(linear, "enc.0.fc1", index, banks, routing, weights, in_slice=in_slice, out_slice=out_slice)
    return layer, routing


def block_formula(layer, x, langs_of):
    """W x + b + pad(Σ_index w_index · s_l B_l A_l x[in_slice]) to the whole output, sample by sample, plain torch."""
    i0, i1 = layer.in_slice or (0, layer.in_features)
    o0, o1 = layer.out_slice or (0, layer.out_features)
    rows = []
    for b in range(x.shape[0]):
        delta = 0
        for index, w in layer.bank_weights().items():
            bank, lang = layer.banks[index], langs_of[index][b]
            a, bb = bank.effective_A(lang), bank.effective_B(lang)
            delta = delta + w * bank.scaling[lang] * (x[b, :, i0:i1] @ a.T @ bb.T)
        rows.append(x[b] @ layer.base.weight.T + layer.base.bias
                    + torch.nn.functional.pad(delta, (o0, layer.out_features - o1)))
    return torch.stack(rows)


@pytest.mark.parametrize("x_grad, frozen", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("mixed_path", KERNELS)
@pytest.mark.parametrize("index", ["src", "learn"])
@pytest.mark.parametrize("src", [["fr", "en", "fr", "oc", "de"], ["oc"] * 5])
@pytest.mark.parametrize("in_slice, out_slice", [(None, (2, 5)), ((1, 6), (0, 4)), ((3, 7), None)])
def test_block_lora_gradients_equal_formula(in_slice, out_slice, src, index, mixed_path, x_grad, frozen):
    """Training on a block of W (the slice fc layout): the output and the gradients of x, of every A and B and of
    eq. 5's index weights equal autograd through the plain-torch formula, one language or mixed, with or without
    a gradient for x (a first layer's input has none), W frozen or trained."""
    layer, routing = make_block_layer(index, in_slice, out_slice, mixed_path)
    layer.base.requires_grad_(not frozen)
    tgt = ["de", "oc", "en", "en", "fr"]
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.tensor([LANGS.index(c) for c in tgt]))
    x = torch.randn(5, 3, 8, requires_grad=x_grad)
    upstream = torch.randn(5, 3, 6)
    params = [p for p in layer.parameters() if p.requires_grad] + ([x] if x_grad else [])
    got_out = layer(x)
    got = torch.autograd.grad((got_out * upstream).sum(), params, allow_unused=True)
    expected_out = block_formula(layer, x, {"src": src, "tgt": tgt})
    expected = torch.autograd.grad((expected_out * upstream).sum(), params, allow_unused=True)
    torch.testing.assert_close(got_out, expected_out, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, expected):
        if e is None:  # a language absent from the batch
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_slice, out_slice", [(None, (0, 4)), ((2, 6), None), ((1, 6), (0, 4))])
def test_block_training_step_copies_no_full_width_tensor(in_slice, out_slice):
    """Under autograd a LoRA on a block of W (fc1's output slice, fc2's input slice) adds into the frozen layer's
    fresh output in place and its input gradient into the frozen layer's fresh input gradient: no slice backward
    (each zero-fills a full-width gradient) and no more torch.cat (a full copy) than the LoRA on all of W runs."""
    def ops_of(layer, routing, src):
        routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.zeros(5, dtype=torch.long))
        x = torch.randn(5, 3, 8, requires_grad=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            layer(x).sum().backward()
        return [event.name for event in prof.events()]

    for mixed_path in KERNELS:
        for src in (["fr"] * 5, ["fr", "en", "fr", "oc", "de"]):
            block = ops_of(*make_block_layer("src", in_slice, out_slice, mixed_path), src)
            whole = ops_of(*make_block_layer("src", None, None, mixed_path), src)
            assert "aten::slice_backward" not in block, (mixed_path, src)
            assert block.count("aten::cat") <= whole.count("aten::cat"), (mixed_path, src)


@pytest.mark.parametrize("src", [["fr", "en", "fr", "oc", "de"], ["oc"] * 5])
@pytest.mark.parametrize("in_slice, out_slice", [(None, (2, 5)), ((3, 7), None)])
def test_block_training_under_autocast_matches_float32(in_slice, out_slice, src):
    """Training on a block of W under autocast (bf16 on CPU here, as lslo.train on GPUs): output and gradients
    keep their dtypes (x's gradient in x's dtype) and match float32 within bf16's precision."""
    layer, routing = make_block_layer("src", in_slice, out_slice, "gathered")
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.zeros(5, dtype=torch.long))
    x = torch.randn(5, 3, 8, requires_grad=True)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected.sum(), params, allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    grads = torch.autograd.grad(low.float().sum(), params, allow_unused=True)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, atol=1e-1, rtol=5e-2)
    for g, e, p in zip(grads, expected_grads, params):
        assert (g is None) == (e is None)
        if e is not None:
            assert g.dtype == p.dtype
            torch.testing.assert_close(g, e, atol=2e-1, rtol=5e-2)


def test_add_into_block_gradient():
    """add_into_block: out[:, start:start + width] += delta, with its gradients (finite differences, float64)."""
    from lslo.kernels import add_into_block

    out = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    expected = out.detach().clone()
    expected[:, 2:5] += delta.detach()
    torch.testing.assert_close(add_into_block(out.detach().clone(), delta.detach(), 2), expected, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda o, d: add_into_block(o.clone(), d, 2), (out, delta))


@pytest.mark.parametrize("mixed_path", KERNELS)
def test_add_delta_without_out_is_the_per_sample_delta(mixed_path):
    """add_delta(bank, None, ...): the delta alone, as the reference (eq. 3 one sample at a time), gradients too."""
    layer, routing = make_layer("src", alpha=3, mixed_path=mixed_path)
    bank = layer.banks["src"]
    src = ["oc", "en", "oc", "fr", "de"]
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.zeros(5, dtype=torch.long))
    x = torch.randn(5, 3, 8, requires_grad=True)
    params = [x, *bank.parameters()]
    delta = add_delta(bank, None, x, routing.grouping("src", 5, x.device))
    expected = bank.per_sample_delta(x, src)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(expected)
    got = torch.autograd.grad((delta * upstream).sum(), params, allow_unused=True)
    want = torch.autograd.grad((expected * upstream).sum(), params, allow_unused=True)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("mixed_path", ["stacked", "gathered"])
def test_decoding_adds_into_a_block_in_place(mixed_path, tokens):
    """Without autograd a mixed batch adds into the block of the frozen layer's output in place (a view with strided
    rows: the one-token decoding step and the addmm/baddbmm kernels), the rest of the output untouched."""
    layer, routing = make_layer("src", mixed_path=mixed_path)
    layer.eval()
    bank = layer.banks["src"]
    src = ["fr", "en", "oc", "de"]
    routing.set(torch.tensor([LANGS.index(c) for c in src]), torch.zeros(4, dtype=torch.long))
    x = torch.randn(4, tokens, 8)
    wide = torch.randn(4, tokens, 10)
    block = wide[..., 3:9]
    before = wide.clone()
    with torch.no_grad():
        added = add_delta(bank, block, x, routing.grouping("src", 4, x.device))
    assert added is block
    torch.testing.assert_close(wide[..., 3:9], before[..., 3:9] + bank.per_sample_delta(x, src).detach(),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(wide[..., :3], before[..., :3]) and torch.equal(wide[..., 9:], before[..., 9:])


def test_block_must_fit_the_layer_and_the_bank():
    routing, linear = Routing(LANGS), nn.Linear(8, 6)
    with pytest.raises(LsloError, match=r"output block \[4:8\] does not fit the layer's 6 output units"):
        LSLoLinear(linear, "enc.0.fc1", "src", {"src": LoRABank(LANGS, RANKS, 8, 4)}, routing, out_slice=(4, 8))
    with pytest.raises(LsloError, match="bank 'src' is 8 -> 6; the LoRA block of this site is 8 -> 3"):
        LSLoLinear(linear, "enc.0.fc1", "src", {"src": LoRABank(LANGS, RANKS, 8, 6)}, routing, out_slice=(0, 3))


@pytest.mark.parametrize("rank", [1, 2, 8])
def test_a_init_bound_and_std_per_rank(rank):
    """authors: U(-1/√r, 1/√r) (kaiming_uniform_(a=√5) on A stored [in, r]), std 1/√(3r); peft: U(-1/√in, 1/√in);
    gaussian: N(0, 1/r²). Checked on 60,000 entries (std within 2 %, 10 standard errors)."""
    d_in = 3000
    langs = [f"l{i}" for i in range(20)]
    expected = {"authors": (1 / math.sqrt(rank), 1 / math.sqrt(3 * rank)),
                "peft": (1 / math.sqrt(d_in), 1 / math.sqrt(3 * d_in)),
                "gaussian": (None, 1 / rank)}
    torch.manual_seed(rank)
    for init, (bound, std) in expected.items():
        bank = LoRABank(langs, {lang: rank for lang in langs}, d_in, 4, init=init)
        a = torch.cat([bank.A[lang].detach().flatten() for lang in langs])
        assert all(bank.A[lang].shape == (rank, d_in) and torch.all(bank.B[lang] == 0) for lang in langs)
        assert a.std().item() == pytest.approx(std, rel=0.02)
        assert abs(a.mean().item()) < 5 * std / math.sqrt(a.numel())
        if bound is not None:  # uniform: inside the bound, and reaching it
            assert a.abs().max().item() <= bound and a.abs().max().item() > 0.999 * bound
    if rank in (2, 8):  # the figures at d = 1024: std 0.408 at r = 2, 0.204 at r = 8
        assert expected["authors"][1] == pytest.approx({2: 0.408, 8: 0.204}[rank], abs=1e-3)
    with pytest.raises(LsloError, match="LoRA init must be one of authors, peft, gaussian"):
        LoRABank(langs, {lang: rank for lang in langs}, 8, 4, init="xavier")


def test_kernel_list_covers_every_mixed_path():
    from lslo.kernels import MIXED_PATHS

    assert set(KERNELS) == set(MIXED_PATHS) - {"auto"}


@pytest.mark.parametrize("shape", [(16, 8, 3), (8, 6, 3), (12, 20, 1)])
def test_grouped_matmul_equals_one_matmul_per_group(shape):
    """grouped_matmul (F.grouped_mm where its 16-byte stride rule holds, the per-group loop otherwise) against
    plain matmuls of each group's rows, forward and backward, empty groups included."""
    import torch.nn.functional as F

    from lslo.kernels import grouped_matmul

    k, n, groups = shape
    rows = torch.randn(11, k, requires_grad=True)
    weights = torch.randn(groups, k, n, requires_grad=True)
    ends = [3, 3, 11][-groups:] if groups > 1 else [11]
    offsets = torch.tensor(ends, dtype=torch.int32)
    out = grouped_matmul(rows, weights, offsets)
    starts = [0] + ends[:-1]
    expected = torch.cat([rows[s:e] @ weights[i] for i, (s, e) in enumerate(zip(starts, ends))])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), [rows, weights])  # an expanded gradient reaches the kernel
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), [rows, weights])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert hasattr(F, "grouped_mm")  # torch >= 2.10 has it on CPU; the aligned shapes above ran it


def test_grouped_kernel_runs_grouped_mm_and_every_kernel_equals_per_sample_reference(monkeypatch):
    """At GEMM-aligned widths the grouped kernel calls F.grouped_mm (counted); every kernel's output and gradients
    (input, every A and B) equal those of the reference, LoRABank.per_sample_delta (eq. 3 one sample at a time),
    with alpha != r so the scaling s_l is exercised."""
    import torch.nn.functional as F

    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    bank = LoRABank(LANGS, RANKS, 16, 8, alpha=3, init="peft")
    for lang in LANGS:
        nn.init.normal_(bank.B[lang])
    routing = Routing(LANGS)
    langs = ["fr", "en", "fr", "oc", "de"]
    routing.set(torch.tensor([LANGS.index(c) for c in langs]), torch.zeros(5, dtype=torch.long))
    g = routing.grouping("src", 5, torch.device("cpu"))
    x = torch.randn(5, 3, 16)
    params = [bank.A[lang] for lang in LANGS] + [bank.B[lang] for lang in LANGS]

    def outputs_and_gradients(delta):
        inputs = x.clone().requires_grad_(True)
        out = delta(inputs)
        return [out.detach(), *torch.autograd.grad((out * out).sum(), [inputs, *params])]

    reference = outputs_and_gradients(lambda inputs: bank.per_sample_delta(inputs, langs))
    assert not calls and reference[0].abs().max() > 1e-2
    for kernel in KERNELS:
        bank.mixed_path = kernel
        got = outputs_and_gradients(lambda inputs: add_delta(bank, torch.zeros(5, 3, 8), inputs, g))
        assert len(calls) == (2 if kernel == "grouped" else 0)  # A and B, one grouped GEMM each
        calls.clear()
        for name, have, want in zip(["output", "x"] + [f"grad {i}" for i in range(len(params))], got, reference):
            message = f"{kernel}, {name}"
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{message}: {m}")  # noqa: B023


def test_auto_measures_only_on_cuda_and_keeps_the_faster(monkeypatch):
    """The measured switch (KernelTimer): the faster candidate is kept per key and measured once; on CPU "auto"
    never measures and keeps the cost-model choice."""
    from lslo.kernels import KERNEL_TIMER, KernelTimer

    layer, routing = make_layer("src", mixed_path="auto")
    routing.set(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]))
    bank, g = layer.banks["src"], routing.grouping("src", 4, torch.device("cpu"))
    x = torch.zeros(4, 500, 8)
    monkeypatch.setattr(KERNEL_TIMER, "faster", lambda *a: pytest.fail("measured on CPU"))
    assert choose_kernel(bank, g, x) == "gathered"
    measured = []
    timer = KernelTimer()
    monkeypatch.setattr(timer, "seconds", lambda b, gr, inputs, kernel: measured.append(kernel) or
                        {"gathered": 2.0, "grouped": 1.0}[kernel])
    assert timer.faster(bank, g, x, ("gathered", "grouped")) == "grouped"
    assert timer.faster(bank, g, x, ("gathered", "grouped")) == "grouped" and measured == ["gathered", "grouped"]
    timer.faster(bank, g, torch.zeros(4, 2000, 8), ("gathered", "grouped"))  # more rows: another key
    assert len(measured) == 4
    failing = KernelTimer()

    def seconds(b, gr, inputs, kernel):
        if kernel == "grouped":
            raise RuntimeError("expected data_ptr to be aligned to 16 bytes")
        return 5.0
    monkeypatch.setattr(failing, "seconds", seconds)
    with pytest.warns(UserWarning, match="'grouped' failed"):
        assert failing.faster(bank, g, x, ("grouped", "gathered")) == "gathered"


def test_kernel_timer_leaves_parameters_and_rng_alone():
    from lslo.kernels import KernelTimer

    layer, routing = make_layer("src", mixed_path="auto")
    routing.set(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]))
    bank, g = layer.banks["src"], routing.grouping("src", 4, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in bank.named_parameters()}
    state = torch.get_rng_state()
    assert KernelTimer(repeats=1).seconds(bank, g, torch.zeros(4, 5, 8), "grouped") > 0
    assert torch.equal(torch.get_rng_state(), state)
    for name, p in bank.named_parameters():
        assert p.grad is None and torch.equal(p, before[name])
    assert bank.mixed_path == "auto"


def test_kernel_timer_keeps_the_batch_cache_clean():
    """Timing runs on a copy of the bank and of the grouping: nothing it builds enters the batch's weight cache,
    where a later bank could find it under a reused id."""
    from lslo.kernels import KernelTimer

    layer, routing = make_layer("src", mixed_path="auto")
    layer.eval()
    routing.set(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]))
    bank, g = layer.banks["src"], routing.grouping("src", 4, torch.device("cpu"))
    with torch.no_grad():
        for kernel in ("gathered", "grouped"):
            KernelTimer(repeats=1).seconds(bank, g, torch.zeros(4, 5, 8), kernel)
    assert not [key for key in g._routes if key[0] == "weights"]
