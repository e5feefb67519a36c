"""After fine-tuning: `lslo translate` (= the evaluate stage's hypotheses) and `lslo export` (a merged HF model or
a PEFT LoRA adapter that decodes exactly what the LSLo model decodes)."""

import io
import json
import os
import sys

import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_dirs import make_m2m100_model_dir, make_nllb_model_dir, syllable_sentences  # noqa: E402
from transformers import M2M100ForConditionalGeneration  # noqa: E402

from lslo import evaluate, inference  # noqa: E402
from lslo.adapters import save_adapters  # noqa: E402
from lslo.cli import main  # noqa: E402
from lslo.errors import LsloError  # noqa: E402
from lslo.export import export_direction, site_factors  # noqa: E402
from lslo.model import LSLoSpec, inject_lslo  # noqa: E402
from lslo.tokenizer import load_tokenizer  # noqa: E402

LANGS = ["en", "fr", "oc"]
RANKS = {"en": 2, "fr": 3, "oc": 4}
PLANS = {"mixed": {"enc": ["src", "tgt"], "dec": ["tgt", "src"]}, "learn": "learn"}


def lslo_variant(root, base_dir, index_plan, nllb_codes=None, seed=1, pruned=False, fc_lora="full", scale=0.5):
    """Random non-zero adapters on the base in `base_dir`, saved with save_adapters, and their variant.json."""
    base = M2M100ForConditionalGeneration.from_pretrained(base_dir)
    model = inject_lslo(base, LSLoSpec(languages=LANGS, ranks=RANKS, index_plan=index_plan, fc_lora=fc_lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * scale)
        if pruned:  # GPS leaves masks: pruned entries must be zero in the export as well
            for module in model.lslo_modules().values():
                for bank in module.banks.values():
                    bank.set_mask("B", "fr", (torch.rand(bank.B["fr"].shape, generator=g) > 0.5).float())
    name = f"lslo-{seed}"
    save_adapters(model, root / f"{name}.safetensors", base_model=str(base_dir))
    variant = root / f"{name}.json"
    variant.write_text(json.dumps({"method": "lslo", "base_model": str(base_dir), "model": None,
                                   "adapters": str(root / f"{name}.safetensors"), "languages": LANGS,
                                   "nllb_codes": nllb_codes}))
    return variant


@pytest.fixture(scope="module")
def m2m_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2m")
    return make_m2m100_model_dir(root / "base", LANGS, init_std=0.5)


def prefix_generate(model, tokenizer, texts, src, tgt, **kwargs):
    """Beam-5 token ids of `model.generate` from the decoder prefix [</s>, tgt token] (the evaluate stage's)."""
    tokenizer.src_lang = src
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    prefix = torch.tensor([[2, tokenizer.get_lang_id(tgt)]] * len(texts))
    with torch.inference_mode():
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=prefix, num_beams=5, max_new_tokens=12, **kwargs)


@pytest.mark.parametrize("plan,pruned,fc_lora", [("mixed", True, "full"), ("learn", False, "full"),
                                                  ("mixed", True, "slice")])
def test_peft_export_decodes_the_lslo_tokens(tmp_path, m2m_base, plan, pruned, fc_lora):
    from peft import PeftModel

    variant = lslo_variant(tmp_path, m2m_base, PLANS[plan], pruned=pruned, fc_lora=fc_lora)
    translator = inference.load_variant(variant, device="cpu")
    model, tokenizer = translator.model, translator.tokenizer
    if plan == "learn":
        with torch.no_grad():
            for i, weights in enumerate(model.index_weights.values()):
                weights.logits.copy_(torch.tensor([0.7 * (i + 1), -0.4]))
    texts = syllable_sentences(4, seed=5, words=5)
    for src, tgt in [("en", "oc"), ("oc", "fr")]:
        out = export_direction(model, src, tgt, tmp_path / f"peft-{src}-{tgt}", tokenizer, peft=True)
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        peft_model = PeftModel.from_pretrained(M2M100ForConditionalGeneration.from_pretrained(m2m_base), out).eval()
        expected = prefix_generate(model, tokenizer, texts, src, tgt, src_lang=src, tgt_lang=tgt)
        assert prefix_generate(peft_model, tokenizer, texts, src, tgt).tolist() == expected.tolist()
        merged = export_direction(model, src, tgt, tmp_path / f"hf-{src}-{tgt}", tokenizer)
        plain = M2M100ForConditionalGeneration.from_pretrained(merged).eval()
        assert prefix_generate(plain, tokenizer, texts, src, tgt).tolist() == expected.tolist()
    base = M2M100ForConditionalGeneration.from_pretrained(m2m_base).eval()
    assert prefix_generate(base, tokenizer, texts, "en", "oc").tolist() != \
        prefix_generate(model, tokenizer, texts, "en", "oc", src_lang="en", tgt_lang="oc").tolist()


@pytest.mark.parametrize("fc_lora", ["full", "slice"])
def test_site_factors_are_the_site_delta(tmp_path, m2m_base, fc_lora):
    """B @ A of each site equals the direction's ΔW computed from the banks (eq. 3 / eq. 5), zero outside the
    block a slice-layout fc LoRA covers."""
    from lslo.adapters import _direction_delta

    variant = lslo_variant(tmp_path, m2m_base, "learn", pruned=True, fc_lora=fc_lora)
    model = inference.load_variant(variant, device="cpu").model
    for module in model.lslo_modules().values():
        a, b = site_factors(module, "fr", "oc")
        assert a.shape == (RANKS["fr"] + RANKS["oc"], module.base.in_features)
        torch.testing.assert_close(b @ a, _direction_delta(module, "fr", "oc"), rtol=1e-5, atol=1e-6)


def test_export_cli_one_and_all_directions(tmp_path, m2m_base, capsys):
    variant = lslo_variant(tmp_path, m2m_base, PLANS["mixed"])
    assert main(["export", "--variant", str(variant), "--direction", "en-oc", "--out", str(tmp_path / "one"),
                 "--peft"]) == 0
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    # en-oc with the mixed plan: encoder layer 0 source-indexed (en, r 2), layer 1 target (oc, r 4); decoder
    # layer 0 target (oc), layer 1 source (en); 5 sites per encoder layer, 8 per decoder layer
    ranks = sorted(config["rank_pattern"].values())
    assert config["peft_type"] == "LORA" and ranks == [2] * 13 + [4] * 13
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert main(["export", "--variant", str(variant), "--all-directions", "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir()) == sorted(
        f"{s}-{t}" for s in LANGS for t in LANGS if s != t)
    assert (tmp_path / "all" / "fr-en" / "model.safetensors").is_file()
    assert main(["export", "--variant", str(variant), "--direction", "en-xx", "--out", str(tmp_path / "x")]) == 2
    assert "unknown language 'xx'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_export_out_never_replaces_a_directory_lslo_did_not_write(tmp_path, m2m_base, capsys):
    """--out naming a directory of the user's: refused with and without --force, every file kept; an earlier
    export is refused without --force and replaced as a whole with it."""
    variant = lslo_variant(tmp_path, m2m_base, PLANS["mixed"])
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _files(mine)
    for which in (["--direction", "en-oc"], ["--all-directions"]):
        for force in ([], ["--force"]):
            assert main(["export", "--variant", str(variant), *which, "--out", str(mine), *force]) == 2
            err = capsys.readouterr().err
            assert ("only a directory lslo wrote" if force else "not empty") in err and str(mine) in err
            assert _files(mine) == before
    ours = tmp_path / "ours"
    assert main(["export", "--variant", str(variant), "--direction", "en-oc", "--out", str(ours), "--peft"]) == 0
    assert main(["export", "--variant", str(variant), "--direction", "en-oc", "--out", str(ours)]) == 2
    assert "give --force" in capsys.readouterr().err and (ours / "adapter_config.json").is_file()
    assert main(["export", "--variant", str(variant), "--all-directions", "--out", str(ours), "--force"]) == 0
    assert not (ours / "adapter_config.json").exists() and (ours / "fr-en" / "model.safetensors").is_file()
    (ours / "fr-en" / "mynote.txt").write_text("a user's note in an earlier export")
    assert main(["export", "--variant", str(variant), "--all-directions", "--out", str(ours), "--force"]) == 2
    assert "fr-en/mynote.txt" in capsys.readouterr().err and (ours / "fr-en" / "mynote.txt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--variant", str(variant), "--direction", "en-oc", "--out", str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()


def test_atomic_directory_never_replaces_a_foreign_directory(tmp_path):
    """Every stage that writes a directory (finetune's model/, the demo benchmark and model, export, convert)
    goes through atomic_write(is_dir=True): it replaces an earlier lslo output, never anything else."""
    from lslo.io import OUTPUT_MARKER, atomic_write

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(LsloError, match="lslo did not write"):
        with atomic_write(mine, is_dir=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary left behind
    ours = tmp_path / "ours"
    for text in ("first", "second"):
        with atomic_write(ours, is_dir=True) as tmp:
            (tmp / f"{text}.txt").write_text(text)
    assert sorted(p.name for p in ours.iterdir()) == sorted([OUTPUT_MARKER, "second.txt"])
    (ours / "note.txt").write_text("added by hand")
    with pytest.raises(LsloError, match="note.txt"):
        with atomic_write(ours, is_dir=True) as tmp:
            (tmp / "third.txt").write_text("third")
    assert sorted(p.name for p in ours.iterdir()) == sorted([OUTPUT_MARKER, "note.txt", "second.txt"])


@pytest.mark.parametrize("kind", ["m2m100", "nllb"])
def test_translate_agrees_with_the_evaluate_stage(tmp_path, m2m_base, kind, monkeypatch, capsys):
    if kind == "nllb":
        base = make_nllb_model_dir(tmp_path / "nllb", ["eng_Latn", "fra_Latn", "oci_Latn"], init_std=0.5)
        codes = {"en": "eng_Latn", "fr": "fra_Latn", "oc": "oci_Latn"}
    else:
        base, codes = m2m_base, None
    variant = lslo_variant(tmp_path, base, PLANS["mixed"], nllb_codes=codes)
    sentences = syllable_sentences(7, seed=9, words=6)
    test = pd.DataFrame({"id": range(7), "en": sentences, "fr": sentences, "oc": sentences})
    test.to_csv(tmp_path / "test.tsv", sep="\t", index=False)
    hyps = evaluate.decode_shard(variant, tmp_path / "test.tsv", [("en", "oc"), ("fr", "oc"), ("oc", "en")],
                                 tmp_path / "hyps.tsv", inference.DecodingOptions(beam=5, max_tokens=60, max_len_b=10),
                                 device="cpu")
    for src, tgt in [("en", "oc"), ("oc", "en")]:
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{s}\n" for s in sentences)))
        assert main(["translate", "--variant", str(variant), "--src", src, "--tgt", tgt, "--max-len-b", "10",
                     "--max-tokens", "25", "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        expected = hyps[(hyps.src == src) & (hyps.tgt == tgt)].sort_values("id").hyp.tolist()
        assert captured.out.splitlines() == expected
        assert "translating" in captured.err  # progress on stderr
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\n"))
    assert main(["translate", "--variant", str(variant), "--src", "en", "--tgt", "de", "--quiet"]) == 2
    assert "'de'" in capsys.readouterr().err


def test_export_refuses_a_plain_variant(tmp_path, m2m_base):
    from lslo.export import export_variant

    variant = tmp_path / "pretrain.json"
    variant.write_text(json.dumps({"method": "pretrain", "base_model": str(m2m_base), "languages": LANGS}))
    with pytest.raises(LsloError, match="not lslo"):
        export_variant(variant, tmp_path / "out", [("en", "fr")])


def _evaluate_stage_tokens(translator, monkeypatch) -> dict:
    """{source ids: generated ids after the prefix [</s>, tgt] (pads dropped)} of every sentence the evaluate stage
    decodes through `translator` (a spy on Translator.translate_batch and the tokenizer's batch_decode)."""
    tokens, current = {}, []
    translate_batch, batch_decode = translator.translate_batch, translator.tokenizer.batch_decode

    def spy_translate(batch_ids, *args, **kwargs):
        current[:] = batch_ids
        return translate_batch(batch_ids, *args, **kwargs)

    def spy_decode(ids, **kwargs):
        for source, out in zip(current, ids.tolist()):
            tokens[tuple(source)] = [t for t in out if t != translator.tokenizer.pad_token_id]
        return batch_decode(ids, **kwargs)

    monkeypatch.setattr(translator, "translate_batch", spy_translate)
    monkeypatch.setattr(translator.tokenizer, "batch_decode", spy_decode)
    return tokens


def _end_sentences_sooner(model_dir, alpha=5.0) -> None:
    """Raise the </s> logit of the model in `model_dir` (its embedding row moved along the mean decoder output),
    so that beam search finishes hypotheses of different lengths, as a trained model does, instead of always
    running to the length limit."""
    model = M2M100ForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    tokenizer.src_lang = "en"
    batch = tokenizer(syllable_sentences(20, seed=1, words=5), return_tensors="pt", padding=True)
    prefix = torch.tensor([[2, tokenizer.get_lang_id("oc"), *range(10, 16)]] * 20)
    with torch.no_grad():
        hidden = model(**batch, decoder_input_ids=prefix, output_hidden_states=True).decoder_hidden_states[-1]
        mean = hidden.mean((0, 1))
        model.model.shared.weight[2] += alpha * mean / mean.norm() ** 2
    model.save_pretrained(model_dir)


def test_a_plain_export_decodes_with_transformers_alone(tmp_path, monkeypatch):
    """An exported direction loads in an interpreter that never imports lslo (AutoTokenizer reads tokenizer.json)
    and encodes sources to lslo's ids. generate with the evaluate stage's decoder prefix [</s>, __oc__] gives
    the evaluate stage's tokens; forced_bos_token_id (max_new_tokens = max_len_b + 1) gives them with length
    penalty 0, while with length penalty 1 it normalises by one token more (the forced language token) and so
    ranks some finished hypotheses differently."""
    from model_dirs import stock_transformers_decode

    base = make_m2m100_model_dir(tmp_path / "base", LANGS, init_std=0.5)
    _end_sentences_sooner(base)
    variant = lslo_variant(tmp_path, base, PLANS["mixed"], scale=0.1)
    sentences = syllable_sentences(12, seed=11, words=5)
    pd.DataFrame({"id": range(12), "en": sentences, "oc": sentences}).to_csv(tmp_path / "test.tsv", sep="\t",
                                                                             index=False)
    out = tmp_path / "exported"
    assert main(["export", "--variant", str(variant), "--direction", "en-oc", "--out", str(out)]) == 0
    translator = inference.load_variant(variant, device="cpu")
    oc = translator.tokenizer.get_lang_id("oc")
    evaluated, requests = {}, []
    for lenpen in (1.0, 0.0):
        # transformers' generate is the evaluate stage's eval.search: hf (fairseq's search is lslo.search)
        options = inference.DecodingOptions(beam=5, max_tokens=200, max_len_b=10, lenpen=lenpen, search="hf")
        with monkeypatch.context() as patch:
            tokens = _evaluate_stage_tokens(translator, patch)
            frame = evaluate.decode_shard(variant, tmp_path / "test.tsv", [("en", "oc")], tmp_path / "hyps.tsv",
                                          options, translator=translator)
        assert len({len(ids) for ids in tokens.values()}) > (3 if lenpen else 1)  # some hypotheses end sooner
        evaluated[lenpen] = tokens, [dict(zip(frame.id.astype(int), frame.hyp))[i] for i in range(12)]
        requests += [["en", "oc", s, options.beam, options.max_len_b, lenpen, mode]
                     for mode in ("prefix", "forced") for s in sentences]
    stock = stock_transformers_decode(out, requests)
    assert not stock["lslo_imported"] and stock["class"] == "TokenizersBackend"
    assert stock["languages"] == {f"__{c}__": translator.tokenizer.get_lang_id(c) for c in LANGS}
    for n, lenpen in enumerate((1.0, 0.0)):
        tokens, hyps = evaluated[lenpen]
        prefix, forced = stock["results"][24 * n:24 * n + 12], stock["results"][24 * n + 12:24 * n + 24]
        for sentence, result, hyp in zip(sentences, prefix, hyps):
            assert result["source"] == translator.encode(sentence, "en")
            assert result["output"][:2] == [2, oc] and result["output"][2:] == tokens[tuple(result["source"])]
            assert " ".join(result["text"].split()) == hyp
        same = [a["output"] == b["output"] for a, b in zip(prefix, forced)]
        assert all(same) if lenpen == 0 else not all(same), (lenpen, same)
