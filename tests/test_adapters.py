"""Adapter files (save/load round trip, errors) and merging one direction into a plain HF model."""

import json

import pytest
import torch
from conftest import LANGUAGES, DECODER_START, lang_token_id, make_batch, make_tiny_model, randomize_lora
from safetensors import safe_open
from transformers import M2M100ForConditionalGeneration

from lslo.adapters import load_adapters, merge_direction, save_adapters
from lslo.errors import LsloError
from lslo.model import LSLoSpec, inject_lslo

RANKS = {"en": 2, "fr": 1, "de": 3, "oc": 4, "wo": 2}
MIXED_PLAN = {"enc": ["src", "tgt"], "dec": ["tgt", "src"]}


LAYOUTS = [dict(fc_lora="full"), dict(fc_lora="slice", init="authors"),
           dict(fc_lora="slice", fc_lora_offset=8, fc_lora_width=16)]  # tiny model: d_model 16, ffn 32


def lslo_model(index_plan=MIXED_PLAN, modules="all", seed=0, **layout):
    model = inject_lslo(make_tiny_model(seed), LSLoSpec(LANGUAGES, RANKS, modules=modules, index_plan=index_plan,
                                                        **layout))
    randomize_lora(model, std=0.5, seed=seed + 1)
    return model


def add_masks(model):
    g = torch.Generator().manual_seed(7)
    for module in model.lslo_modules().values():
        for bank in module.banks.values():
            for lang in ("fr", "oc"):
                bank.set_mask("B", lang, (torch.rand(bank.B[lang].shape, generator=g) > 0.6).float())
            bank.set_mask("A", "fr", (torch.rand(bank.A["fr"].shape, generator=g) > 0.3).float())


def inputs(directions):
    batch = make_batch(directions)
    dec = torch.randint(4, 64, (len(directions), 5), generator=torch.Generator().manual_seed(2))
    dec[:, 0] = DECODER_START
    dec[:, 1] = torch.tensor([lang_token_id(t) for _, t in directions])
    return batch, dec


def lslo_logits(model, directions):
    batch, dec = inputs(directions)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec,
                 src_lang=batch["src"], tgt_lang=batch["tgt"]).logits


def plain_logits(hf_model, directions):
    batch, dec = inputs(directions)
    return hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec).logits


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index_plan,masked", [(MIXED_PLAN, False), (MIXED_PLAN, True), ("learn", True)])
def test_merge_equals_lslo_and_survives_save_pretrained(tmp_path, index_plan, masked, layout):
    model = lslo_model(index_plan, **layout)
    if masked:
        add_masks(model)
    if index_plan == "learn":
        with torch.no_grad():
            for i, w in enumerate(model.index_weights.values()):
                w.logits.copy_(torch.tensor([0.5 * i, -0.3]))
    direction = [("fr", "oc")] * 3
    expected = lslo_logits(model, direction)
    merged = merge_direction(model, "fr", "oc")
    assert type(merged) is M2M100ForConditionalGeneration
    assert (plain_logits(merged, direction) - expected).abs().max() <= 1e-5
    assert (plain_logits(make_tiny_model(0), direction) - expected).abs().max() > 1e-2  # adapters matter
    merged.save_pretrained(tmp_path / "merged")
    reloaded = M2M100ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert (plain_logits(reloaded, direction) - expected).abs().max() <= 1e-5
    # the LSLo model itself is untouched by merging
    assert (lslo_logits(model, direction) - expected).abs().max() == 0


def test_merge_picks_language_by_index_plan():
    model = lslo_model({"enc": "src", "dec": "tgt"}, fc_lora="full")  # the formula below covers all of fc1
    merged = merge_direction(model, "de", "wo")
    site = model.base.model.decoder.layers[1].fc1
    bank = site.banks["tgt"]
    expected = site.base.weight + bank.B["wo"] @ bank.A["wo"]
    torch.testing.assert_close(merged.model.decoder.layers[1].fc1.weight, expected)
    with pytest.raises(LsloError, match="unknown language 'xx'"):
        merge_direction(model, "xx", "wo")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index_plan", [MIXED_PLAN, "learn"])
def test_save_load_round_trip(tmp_path, index_plan, layout):
    model = lslo_model(index_plan, modules=["q", "c-v", "fc1", "fc2"], **layout)
    add_masks(model)
    if index_plan == "learn":
        with torch.no_grad():
            model.index_weights["dec_1"].logits.copy_(torch.tensor([1.0, -2.0]))
    path = save_adapters(model, tmp_path / "adapters.safetensors", base_model="/models/tiny")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        a_fr = f.get_tensor("base.model.encoder.layers.0.self_attn.q_proj.banks." +
                            ("src" if index_plan != "learn" else "tgt") + ".A.fr")
    assert json.loads(meta["languages"]) == LANGUAGES and json.loads(meta["ranks"]) == RANKS
    assert meta["base_model"] == "/models/tiny" and json.loads(meta["modules"]) == ["q", "c-v", "fc1", "fc2"]
    assert json.loads(meta["fc_lora"]) == layout["fc_lora"]
    assert not any("base.weight" in k or k.endswith(".bias") for k in keys)
    assert torch.all(a_fr[(model.lslo_modules()["enc.0.q"].banks[
        "src" if index_plan != "learn" else "tgt"].A_mask["fr"]) == 0] == 0)  # saved masked
    loaded = load_adapters(make_tiny_model(0), path).eval()
    directions = [("en", "fr"), ("fr", "oc"), ("de", "wo"), ("oc", "fr")]
    assert (lslo_logits(loaded, directions) - lslo_logits(model, directions)).abs().max() <= 1e-6
    assert loaded.spec.index_plan == model.spec.index_plan
    assert loaded.spec.to_dict() == model.spec.to_dict()
    fc1 = loaded.lslo_modules()["enc.1.fc1"]
    assert fc1.out_slice == model.lslo_modules()["enc.1.fc1"].out_slice
    assert "fr" in loaded.lslo_modules()["dec.1.c-v"].banks[loaded.lslo_modules()["dec.1.c-v"].index
                                                            if index_plan != "learn" else "src"].B_mask


def test_load_errors(tmp_path):
    with pytest.raises(LsloError, match="adapter file not found"):
        load_adapters(make_tiny_model(), tmp_path / "missing.safetensors")
    model = lslo_model()
    path = save_adapters(model, tmp_path / "a.safetensors", base_model="tiny")
    with pytest.raises(LsloError, match="adapters are for languages"):
        load_adapters(make_tiny_model(), path, languages=["en", "fr"])
    with pytest.raises(LsloError, match="shape .* expects"):
        load_adapters(make_tiny_model(d_model=32, encoder_ffn_dim=32), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(LsloError, match="not a readable"):
        load_adapters(make_tiny_model(), tmp_path / "junk.safetensors")


def test_file_without_layout_fields_reads_as_full(tmp_path):
    """Files written before the fc layout option hold the full layout; a slice file needs room for its slice."""
    from safetensors.torch import save_file

    model = lslo_model(modules=["fc1", "fc2"], fc_lora="full")
    path = save_adapters(model, tmp_path / "a.safetensors", base_model="tiny")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("fc_lora", "fc_lora_offset", "fc_lora_width",
                                                                      "init")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = load_adapters(make_tiny_model(0), tmp_path / "old.safetensors")
    assert loaded.spec.fc_lora == "full"
    directions = [("en", "fr"), ("oc", "wo")]
    assert (lslo_logits(loaded, directions) - lslo_logits(model, directions)).abs().max() <= 1e-6
    sliced = save_adapters(lslo_model(modules=["fc1"], fc_lora="slice", fc_lora_offset=8, fc_lora_width=16),
                           tmp_path / "s.safetensors", base_model="tiny")
    with pytest.raises(LsloError, match=r"fc_lora slice \[8:24\] does not fit the ffn dimension 20"):
        load_adapters(make_tiny_model(encoder_ffn_dim=20, decoder_ffn_dim=20), sliced)
