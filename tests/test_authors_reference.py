"""Acceptance test against an independent reimplementation of the authors' LSLo forward pass (issue 13).

The reference follows the authors' release (Spike0924/LSLo, modules/lora.py and the encoder/decoder layers): a
plain HF M2M100 whose linear layers get forward hooks that add, language by language, ``x @ lora_a @ lora_b`` with
``lora_a`` stored [in, r] and ``lora_b`` [r, out] (no scaling), selecting each language's samples with a mask; the
fc1 LoRA reads and adds to units [start:start + dim] of fc1's input and output, fc2's likewise (start 0 and dim
d_model, as the authors run it); each layer is indexed by the source or the target language per a src/tgt plan.
Outputs and gradients of every mixed-batch kernel, of merged decoding and of merge_direction must equal it.
"""

import copy

import pytest
import torch
from conftest import DECODER_START, lang_token_id, make_batch, make_tiny_model

from lslo.adapters import merge_direction
from lslo.kernels import MIXED_PATHS
from lslo.model import MODULE_PATHS, LSLoSpec, inject_lslo

LANGS = ["en", "fr", "oc", "wo"]
RANKS = {"en": 1, "fr": 2, "oc": 3, "wo": 5}
PLAN = {"enc": ["src", "tgt"], "dec": ["tgt", "src"]}
DIRECTIONS = [("en", "fr"), ("oc", "wo"), ("fr", "en"), ("wo", "oc"), ("en", "wo"), ("oc", "fr")]
D_MODEL = 16  # conftest's tiny model: d_model 16, ffn 32


def lslo_and_reference(seed=0):
    """Our LSLo model (slice layout, random A and B) and the reference: a copy of the base with hooks and
    the authors' [in, r] / [r, out] parameters holding the same numbers."""
    base = make_tiny_model(seed)
    plain = copy.deepcopy(base)
    spec = LSLoSpec(languages=LANGS, ranks=RANKS, index_plan=PLAN, fc_lora="slice", init="authors")
    model = inject_lslo(base, spec)
    g = torch.Generator().manual_seed(seed + 1)
    reference = {}  # site -> (index, {lang: (lora_a [in, r], lora_b [r, out])})
    with torch.no_grad():
        for site, module in model.lslo_modules().items():
            bank = module.banks[module.index]
            loras = {}
            for lang in LANGS:
                bank.B[lang].copy_(torch.randn(bank.B[lang].shape, generator=g) * 0.5)
                loras[lang] = (bank.A[lang].detach().t().clone().requires_grad_(True),
                               bank.B[lang].detach().t().clone().requires_grad_(True))
            reference[site] = (module.index, loras)
    return model, plain, reference


def lang_loop(x, direction, loras):
    """The authors' LangSpecLora.forward (batch-first here): zeros, then each language's rows x @ A @ B."""
    out = torch.zeros(*x.shape[:-1], next(iter(loras.values()))[1].shape[1], dtype=x.dtype)
    for i, lang in enumerate(LANGS):
        rows = direction == i
        if rows.any():
            lora_a, lora_b = loras[lang]
            out[rows] = x[rows] @ lora_a @ lora_b
    return out


def hook_reference(plain, reference, src, tgt):
    """Forward hooks adding the reference LoRAs to the plain model's linear layers; returns the handles."""
    directions = {"src": src, "tgt": tgt}
    stacks = {"enc": plain.model.encoder.layers, "dec": plain.model.decoder.layers}
    start, dim = 0, D_MODEL
    handles = []
    for site, (index, loras) in reference.items():
        side, layer, module = site.split(".")
        linear = stacks[side][int(layer)].get_submodule(MODULE_PATHS[side][module])

        def hook(mod, inputs, output, module=module, index=index, loras=loras):
            x, direction = inputs[0], directions[index]
            if module in ("fc1", "fc2"):  # the authors' tmp_x[..., s:s+dim] += lora(x[..., s:s+dim])
                delta = lang_loop(x[..., start:start + dim], direction, loras)
                return torch.cat([output[..., :start], output[..., start:start + dim] + delta,
                                  output[..., start + dim:]], dim=-1)
            return output + lang_loop(x, direction, loras)

        handles.append(linear.register_forward_hook(hook))
    return handles


def decoder_ids(tgts, length=5):
    ids = torch.randint(4, 64, (len(tgts), length), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = DECODER_START
    ids[:, 1] = torch.tensor([lang_token_id(t) for t in tgts])
    return ids


def reference_logits(plain, reference, batch):
    ids = {side: torch.tensor([LANGS.index(c) for c in batch[side]]) for side in ("src", "tgt")}
    handles = hook_reference(plain, reference, ids["src"], ids["tgt"])
    try:
        return plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_ids(batch["tgt"])).logits
    finally:
        for handle in handles:
            handle.remove()


def lslo_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=decoder_ids(batch["tgt"]), src_lang=batch["src"], tgt_lang=batch["tgt"]).logits


@pytest.mark.parametrize("mixed_path", MIXED_PATHS)
def test_mixed_batch_outputs_and_gradients_equal_authors_loop(mixed_path):
    model, plain, reference = lslo_and_reference()
    model.set_mixed_path(mixed_path)
    model.train()  # dropout is 0 in the tiny config: train mode takes the autograd path of every kernel
    batch = make_batch(DIRECTIONS)
    ours, theirs = lslo_logits(model, batch), reference_logits(plain, reference, batch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (theirs - plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=decoder_ids(batch["tgt"])).logits).abs().max() > 1e-2
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(7))
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for site, module in model.lslo_modules().items():
        bank = module.banks[module.index]
        for lang in LANGS:
            lora_a, lora_b = reference[site][1][lang]
            torch.testing.assert_close(bank.A[lang].grad, lora_a.grad.t(), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(bank.B[lang].grad, lora_b.grad.t(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mixed_path", MIXED_PATHS)
def test_merged_decoding_equals_authors_loop(mixed_path):
    """Evaluation without autograd, one target language and mixed sources (what the evaluate stage decodes):
    target-indexed layers run as merged weights W + ΔW, source-indexed ones through the mixed kernel."""
    model, plain, reference = lslo_and_reference()
    model.set_mixed_path(mixed_path)
    model.eval()
    batch = make_batch([("en", "oc"), ("fr", "oc"), ("wo", "oc"), ("en", "oc")])
    with torch.no_grad():
        torch.testing.assert_close(lslo_logits(model, batch), reference_logits(plain, reference, batch),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("src, tgt", [("en", "wo"), ("oc", "fr")])
def test_merge_direction_equals_authors_loop(src, tgt):
    model, plain, reference = lslo_and_reference()
    batch = make_batch([(src, tgt)] * 3)
    merged = merge_direction(model, src, tgt).eval()
    with torch.no_grad():
        ours = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      decoder_input_ids=decoder_ids(batch["tgt"])).logits
        torch.testing.assert_close(ours, reference_logits(plain, reference, batch), atol=1e-5, rtol=1e-5)
