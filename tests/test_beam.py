"""lslo.beam: beam search that leaves the cross-attention cache in place decodes exactly what HF's loop does."""

import warnings

import pytest
import torch
from conftest import DECODER_START, lang_token_id, make_batch, make_tiny_model
from test_model import lslo_model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from lslo.beam import BeamSearchCache, cache_keyword, with_beam_cache

DIRECTIONS = [("en", "fr"), ("fr", "oc"), ("de", "wo"), ("oc", "en"), ("fr", "oc")]


def hf_cache(model):
    config = model.config.get_text_config(decoder=True)
    return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))


def beam_kwargs(batch, num_beams=4):
    prefix = torch.tensor([[DECODER_START, lang_token_id(t)] for t in batch["tgt"]])
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=prefix,
                num_beams=num_beams, num_return_sequences=2, max_new_tokens=9, do_sample=False,
                output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("kind", ["lslo", "plain"])
def test_beam_cache_decodes_what_hf_decodes(kind):
    """Sequences, sequence scores and beam indices equal HF's default loop, for LSLoModel.generate (which adds
    the cache itself) and for a plain HF model (as the evaluate stage calls it)."""
    batch = make_batch(DIRECTIONS)
    kwargs = beam_kwargs(batch)
    if kind == "lslo":
        model = lslo_model(std=1.0).eval()
        hf_model, route = model.base, {"src_lang": batch["src"], "tgt_lang": batch["tgt"]}
        ours = model.generate(**kwargs, **route)
    else:
        model = hf_model = make_tiny_model(seed=2).eval()
        route = {}
        with torch.no_grad():
            ours = model.generate(**with_beam_cache(model, kwargs))
    with torch.no_grad():
        reference = model.generate(**kwargs, **route, **{cache_keyword(hf_model): hf_cache(hf_model)})
    assert isinstance(ours.past_key_values, BeamSearchCache)
    assert type(reference.past_key_values) is EncoderDecoderCache
    assert torch.equal(ours.sequences, reference.sequences)
    torch.testing.assert_close(ours.sequences_scores, reference.sequences_scores, rtol=0, atol=0)
    assert torch.equal(ours.beam_indices, reference.beam_indices)
    # some hypotheses changed beams along the way, so the self-attention cache reorder mattered
    steps = ours.beam_indices
    assert ((steps[:, 1:] != steps[:, :-1]) & (steps[:, 1:] >= 0)).any()


def test_reorder_moves_self_attention_only():
    cache = BeamSearchCache(DynamicCache(), DynamicCache())
    self_k, cross_k = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 5, 8)
    cache.self_attention_cache.update(self_k, self_k + 1, 0)
    cache.cross_attention_cache.update(cross_k, cross_k + 1, 0)
    cross_before = cache.cross_attention_cache.layers[0].keys
    cache.reorder_cache(torch.tensor([1, 1, 3, 2]))
    torch.testing.assert_close(cache.self_attention_cache.layers[0].keys, self_k[[1, 1, 3, 2]])
    assert cache.cross_attention_cache.layers[0].keys is cross_before


def test_with_beam_cache_only_for_default_encoder_decoder_beam_search():
    model = make_tiny_model()
    name = cache_keyword(model)  # generate's own keyword: transformers 5 warns about past_key_values
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(**with_beam_cache(model, {"input_ids": torch.ones(1, 3, dtype=torch.long), "num_beams": 3,
                                                 "max_new_tokens": 2}))
    base = {"input_ids": torch.ones(1, 3, dtype=torch.long)}
    assert name not in with_beam_cache(model, {**base, "num_beams": 1})
    assert name not in with_beam_cache(model, {**base, "num_beams": 3, "use_cache": False})
    given = hf_cache(model)
    for keyword in ("past_key_values", "cache"):
        assert with_beam_cache(model, {**base, "num_beams": 3, keyword: given}) == {**base, "num_beams": 3,
                                                                                   keyword: given}
    kwargs = {**base, "num_beams": 3}
    assert isinstance(with_beam_cache(model, kwargs)[name], BeamSearchCache)
    assert name not in kwargs  # the caller's dict is not changed
