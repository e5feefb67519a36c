"""lslo.search: fairseq-generate's beam search, checked against beams worked out by hand on scripted next-token
distributions, and on tiny real models against greedy decoding, single-sentence decoding and HF generate."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import EOS, make_batch, lang_token_id, make_tiny_model  # noqa: E402
from model_dirs import make_m2m100_model_dir, syllable_sentences  # noqa: E402
from test_model import lslo_model  # noqa: E402

from lslo.config import load_yaml  # noqa: E402
from lslo.errors import LsloError  # noqa: E402
from lslo.inference import (DTYPES, SEARCHES, DecodingOptions, decoding_precision, load_variant,  # noqa: E402
                            translate_many)
from lslo.search import fairseq_beam_search, m2m100_beam_search  # noqa: E402
from lslo.train import TrainOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# scripted vocabulary: decoder start, pad, EOS, the target-language token L, words a b c d
START, PAD, L, A, B, C, D = 0, 1, 3, 4, 5, 6, 7
VOCAB = 8
UNLISTED = 1e-9  # the probability of a token a script does not list


def scripted(table: dict, default: dict | None = None):
    """A step function whose next-token probabilities depend on the tokens after the decoder start only:
    table[(tokens...)] = {token: probability}; prefixes not in the table use ``default``."""
    def step(tokens, reorder, kept):
        rows = []
        for row in tokens.tolist():
            probs = table.get(tuple(row[1:]), default or {})
            rows.append([math.log(probs.get(t, UNLISTED)) for t in range(VOCAB)])
        return torch.tensor(rows, dtype=torch.float64).float()
    return step


def search(table, beam, max_len=10, default=None, lenpen=1.0):
    return fairseq_beam_search(scripted(table, default), 1, beam, max_len, torch.tensor([[L]]), bos=START, eos=EOS,
                               pad=PAD, lenpen=lenpen)[0]


def fairseq_score(probs, lenpen=1.0):
    """Sum of the log-probabilities (the language token's included) over the length counting it and EOS."""
    return sum(math.log(p) for p in probs) / len(probs) ** lenpen


def hf_score(probs, lenpen=1.0):
    """HF generate's score of the same hypothesis: the forced language token (probs[0]) is part of the prompt, in
    neither the sum nor the length."""
    return sum(math.log(p) for p in probs[1:]) / len(probs[1:]) ** lenpen


def test_a_sentence_stops_at_beam_finished_hypotheses():
    """beam 2. Step 1: [L eos] is among the first two candidates (a .5, eos .3) and is finalized. Step 2: the
    candidates are a-eos .275, a-c .225, b-eos .06, b-d .04; a-eos is the second finalized hypothesis, so fairseq
    is done and returns [L a eos] (log .275 / 3 = -0.430 over [L eos] log .3 / 2 = -0.602).
    A search that goes on finds [L a c eos] (.225 · .9 = .2025): log .2025 / 4 = -0.399 is better, under
    fairseq's normalisation as under HF's (log .2025 / 3 = -0.532 over log .275 / 2 = -0.646). HF's rule does go
    on: its worst finished hypothesis, [eos] at log .3 / 1 = -1.204, is below the best running beam's bound
    log .225 / 2 = -0.746 (early_stopping=False), and so HF generate returns [a c]."""
    table = {(): {L: 1.0},
             (L,): {A: .5, EOS: .3, B: .1, C: .05, D: .04},
             (L, A): {EOS: .55, C: .45},
             (L, B): {EOS: .6, D: .4},
             (L, A, C): {EOS: .9, D: .1},
             (L, B, D): {EOS: .9, D: .1}}
    hyps = search(table, beam=2)
    assert [h.tokens for h in hyps] == [[L, A, EOS], [L, EOS]]
    assert hyps[0].score == pytest.approx(fairseq_score([1.0, .5, .55]))
    assert hyps[1].score == pytest.approx(fairseq_score([1.0, .3]))
    continued = [1.0, .5, .45, .9]  # [L a c eos], which fairseq never reaches
    assert fairseq_score(continued) > hyps[0].score
    assert hf_score(continued) > hf_score([1.0, .5, .55])
    assert hf_score([1.0, .5, .45]) > hf_score([1.0, .3])  # HF's bound: the running [a c] could still win


def test_the_length_counts_the_language_token_and_its_log_probability():
    """beam 2, P(L) = .9. [L a eos]: a .55, eos .548 (sum of the words' logs -1.2); [L b c eos]: b .4, c .7,
    eos .652 (-1.7). Finalized at steps 2 and 3, the two are the sentence's beam. fairseq divides (log .9 + sum) by
    3 and 4: -0.435 against -0.451, [L a eos] wins. Leaving the language token out (HF: -1.2 / 2 = -0.600 against
    -1.7 / 3 = -0.567), or keeping its log-probability but dividing by the words + EOS (-0.653 against -0.602),
    picks [L b c eos]."""
    short = [.9, .55, math.exp(-1.2) / .55]
    long = [.9, .4, .7, math.exp(-1.7) / (.4 * .7)]
    table = {(): {L: .9},
             (L,): {A: short[1], B: long[1], EOS: .01, C: .01, D: .01},
             (L, A): {EOS: short[2], C: .2, D: .15},
             (L, B): {C: long[2], D: .2, EOS: .01},
             (L, B, C): {EOS: long[3], D: .3},
             (L, A, C): {EOS: .5, D: .4}}
    hyps = search(table, beam=2)
    assert [h.tokens for h in hyps] == [[L, A, EOS], [L, B, C, EOS]]
    assert hyps[0].score == pytest.approx((math.log(.9) - 1.2) / 3)
    assert hyps[1].score == pytest.approx((math.log(.9) - 1.7) / 4)
    assert hf_score(long) > hf_score(short)
    assert sum(map(math.log, long)) / 3 > sum(map(math.log, short)) / 2


def test_lenpen_is_the_power_of_that_length():
    table = {(): {L: .9}, (L,): {A: .6, EOS: .3, B: .05, C: .03, D: .02}, (L, A): {EOS: .5, B: .4, C: .1}}
    for lenpen in (0.5, 2.0):
        hyps = search(table, beam=2, lenpen=lenpen)
        assert {tuple(h.tokens): h.score for h in hyps} == pytest.approx(
            {(L, A, EOS): fairseq_score([.9, .6, .5], lenpen), (L, EOS): fairseq_score([.9, .3], lenpen)})


def test_eos_is_forced_at_the_length_limit():
    """max_len 3 and EOS nearly impossible: at step 3 only EOS is allowed, with its own log-probability; every
    hypothesis is the language token, two words and EOS (HF, at max_new_tokens, stops without EOS)."""
    default = {A: .5, B: .3, C: .15, D: .05, EOS: 1e-4}
    hyps = search({(): {L: .9}}, beam=2, max_len=3, default=default)
    assert [h.tokens for h in hyps][0] == [L, A, A, EOS]
    assert all(len(h.tokens) == 4 and h.tokens[-1] == EOS for h in hyps) and len(hyps) == 2
    assert hyps[0].score == pytest.approx(fairseq_score([.9, .5, .5, 1e-4]))


def test_a_length_limit_of_zero_is_refused():
    """fairseq asserts min_len (1) <= max_len: at step 0 EOS would be both forced and forbidden."""
    with pytest.raises(LsloError, match="the length limit is 0 tokens, under fairseq's minimum length 1"):
        search({(): {L: .9, EOS: .05}}, beam=2, max_len=0)
    assert search({(): {L: .9, EOS: .05}}, beam=2, max_len=1)[0].tokens == [L, EOS]


def test_pad_is_never_chosen():
    default = {PAD: .9, A: .05, EOS: .04}
    hyps = search({(): {L: 1.0}}, beam=2, max_len=4, default=default)
    assert all(PAD not in h.tokens for h in hyps)


# ---------------------------------------------------------------------------------------------- real models

def eos_prone(model, factor=2.0):
    """The tiny random models hardly ever end a sentence: a larger EOS row of the (untied) output layer makes
    hypotheses of several lengths."""
    weight = model.lm_head.weight.detach().clone()
    weight[EOS] *= factor
    model.lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)
    return model


DIRECTIONS = [("en", "fr"), ("fr", "oc"), ("de", "wo"), ("oc", "en"), ("fr", "oc"), ("wo", "de")]


def greedy(model, input_ids, attention_mask, tgt, max_len):
    """Argmax decoding one full forward per token (no cache), pad excluded, EOS forced at the length limit."""
    tokens = [model.config.decoder_start_token_id, lang_token_id(tgt)]
    with torch.no_grad():
        while True:
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           decoder_input_ids=torch.tensor([tokens])).logits[0, -1]
            logits[model.config.pad_token_id] = -math.inf
            nxt = EOS if len(tokens) - 1 >= max_len else int(logits.argmax())
            tokens.append(nxt)
            if nxt == EOS:
                return tokens[1:]


def test_beam_one_is_greedy_decoding():
    model = eos_prone(make_tiny_model(seed=3))
    batch = make_batch(DIRECTIONS, length=9)
    prefix = torch.tensor([[lang_token_id(t)] for t in batch["tgt"]])
    hyps = m2m100_beam_search(model, batch["input_ids"], batch["attention_mask"], prefix, 1, 20, 1.0)
    expected = [greedy(model, batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1], t, 20)
                for i, t in enumerate(batch["tgt"])]
    assert [h.tokens for h in hyps] == expected
    assert len({len(t) for t in expected}) > 1  # sentences of several lengths: some left the batch early


@pytest.mark.parametrize("beam", [2, 5])
def test_lslo_mixed_batch_decodes_each_sentence_as_alone(beam):
    model = lslo_model(std=1.0).eval()
    eos_prone(model.base, 1.8)
    batch = make_batch(DIRECTIONS, length=9)
    ids = {side: model.lang_ids(batch[side]) for side in ("src", "tgt")}
    prefix = torch.tensor([[lang_token_id(t)] for t in batch["tgt"]])

    def decode(rows):
        width = int(batch["attention_mask"][rows].sum(1).max())  # alone: no padding beyond its own length
        return m2m100_beam_search(model.base, batch["input_ids"][rows, :width], batch["attention_mask"][rows, :width],
                                  prefix[rows], beam, 16, 1.0, routing=model.routing, src_lang=ids["src"][rows],
                                  tgt_lang=ids["tgt"][rows])

    together = decode(list(range(len(DIRECTIONS))))
    alone = [decode([i])[0] for i in range(len(DIRECTIONS))]
    assert [h.tokens for h in together] == [h.tokens for h in alone]
    assert [h.score for h in together] == pytest.approx([h.score for h in alone], abs=1e-5)
    assert len({len(h.tokens) for h in together}) > 1
    assert not model.routing.active  # cleared afterwards


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    base = make_m2m100_model_dir(root / "base", ["en", "fr", "oc"], init_std=0.5)
    variant = root / "variant.json"
    variant.write_text(json.dumps({"method": "pretrain", "base_model": str(base), "languages": ["en", "fr", "oc"]}))
    return load_variant(variant, device="cpu")


def test_search_hf_decodes_as_hf_generate(translator):
    """eval.search hf is HF generate with the arguments lslo has always given it."""
    texts, tgts = syllable_sentences(4, seed=2, words=5), ["oc", "fr", "oc", "fr"]
    ids = [translator.encode(t, "en") for t in texts]
    ours = translator.translate_batch(ids, ["en"] * 4, tgts, DecodingOptions(beam=3, search="hf", lenpen=0.7), 9)
    width = max(map(len, ids))
    pad = translator.tokenizer.pad_token_id
    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    prefix = torch.tensor([[2, translator.tokenizer.get_lang_id(t)] for t in tgts])
    with torch.no_grad():
        out = translator.model.generate(input_ids=input_ids, attention_mask=(input_ids != pad).long(),
                                        decoder_input_ids=prefix, num_beams=3, max_new_tokens=9, length_penalty=0.7)
    assert ours == translator.tokenizer.batch_decode(out[:, 2:], skip_special_tokens=True)


def test_search_fairseq_is_the_default_and_decodes_through_lslo_search(translator):
    texts = syllable_sentences(3, seed=4, words=5)
    options = DecodingOptions(beam=3, max_len_b=7)
    assert options.search == "fairseq" and options.dtype == "fp32"
    hyps = translate_many(translator, texts, ["en"] * 3, ["oc"] * 3, options)
    ids = [translator.encode(t, "en") for t in texts]
    expected = []
    for i in ids:  # one at a time: with max_len_a 0 a hypothesis does not depend on its batch
        found = m2m100_beam_search(translator.model, torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long),
                                   torch.tensor([[translator.tokenizer.get_lang_id("oc")]]), 3, 7, 1.0)[0]
        expected.append(translator.tokenizer.decode(found.tokens[1:], skip_special_tokens=True))
    assert hyps == expected


def test_search_and_dtype_are_checked():
    for name, bad in (("search", "beam"), ("dtype", "bf16"), ("search", None)):
        with pytest.raises(LsloError, match=rf"{name} is {bad!r}, expected one of .* \(config eval.{name}\)"):
            DecodingOptions(**{name: bad})


def test_the_schema_states_the_decoding_options_choices_and_defaults():
    """config eval.search / eval.dtype: the values and defaults of DecodingOptions (the demo config sets neither)."""
    schema = load_yaml(ROOT / "config" / "schema.yaml")
    evaluation = schema["properties"]["eval"]["properties"]
    train = schema["$defs"]["train"]["properties"]
    assert evaluation["search"]["enum"] == list(SEARCHES) == train["dev_search"]["enum"]
    assert evaluation["dtype"]["enum"] == list(DTYPES)
    assert (evaluation["search"]["default"], evaluation["dtype"]["default"]) == (DecodingOptions().search,
                                                                                DecodingOptions().dtype)
    assert TrainOptions().dev_search == DecodingOptions().search
    assert not {"search", "dtype"} & set(load_yaml(ROOT / "config" / "config.yaml")["eval"])


def test_fp16_is_refused_off_cuda(translator):
    with pytest.raises(LsloError, match=r"^eval.dtype is fp16, which decodes on CUDA only; this decoding runs on "
                                        r"cpu \(set eval.dtype: fp32, or lslo translate --dtype fp32\)$"):
        translate_many(translator, ["a"], ["en"], ["oc"], DecodingOptions(dtype="fp16"))


def test_half_precision_leaves_the_weights_as_they_were():
    """dev scores decode the model in training: the cast sets the fp32 tensors aside and puts them back."""
    model = make_tiny_model()
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.state_dict(keep_vars=True).items()}
    with decoding_precision(model, "fp16", "cuda"):  # the device only decides the refusal
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        assert model.model.decoder.embed_positions.weights.dtype == torch.float16
    for name, p in model.state_dict(keep_vars=True).items():
        assert p.dtype == before[name][1].dtype and p.data_ptr() == before[name][0]
        assert torch.equal(p, before[name][1])


@pytest.mark.cuda
def test_fp16_decoding_on_cuda(translator):
    """One batch in half precision on the GPU (the authors' --fp16): hypotheses come back, the weights stay fp32."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    translator.model.to("cuda")
    translator.device = "cuda"
    try:
        texts = syllable_sentences(4, seed=5, words=5)
        hyps = translate_many(translator, texts, ["en"] * 4, ["oc"] * 4, DecodingOptions(beam=5, dtype="fp16"))
        assert len(hyps) == 4 and {p.dtype for p in translator.model.parameters()} == {torch.float32}
    finally:
        translator.model.to("cpu")
        translator.device = "cpu"


@pytest.mark.parametrize("search", SEARCHES)
def test_dev_scores_decode_with_the_options_dev_search(monkeypatch, search):
    """Per-epoch dev scores decode with train.dev_search, which the workflow sets to eval.search."""
    import pandas as pd

    import lslo.train as T

    seen = []

    class Decoded(Exception):
        pass

    def record(translator, texts, srcs, tgts, options, **kwargs):
        seen.append(options)
        raise Decoded

    monkeypatch.setattr(T, "translate_many", record)
    table = pd.DataFrame({"en": ["a b", "c d"], "fr": ["e f", "g h"]})
    with pytest.raises(Decoded):
        T.dev_scores(make_tiny_model(), None, table, ["en", "fr"], {"en": "H", "fr": "H"},
                     TrainOptions(dev_sentences=2, dev_search=search), "cpu")
    assert [o.search for o in seen] == [search] and seen[0].dtype == "fp32"
    with pytest.raises(LsloError, match=r"options.dev_search is 'greedy', expected one of fairseq, hf"):
        TrainOptions.from_dict({"dev_search": "greedy"})


def test_translate_dtype_flag_overrides_a_recorded_fp16(tmp_path):
    """A paper run records dtype fp16; `lslo translate --dtype fp32` decodes it on a machine without CUDA."""
    from lslo.inference import write_decoding_options
    from lslo.translate import run_decoding_options

    variant = tmp_path / "variant.json"
    write_decoding_options(DecodingOptions(dtype="fp16"), tmp_path / "decoding.json")
    options, line = run_decoding_options(variant, {"dtype": "fp32"})
    assert (options.dtype, options.search) == ("fp32", "fairseq")
    assert line.endswith("overridden by --dtype fp32 (recorded: fp16)")


def test_a_model_without_a_finite_continuation_is_refused():
    """NaN log-probabilities (an fp16 overflow) leave no hypothesis: one line, not an IndexError."""
    model = make_tiny_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    batch = make_batch([("en", "fr")], length=5)
    with pytest.raises(LsloError, match=r"ended sentence\(s\) \[0\] of the batch without a hypothesis"):
        m2m100_beam_search(model, batch["input_ids"], batch["attention_mask"], torch.tensor([[lang_token_id("fr")]]),
                           2, 4, 1.0)
