"""LSLoModel: mixed-direction batches equal single-direction runs (forward, gradients, beam search),
weight learning (eq. 5), input validation, and equality with PEFT LoRA for one language."""


import pytest
import torch
from torch import nn
from conftest import LANGUAGES, PAD, DECODER_START, lang_token_id, make_batch, make_tiny_model, randomize_lora

from lslo.errors import LsloError
from lslo.layer import LSLoLinear
from lslo.model import MODULE_NAMES, LSLoSpec, inject_lslo

RANKS = {"en": 2, "fr": 1, "de": 3, "oc": 4, "wo": 2}
MIXED_PLAN = {"enc": ["src", "tgt"], "dec": ["tgt", "src"]}
DIRECTIONS = [("en", "fr"), ("fr", "oc"), ("en", "fr"), ("de", "wo"), ("oc", "en"), ("fr", "oc")]


def lslo_model(index_plan=MIXED_PLAN, seed=0, std=0.5, **spec_kwargs):
    spec = LSLoSpec(languages=LANGUAGES, ranks=RANKS, index_plan=index_plan, **spec_kwargs)
    model = inject_lslo(make_tiny_model(seed), spec)
    randomize_lora(model, std=std, seed=seed + 1)
    return model


def decoder_ids(tgts, length=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (len(tgts), length), generator=g)
    ids[:, 0] = DECODER_START
    ids[:, 1] = torch.tensor([lang_token_id(t) for t in tgts])
    return ids


def run(model, batch, rows=None, **kw):
    rows = list(range(len(batch["src"]))) if rows is None else rows
    return model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                 decoder_input_ids=decoder_ids(batch["tgt"])[rows],
                 src_lang=[batch["src"][r] for r in rows], tgt_lang=[batch["tgt"][r] for r in rows], **kw)


def test_injection_structure_and_frozen_base():
    model = lslo_model(modules=["q", "c-k", "fc2"], layers={"enc": [1], "dec": [0, 1]}, fc_lora="full")
    assert sorted(model.lslo_modules()) == ["dec.0.c-k", "dec.0.fc2", "dec.0.q", "dec.1.c-k", "dec.1.fc2",
                                            "dec.1.q", "enc.1.fc2", "enc.1.q"]
    assert isinstance(model.base.model.decoder.layers[1].encoder_attn.k_proj, LSLoLinear)
    assert model.lslo_modules()["enc.1.q"].index == "tgt" and model.lslo_modules()["dec.1.q"].index == "src"
    trainable = dict(model.named_trainable_parameters())
    assert all(".banks." in n for n in trainable)
    expected = 8 * sum(r * (16 + 16) for r in RANKS.values())  # every chosen matrix is 16x16 except fc2: 32 in
    expected += 3 * sum(r * 16 for r in RANKS.values())  # 3 fc2 sites have 32 inputs: +16 per rank unit
    assert sum(p.numel() for p in trainable.values()) == expected
    key = "base.model.encoder.layers.1.self_attn.q_proj.banks.tgt.A.oc"
    assert model.state_dict()[key].shape == (4, 16)


@pytest.mark.parametrize("mixed_path", ["segments", "stacked", "gathered", "grouped"])
def test_mixed_batch_forward_equals_single_direction_loop(mixed_path):
    model = lslo_model()
    model.set_mixed_path(mixed_path)
    batch = make_batch(DIRECTIONS)
    mixed = run(model, batch).logits
    for b in range(len(DIRECTIONS)):
        single = run(model, batch, rows=[b]).logits
        assert (mixed[b] - single[0]).abs().max() <= 1e-5
    # with B = 0 the model is the base model; with random B the adapters change the logits
    for module in model.lslo_modules().values():
        for bank in module.banks.values():
            for p in bank.B.values():
                nn.init.zeros_(p)
    zero_b = run(model, batch).logits
    plain = make_tiny_model(0)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               decoder_input_ids=decoder_ids(batch["tgt"])).logits
    assert (zero_b - plain).abs().max() <= 1e-6
    assert (zero_b - mixed).abs().max() > 1e-2


def test_gradients_reach_only_languages_in_batch():
    model = lslo_model(index_plan={"enc": "src", "dec": "tgt"})
    model.train()
    batch = make_batch([("en", "fr"), ("fr", "oc"), ("en", "oc")])
    labels = decoder_ids(batch["tgt"], seed=4)
    run(model, batch, labels=labels).loss.backward()
    for site, module in model.lslo_modules().items():
        present = {"en", "fr"} if module.index == "src" else {"fr", "oc"}
        for lang in LANGUAGES:
            for matrix in (module.banks[module.index].A[lang], module.banks[module.index].B[lang]):
                if lang in present:
                    assert matrix.grad is not None and matrix.grad.abs().sum() > 0, (site, lang)
                else:
                    assert matrix.grad is None, (site, lang)
    for name, p in model.base.named_parameters():
        if ".banks." not in name:
            assert not p.requires_grad and p.grad is None, name


def test_weight_learning_mode():
    model = lslo_model(index_plan="learn")
    assert sorted(model.index_weights) == ["dec_0", "dec_1", "enc_0", "enc_1"]
    keys = [k for k in model.state_dict() if "logits" in k]
    assert keys == [f"index_weights.{k}.logits" for k in ["enc_0", "enc_1", "dec_0", "dec_1"]]
    assert all(m.index == "learn" and set(m.banks) == {"src", "tgt"} for m in model.lslo_modules().values())
    batch = make_batch(DIRECTIONS)
    mixed = run(model, batch)
    for b in (0, 3):
        assert (mixed.logits[b] - run(model, batch, rows=[b]).logits[0]).abs().max() <= 1e-5
    mixed.logits.pow(2).mean().backward()
    for module in model.index_weights.values():
        assert module.logits.grad is not None and module.logits.grad.abs().sum() > 0
    with torch.no_grad():
        for i, module in enumerate(model.index_weights.values()):
            module.logits.copy_(torch.tensor([1.0, -1.0]) * (1 if i % 2 == 0 else -1))
    df = model.learned_index_weights()
    assert list(df.columns) == ["side", "layer", "w_src", "w_tgt"] and list(df.layer) == [1, 2, 1, 2]
    assert ((df.w_src + df.w_tgt - 1).abs() < 1e-6).all()
    plan = model.argmax_index_plan()
    assert plan == {"enc": ["src", "tgt"], "dec": ["src", "tgt"]}
    for side in ("enc", "dec"):
        rows = df[df.side == side]
        assert plan[side] == ["src" if s > t else "tgt" for s, t in zip(rows.w_src, rows.w_tgt)]


def beam_outputs(model, batch, rows, tgts=None, num_beams=5):
    tgts = [batch["tgt"][r] for r in rows] if tgts is None else tgts
    out = model.generate(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                         src_lang=[batch["src"][r] for r in rows], tgt_lang=tgts,
                         decoder_input_ids=decoder_ids(tgts, length=2), num_beams=num_beams,
                         max_new_tokens=8, do_sample=False)
    return [[t for t in seq.tolist() if t != PAD] for seq in out]


@pytest.mark.parametrize("mixed_path", ["segments", "stacked", "gathered", "grouped"])
def test_beam_search_mixed_directions_equals_single_direction(mixed_path):
    model = lslo_model(std=1.0)
    model.set_mixed_path(mixed_path)
    batch = make_batch([("en", "fr"), ("fr", "oc"), ("de", "wo"), ("en", "fr"), ("fr", "oc"), ("de", "wo")])
    mixed = beam_outputs(model, batch, list(range(6)))
    for direction_rows in ([0, 3], [1, 4], [2, 5]):
        assert beam_outputs(model, batch, direction_rows) == [mixed[r] for r in direction_rows]
    # same source and forced prefix, different target LoRA -> different translations
    same_prefix = decoder_ids(["fr"] * 3, length=2)
    outs = model.generate(input_ids=batch["input_ids"][[0, 0, 0]], attention_mask=batch["attention_mask"][[0, 0, 0]],
                          src_lang=["en"] * 3, tgt_lang=["fr", "oc", "wo"], decoder_input_ids=same_prefix,
                          num_beams=5, max_new_tokens=8)
    assert len({tuple(o.tolist()) for o in outs}) > 1
    assert not model.routing.active


def test_spec_and_model_errors():
    with pytest.raises(LsloError, match="unknown language.*xx"):
        LSLoSpec(languages=["en", "fr"], ranks={"en": 2, "fr": 2, "xx": 2})
    with pytest.raises(LsloError, match="no rank.*fr"):
        LSLoSpec(languages=["en", "fr"], ranks={"en": 2})
    with pytest.raises(LsloError, match="'fr'.*>= 1.*0"):
        LSLoSpec(languages=["en", "fr"], ranks={"en": 2, "fr": 0})
    with pytest.raises(LsloError, match="unknown LSLo module.*out_proj.*valid names"):
        LSLoSpec(languages=["en"], ranks={"en": 2}, modules=["q", "out_proj"])
    spec = LSLoSpec(languages=["en"], ranks={"en": 2}, index_plan={"enc": ["src"] * 3, "dec": "tgt"})
    with pytest.raises(LsloError, match="3 entries.*2 enc layers"):
        inject_lslo(make_tiny_model(), spec)
    spec = LSLoSpec(languages=["en"], ranks={"en": 2})
    with pytest.raises(LsloError, match="unsupported model class Linear; supported: M2M100"):
        inject_lslo(nn.Linear(2, 2), spec)
    from transformers import BartConfig, BartForConditionalGeneration
    bart = BartForConditionalGeneration(BartConfig(vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1,
                                                   encoder_ffn_dim=8, decoder_ffn_dim=8, encoder_attention_heads=1,
                                                   decoder_attention_heads=1, max_position_embeddings=16))
    with pytest.raises(LsloError, match="unsupported model class BartForConditionalGeneration"):
        inject_lslo(bart, spec)
    model = lslo_model()
    batch = make_batch(DIRECTIONS[:2])
    with pytest.raises(LsloError, match="unknown language.*zz"):
        model(input_ids=batch["input_ids"], src_lang=["en", "zz"], tgt_lang=["fr", "fr"])
    with pytest.raises(LsloError, match="src_lang.*one language per sample"):
        model(input_ids=batch["input_ids"], src_lang=torch.tensor([0]), tgt_lang=torch.tensor([0, 1]))
    with pytest.raises(LsloError, match="src_lang="):
        model.base(input_ids=batch["input_ids"], decoder_input_ids=batch["input_ids"])


def test_single_language_equals_peft_lora():
    peft = pytest.importorskip("peft")
    spec = LSLoSpec(languages=["en"], ranks={"en": 4}, index_plan="src", alpha=8, fc_lora="full", init="peft")
    model = inject_lslo(make_tiny_model(5), spec)
    randomize_lora(model, seed=9)
    peft_model = peft.get_peft_model(make_tiny_model(5), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "fc1", "fc2"], lora_dropout=0.0))
    inner = peft_model.base_model.model
    n_sites = 0
    with torch.no_grad():
        for name, module in model.base.named_modules():
            if isinstance(module, LSLoLinear):
                target = inner.get_submodule(name)
                target.lora_A["default"].weight.copy_(module.banks["src"].A["en"])
                target.lora_B["default"].weight.copy_(module.banks["src"].B["en"])
                n_sites += 1
    assert n_sites == len([m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A])
    batch = make_batch([("en", "en")] * 3)
    ours = run(model, batch).logits
    theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=decoder_ids(batch["tgt"])).logits
    assert (ours - theirs).abs().max() <= 1e-5
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in model.trainable_parameters())


def test_default_spec_builds_the_papers_model():
    """LSLoSpec(languages, ranks) alone is the paper's model as the authors run it: every module, the slice fc
    layout (every LoRA d_model x d_model), the authors' init, and the paper's index plan (the top quarter of the
    encoder target-indexed; at 12 + 12 layers the plan of the workflow's `index: paper`)."""
    from lslo.finetune import resolve_index_plan

    spec = LSLoSpec(languages=["en", "oc"], ranks={"en": 2, "oc": 8})
    assert (spec.modules, spec.fc_lora, spec.init) == (list(MODULE_NAMES), "slice", "authors")
    paper = {"enc": ["src"] * 9 + ["tgt"] * 3, "dec": ["tgt"] * 12}
    assert spec.resolve({"enc": 12, "dec": 12})[1] == resolve_index_plan("paper", None) == paper
    assert spec.resolve({"enc": 24, "dec": 24})[1] == {"enc": ["src"] * 18 + ["tgt"] * 6, "dec": ["tgt"] * 24}
    torch.manual_seed(0)
    model = inject_lslo(make_tiny_model(0, encoder_layers=4), spec)  # d_model 16, ffn 32
    modules = model.lslo_modules()
    assert [modules[f"enc.{i}.q"].index for i in range(4)] == ["src"] * 3 + ["tgt"]
    assert [modules[f"dec.{i}.c-v"].index for i in range(2)] == ["tgt", "tgt"]
    assert modules["enc.0.fc1"].out_slice == (0, 16) and modules["dec.1.fc2"].in_slice == (0, 16)
    for module in modules.values():
        bank = module.banks[module.index]
        assert (bank.in_features, bank.out_features) == (16, 16)
    # the authors' A ~ U(-1/√r, 1/√r) (fan_in r), not PEFT's U(-1/√16, 1/√16): at r = 2 it reaches past 1/4
    a = torch.cat([m.banks[m.index].A["en"].detach().flatten() for m in modules.values()])
    assert 0.25 < a.abs().max() <= 1 / 2 ** 0.5
    assert LSLoSpec(**spec.to_dict()).resolve({"enc": 4, "dec": 2}) == spec.resolve({"enc": 4, "dec": 2})
